"""Sampler behaviour on CPU: greedy/penalty arithmetic, support of the filtered distributions,
seeded reproducibility independent of batch layout, logprobs and the sampled distribution itself."""

from __future__ import annotations


import pytest
import torch

from splitserve.layers.sampler import Sampler, SamplerOutput, SamplingRow, _outside_nucleus
from splitserve.sampling_params import InvalidRequestError, SamplingParams

sampler = Sampler()


def row(prompt=(), output=(), seed=None, **kw) -> SamplingRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingParams(seed=seed, **kw), list(prompt), list(output), gen)


def draws(logits_1d: torch.Tensor, n: int, seed0: int = 0, **kw) -> torch.Tensor:
    """n independent draws from one distribution, as one batch of n rows with distinct seeds."""
    rows = [row(seed=seed0 + i, **kw) for i in range(n)]
    return torch.tensor(sampler(logits_1d.expand(n, -1), rows).token_ids)


# Probabilities 0.5, 0.3, 0.1, 0.05, 0.05.
PROBS5 = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
LOGITS5 = PROBS5.log()


# --- greedy and penalties -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    torch.manual_seed(0)
    logits = torch.randn(8, 1000).to(dtype)
    out = sampler(logits, [row(temperature=0.0) for _ in range(8)])
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.float().argmax(-1).tolist()
    assert out.logprobs == [None] * 8 and out.top_logprobs == [None] * 8


def test_greedy_with_penalties_hand_computed():
    logits = torch.tensor([[2.0, 1.5, -0.5, 1.0, 0.0, 1.4]])
    # Token 0 was in the prompt (repetition 2.0 -> 1.0); token 1 generated twice
    # (repetition -> 0.75, frequency 0.2 * 2, presence 0.1 -> 0.25); token 2 generated once (-0.5*2 - 0.3 = -1.3).
    r = row(prompt=[0, 2], output=[1, 1, 2], temperature=0.0,
            repetition_penalty=2.0, frequency_penalty=0.2, presence_penalty=0.1)
    # Expected penalized: [1.0, 0.25, -1.3, 1.0, 0.0, 1.4] -> argmax 5.
    assert sampler(logits, [r]).token_ids == [5]
    # Without the penalties token 0 wins.
    assert sampler(logits, [row(prompt=[0, 2], output=[1, 1, 2], temperature=0.0)]).token_ids == [0]


def test_penalty_values_match_hand_computation():
    """Check the penalized logits themselves through a near-greedy read: token 3 loses exactly when the
    hand-computed value of token 1 exceeds it."""
    base = [0.0, 3.0, 0.0, 0.0]
    # frequency 0.5 * 3 + presence 0.6 = 2.1 subtracted from 3.0 -> 0.9
    r = row(output=[1, 1, 1], temperature=0.0, frequency_penalty=0.5, presence_penalty=0.6)
    assert sampler(torch.tensor([base[:3] + [0.89]]), [r]).token_ids == [1]
    assert sampler(torch.tensor([base[:3] + [0.91]]), [r]).token_ids == [3]
    # Negative logits are multiplied: -1.0 * 1.5 = -1.5 in prompt only (frequency/presence ignore the prompt).
    r2 = row(prompt=[0], temperature=0.0, repetition_penalty=1.5, frequency_penalty=2.0, presence_penalty=2.0)
    assert sampler(torch.tensor([[-1.0, -1.49]]), [r2]).token_ids == [1]
    assert sampler(torch.tensor([[-1.0, -1.51]]), [r2]).token_ids == [0]


def test_penalties_only_touch_their_own_rows_and_not_the_input():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    before = logits.clone()
    top = logits.argmax(-1).tolist()
    rows = [
        row(temperature=0.0),
        row(output=[top[1]] * 5, temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0,
            repetition_penalty=10.0),
        row(prompt=[top[2]], temperature=0.0),
    ]
    out = sampler(logits, rows)
    assert torch.equal(logits, before)
    assert out.token_ids[0] == top[0]
    assert out.token_ids[1] != top[1]
    assert out.token_ids[2] == top[2]


def _naive_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    out = logits.clone()
    for i, r in enumerate(rows):
        p = r.params
        for tok in set(r.prompt_token_ids) | set(r.output_token_ids):
            v = out[i, tok]
            out[i, tok] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for tok in set(r.output_token_ids):
            out[i, tok] -= p.frequency_penalty * r.output_token_ids.count(tok) + p.presence_penalty
    return out


def test_penalties_match_naive_reference():
    torch.manual_seed(12)
    V = 64
    logits = torch.randn(5, V) * 3
    rows = [
        row(prompt=[1, 1, 5], output=[5, 5, 9, 1], repetition_penalty=1.7, frequency_penalty=0.3, presence_penalty=-0.4),
        row(prompt=[2, 3], output=[]),
        row(prompt=[], output=[7] * 6 + [8], frequency_penalty=-1.0),
        row(prompt=list(range(0, V, 3)), output=[4, 4], repetition_penalty=0.6),
        row(prompt=[0], output=[63, 0, 63], presence_penalty=1.5),
    ]
    x = logits.clone()
    Sampler._apply_penalties(x, rows)
    assert torch.allclose(x, _naive_penalties(logits, rows), atol=1e-6)


def test_penalties_steer_sampled_rows():
    logits = torch.zeros(10)
    # Tokens 0..4 generated 10 times each with frequency 2.0 -> logit -20; they should never be drawn.
    got = set(draws(logits, 1000, output=list(range(5)) * 10, frequency_penalty=2.0).tolist())
    assert got == {5, 6, 7, 8, 9}


def test_top_k_1_equals_greedy_and_uses_no_randomness():
    torch.manual_seed(2)
    logits = torch.randn(6, 500)
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    states = [g.get_state() for g in gens]
    global_state = torch.get_rng_state()
    rows = [SamplingRow(SamplingParams(top_k=1, temperature=1.3), [], [], g) for g in gens[:3]]
    rows += [SamplingRow(SamplingParams(temperature=0.0), [], [], g) for g in gens[3:5]]
    rows += [row(top_k=1)]
    out = sampler(logits, rows)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))
    assert torch.equal(torch.get_rng_state(), global_state)


def test_greedy_rows_in_a_mixed_batch_consume_no_randomness():
    torch.manual_seed(3)
    logits = torch.randn(4, 300)
    g_greedy = torch.Generator().manual_seed(7)
    state = g_greedy.get_state()
    rows = [row(seed=1), SamplingRow(SamplingParams(temperature=0.0), [], [], g_greedy), row(), row(seed=2)]
    out = sampler(logits, rows)
    assert torch.equal(g_greedy.get_state(), state)
    assert out.token_ids[1] == int(logits[1].argmax())


# --- filtered distributions -----------------------------------------------------------------------

def test_top_k_restricts_support():
    torch.manual_seed(4)
    logits = torch.randn(200) * 0.5  # flat-ish, so without top-k tokens outside the top 5 are common
    allowed = set(logits.topk(5).indices.tolist())
    got = set(draws(logits, 2000, top_k=5).tolist())
    assert got <= allowed and len(got) == 5
    assert not set(draws(logits, 500).tolist()) <= allowed


@pytest.mark.parametrize("top_p,allowed", [(0.45, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3, 4})])
def test_top_p_restricts_to_nucleus(top_p, allowed):
    perm = torch.tensor([3, 0, 4, 1, 2])  # shuffle token ids so the nucleus is not just a prefix
    logits = torch.empty(5)
    logits[perm] = LOGITS5
    got = set(draws(logits, 2000, top_p=top_p).tolist())
    assert got == {int(perm[i]) for i in allowed}


def test_top_p_always_keeps_top_token():
    logits = torch.tensor([5.0, 0.0, 0.0, 0.0])
    assert set(draws(logits, 300, top_p=1e-6, temperature=5.0).tolist()) == {0}


def test_top_k_and_top_p_combined():
    # top_k=3 renormalises to 0.5/0.9, 0.3/0.9, 0.1/0.9; top_p=0.8 then keeps tokens 0 and 1 only.
    got = set(draws(LOGITS5, 2000, top_k=3, top_p=0.8).tolist())
    assert got == {0, 1}


def _naive_outside_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    probs = logits.softmax(-1).double()
    order = probs.argsort(descending=True)
    mask = torch.ones_like(probs, dtype=torch.bool)
    mass = 0.0
    for tok in order.tolist():
        mask[tok] = False
        mass += float(probs[tok])
        if mass >= top_p:
            break
    return mask


def test_nucleus_matches_reference_inside_and_beyond_the_search_window():
    torch.manual_seed(13)
    V = 6000
    peaky = torch.randn(V) * 6   # nucleus of a few tokens: resolved from the top-k window
    flat = torch.randn(V) * 0.3  # nucleus of thousands of tokens: needs the full-sort fallback
    x = torch.stack([peaky, flat, peaky, flat])
    ps = torch.tensor([[0.9], [0.5], [0.99], [0.95]])
    got = _outside_nucleus(x, ps)
    for i in range(4):
        want = _naive_outside_nucleus(x[i], float(ps[i]))
        # Float32 vs float64 cumulative sums may disagree on the single boundary token.
        assert (got[i] != want).sum() <= 1
    assert (~got[1]).sum() > 1024 and (~got[0]).sum() < 1024


def test_filters_stay_in_their_own_rows():
    torch.manual_seed(14)
    logits = torch.randn(50)
    n = 1000
    rows = [row(seed=i, top_k=3) if i % 2 == 0 else row(seed=i) for i in range(n)]
    toks = torch.tensor(sampler(logits.expand(n, -1), rows).token_ids)
    assert set(toks[0::2].tolist()) <= set(logits.topk(3).indices.tolist())
    assert len(set(toks[1::2].tolist())) > 10


@pytest.mark.parametrize("min_p,allowed", [(0.25, {0, 1}), (0.15, {0, 1, 2}), (0.7, {0}), (0.0, {0, 1, 2, 3, 4})])
def test_min_p(min_p, allowed):
    assert set(draws(LOGITS5, 2000, min_p=min_p).tolist()) == allowed


def test_temperature_extremes():
    torch.manual_seed(5)
    logits = torch.randn(1000)
    cold = draws(logits, 300, temperature=1e-4)
    assert set(cold.tolist()) == {int(logits.argmax())}
    cold_tiny = draws(logits, 100, temperature=1e-30)  # no inf - inf NaNs
    assert set(cold_tiny.tolist()) == {int(logits.argmax())}
    hot = draws(logits, 2000, temperature=100.0)
    assert len(set(hot.tolist())) > 800  # near uniform over 1000 tokens


# --- randomness -----------------------------------------------------------------------------------

def _run_steps(layout, steps_logits):
    """Sample several steps; layout(i) gives (rows_before, rows_after) around the tracked seeded row."""
    gen = torch.Generator().manual_seed(1234)
    params = SamplingParams(seed=1234, temperature=0.9, top_p=0.95, top_k=50)
    tokens = []
    for step, lg in enumerate(steps_logits):
        before, after = layout(step)
        rows = before + [SamplingRow(params, [1, 2], list(tokens), gen)] + after
        V = lg.shape[0]
        logits = torch.randn(len(rows), V)
        logits[len(before)] = lg
        tokens.append(sampler(logits, rows).token_ids[len(before)])
    return tokens


def test_same_seed_same_tokens_whatever_the_batch():
    torch.manual_seed(6)
    steps = [torch.randn(2000) for _ in range(12)]
    alone = _run_steps(lambda s: ([], []), steps)
    first = _run_steps(lambda s: ([], [row(), row(seed=99, top_k=3), row(temperature=0.0)]), steps)
    middle = _run_steps(lambda s: ([row(seed=5), row(temperature=0.0, repetition_penalty=1.2, prompt=[4])],
                                   [row(min_p=0.1)]), steps)
    shifting = _run_steps(lambda s: ([row(seed=s) for _ in range(s % 4)], [row() for _ in range(s % 3)]), steps)
    assert alone == first == middle == shifting
    assert len(set(alone)) > 1


def test_different_seeds_differ():
    # Over many draws two seeds almost never agree on a flat 1000-token distribution.
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    lg = torch.zeros(1, 1000)
    seq_a = [sampler(lg, [SamplingRow(SamplingParams(), [], [], ga)]).token_ids[0] for _ in range(50)]
    seq_b = [sampler(lg, [SamplingRow(SamplingParams(), [], [], gb)]).token_ids[0] for _ in range(50)]
    assert sum(x == y for x, y in zip(seq_a, seq_b)) < 5
    assert len(set(seq_a)) > 40
    # Same for seeds side by side in one batch.
    batch = sampler(torch.zeros(200, 1000), [row(seed=s) for s in range(200)]).token_ids
    assert len(set(batch)) > 150


def test_unseeded_rows_use_global_rng():
    logits = torch.zeros(3, 1000)
    torch.manual_seed(8)
    a = sampler(logits, [row() for _ in range(3)]).token_ids
    torch.manual_seed(8)
    b = sampler(logits, [row() for _ in range(3)]).token_ids
    c = sampler(logits, [row() for _ in range(3)]).token_ids
    assert a == b and a != c


# --- logprobs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_raw_log_softmax(dtype):
    torch.manual_seed(9)
    logits = (torch.randn(5, 3000) * 3).to(dtype)
    rows = [
        row(seed=1, logprobs=5, temperature=0.7, top_p=0.9, repetition_penalty=1.3, prompt=[1, 2, 3]),
        row(logprobs=0, temperature=0.0, frequency_penalty=1.0, output=[7, 7]),
        row(seed=2),
        row(seed=3, logprobs=20, top_k=10, min_p=0.05),
        row(logprobs=1, temperature=0.0),
    ]
    out = sampler(logits, rows)
    ref = torch.log_softmax(logits.float(), dim=-1)
    for i, r in enumerate(rows):
        if r.params.logprobs is None:
            assert out.logprobs[i] is None and out.top_logprobs[i] is None
            continue
        assert abs(out.logprobs[i] - float(ref[i, out.token_ids[i]])) < 1e-6
        top = out.top_logprobs[i]
        assert len(top) == r.params.logprobs
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        for tok, v in top:
            assert isinstance(tok, int) and abs(v - float(ref[i, tok])) < 1e-6
        if top:
            assert abs(values[0] - float(ref[i].max())) < 1e-6
            kth = float(ref[i].topk(len(top)).values[-1])
            assert abs(values[-1] - kth) < 1e-6
    assert out.top_logprobs[1] == []


def test_logprobs_larger_than_vocab_is_capped():
    out = sampler(LOGITS5.unsqueeze(0), [row(temperature=0.0, logprobs=50)])
    ids = [t for t, _ in out.top_logprobs[0]]
    assert ids[:3] == [0, 1, 2] and sorted(ids[3:]) == [3, 4]  # 3 and 4 tie


# --- the distribution itself ----------------------------------------------------------------------

# chi-square critical value for 4 degrees of freedom at p = 0.001.
CHI2_4DOF_999 = 18.47


def _chi2(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=len(probs)).double()
    expected = probs.double() * len(samples)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.6])
def test_sampled_distribution_matches_softmax(temperature):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    samples = draws(logits, 4000, seed0=10_000, temperature=temperature)
    assert _chi2(samples, torch.softmax(logits / temperature, -1)) < CHI2_4DOF_999


def test_global_rng_distribution_matches_softmax():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    torch.manual_seed(11)
    samples = torch.tensor(sampler(logits.expand(4000, -1), [row() for _ in range(4000)]).token_ids)
    assert _chi2(samples, torch.softmax(logits, -1)) < CHI2_4DOF_999


def test_filtered_distribution_is_renormalised():
    # top_k=3 of PROBS5 -> 5/9, 3/9, 1/9 over tokens 0..2.
    samples = draws(LOGITS5, 3000, seed0=20_000, top_k=3)
    counts = torch.bincount(samples, minlength=5).double() / len(samples)
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3], torch.tensor([5 / 9, 3 / 9, 1 / 9], dtype=torch.double), atol=0.03)


def test_empty_batch_and_shape_check():
    assert sampler(torch.empty(0, 10), []) == SamplerOutput([], [], [])
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, 10), [row()])


# --- min_tokens ------------------------------------------------------------------------------------

def test_min_tokens_masks_eos_and_stop_ids_until_reached_in_its_own_rows_only():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]] * 4)  # greedy order: 0 (EOS), 1 (stop id), 2
    held = dict(temperature=0.0, min_tokens=3, stop_token_ids=[1], _eos_token_ids=(0,))
    rows = [row(output=[2, 2], **held),              # 2 < 3 generated: EOS and the stop id are out
            row(output=[2, 2, 2], **held),           # reached: back to plain greedy
            row(output=[], temperature=0.0, stop_token_ids=[1], _eos_token_ids=(0,)),   # no min_tokens
            row(output=[], temperature=0.0, min_tokens=2, stop_token_ids=[1, 99])]      # 99 >= V is skipped
    before = logits.clone()
    assert sampler(logits, rows).token_ids == [2, 0, 0, 0]
    assert torch.equal(logits, before), "the caller's logits were written"


def test_min_tokens_masks_sampled_rows_and_keeps_raw_logprobs():
    logits = torch.tensor([2.0, 2.0, 0.0, 0.0])
    got = set(draws(logits, 500, min_tokens=1, stop_token_ids=[0], _eos_token_ids=(1,)).tolist())
    assert got == {2, 3}
    out = sampler(logits.unsqueeze(0), [row(temperature=0.0, min_tokens=1, _eos_token_ids=(0, 1), logprobs=1)])
    # Logprobs are the model's distribution (before any masking), like every other filter's.
    assert out.token_ids == [2] and out.logprobs[0] == pytest.approx(torch.log_softmax(logits, -1)[2].item())


@pytest.mark.parametrize("bad", [-1, 17, 2.5, True])
def test_min_tokens_must_lie_between_0_and_max_tokens(bad):
    from splitserve.sampling_params import InvalidRequestError
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(max_tokens=16, min_tokens=bad)
    assert info.value.param == "min_tokens"
    assert SamplingParams(max_tokens=16, min_tokens=16).min_tokens == 16


# --- logit_bias -----------------------------------------------------------------------------------

def test_logit_bias_steers_greedy_and_sampled_rows_only_in_their_own_rows():
    logits = LOGITS5.expand(4, -1).clone()
    rows = [row(temperature=0.0, logit_bias={3: 100.0}),
            row(temperature=0.0),
            row(seed=1, logit_bias={0: -100.0, 1: -100.0, 2: -100.0, 4: -100.0}),
            row(temperature=0.0, logit_bias={10**6: 5.0})]
    out = sampler(logits, rows)
    assert out.token_ids[:3] == [3, 0, 3]       # forced, untouched, the only token not banned
    assert out.token_ids[3] == 0                # an id beyond the logits is ignored here
    assert torch.equal(logits, LOGITS5.expand(4, -1))   # the caller's logits are not written
    banned = draws(LOGITS5, 200, logit_bias={0: -100.0})
    assert (banned != 0).all()


def test_logit_bias_keeps_raw_logprobs_and_min_tokens_holds():
    out = sampler(LOGITS5.unsqueeze(0), [row(temperature=0.0, logit_bias={2: 50.0}, logprobs=1)])
    assert out.token_ids == [2]
    assert out.logprobs[0] == pytest.approx(float(LOGITS5.log_softmax(-1)[2]))
    held = SamplingParams(temperature=0.0, stop_token_ids=[2], min_tokens=2, max_tokens=4, logit_bias={2: 100.0})
    assert sampler(LOGITS5.unsqueeze(0), [SamplingRow(held, [], [])]).token_ids != [2]


@pytest.mark.parametrize("bias", [{1: 100.5}, {1: float("nan")}, {-1: 1.0}, {1: True}])
def test_logit_bias_values_in_openai_range(bias):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(logit_bias=bias)
    assert info.value.param == "logit_bias"
