"""Chooses one token per sequence for an engine step, batched over the whole step.

Everything that filters or reshapes the distribution (min_tokens, logit_bias, penalties, temperature, top-k, top-p,
min-p)
is done with tensor ops over the rows that need it; the only per-row Python work is the random
draw, which uses each request's own generator so a seeded request is reproducible no matter what
else shares its batch or where it sits in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from splitserve.sampling_params import SamplingParams

# Below this, logits / temperature could overflow to inf, so shift the row max to 0 first.
_SHIFT_BELOW_TEMPERATURE = 1e-2
# How many of the most likely tokens top-p looks at before falling back to a full sort.
_NUCLEUS_SEARCH = 1024


@dataclass
class SamplingRow:
    """One sequence being sampled this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far (before this step)
    generator: Optional[torch.Generator] = None  # None -> torch's global RNG


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Optional[float]]
    top_logprobs: list[Optional[list[tuple[int, float]]]]


def _index(idx: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(idx, dtype=torch.long, device=device)


def _scatter_coords(
    token_lists: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) coordinates for every token of every list, built in one go so that a batch
    costs one host->device copy rather than one per row."""
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    flat = [tok for toks in token_lists for tok in toks]
    rows = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)
    return rows.to(device), torch.tensor(flat, dtype=torch.long, device=device)


class Sampler:
    """Stateless; one instance can serve every step."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows), V]; got {tuple(logits.shape)} for {len(rows)} rows")
        B, V = logits.shape
        if B == 0:
            return SamplerOutput([], [], [])
        device = logits.device
        params = [r.params for r in rows]
        raw = logits.float()

        # Logprobs are reported against the model's own distribution (what HF comparisons use; for a guided row,
        # the grammar's masked one, as vLLM's), so take them before anything below reshapes the logits.
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        lp = None
        if lp_rows:
            lp = (raw if len(lp_rows) == B else raw[_index(lp_rows, device)]).log_softmax(dim=-1)

        # From here on `x` is written in place; never write into the caller's tensor.
        x = raw
        held = _min_tokens_held(rows, V, device)
        biased = [i for i, p in enumerate(params) if p.logit_bias]
        if held is not None or biased or any(p.has_penalties for p in params):
            if x.data_ptr() == logits.data_ptr():
                x = x.clone()
        if held is not None:
            x[held] = float("-inf")
        if biased:
            _add_logit_bias(x, rows, biased)
        if any(p.has_penalties for p in params):
            self._apply_penalties(x, rows)

        tokens = torch.empty(B, dtype=torch.long, device=device)
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if len(greedy_rows) == B:
            tokens = x.argmax(dim=-1)
        elif greedy_rows:
            gidx = _index(greedy_rows, device)
            tokens[gidx] = x[gidx].argmax(dim=-1)
        if random_rows:
            if len(random_rows) == B:
                sub, owned = x, x.data_ptr() != logits.data_ptr()
            else:
                sub, owned = x[_index(random_rows, device)], True
            sampled = self._sample(sub, [rows[i] for i in random_rows], owned)
            if len(random_rows) == B:
                tokens = sampled
            else:
                tokens[_index(random_rows, device)] = sampled

        token_ids = tokens.tolist()
        logprobs: list[Optional[float]] = [None] * B
        top_logprobs: list[Optional[list[tuple[int, float]]]] = [None] * B
        if lp is not None:
            chosen = lp.gather(1, tokens[_index(lp_rows, device)].unsqueeze(1)).squeeze(1).tolist()
            kmax = min(max(params[i].logprobs for i in lp_rows), V)
            top_v: list[list[float]] = [[] for _ in lp_rows]
            top_i: list[list[int]] = [[] for _ in lp_rows]
            if kmax > 0:
                vals, ids = lp.topk(kmax, dim=-1, sorted=True)
                top_v, top_i = vals.tolist(), ids.tolist()
            for j, i in enumerate(lp_rows):
                k = params[i].logprobs
                logprobs[i] = chosen[j]
                # A grammar's mask (engine/guided.py) leaves -inf: those tokens were never candidates.
                top_logprobs[i] = [(t, v) for t, v in zip(top_i[j][:k], top_v[j][:k]) if v != -math.inf]
        return SamplerOutput(token_ids, logprobs, top_logprobs)

    @staticmethod
    def _apply_penalties(x: torch.Tensor, rows: list[SamplingRow]) -> None:
        """In place on x [B, V]. Repetition first (HF semantics, prompt+output), then the OpenAI
        additive penalties, which only look at what the model itself said.

        Works on the (row, token) pairs that occurred rather than on [B, V] masks: a step has far
        fewer such pairs than B * V entries."""
        device = x.device
        rep_rows = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        if rep_rows:
            r, t = _scatter_coords([rows[i].prompt_token_ids + rows[i].output_token_ids for i in rep_rows], device)
            pen = torch.tensor([rows[i].params.repetition_penalty for i in rep_rows],
                               dtype=torch.float32, device=device)[r]
            r = _index(rep_rows, device)[r]
            vals = x[r, t]
            # Duplicated pairs all write the same value, so a plain (non-accumulating) put is exact.
            x[r, t] = torch.where(vals > 0, vals / pen, vals * pen)

        add_rows = [i for i, r in enumerate(rows)
                    if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0]
        if add_rows:
            r, t = _scatter_coords([rows[i].output_token_ids for i in add_rows], device)
            if t.numel() == 0:
                return
            freq = torch.tensor([rows[i].params.frequency_penalty for i in add_rows],
                                dtype=torch.float32, device=device)
            pres = torch.tensor([rows[i].params.presence_penalty for i in add_rows],
                                dtype=torch.float32, device=device)
            # Frequency: once per occurrence; presence: once per distinct (row, token).
            x.index_put_((_index(add_rows, device)[r], t), -freq[r], accumulate=True)
            pairs = torch.unique(r * x.shape[1] + t)
            ur, ut = pairs // x.shape[1], pairs % x.shape[1]
            x.index_put_((_index(add_rows, device)[ur], ut), -pres[ur], accumulate=True)

    @staticmethod
    def _sample(x: torch.Tensor, rows: list[SamplingRow], owned: bool) -> torch.Tensor:
        """x [n, V] penalized logits of the non-greedy rows; returns [n] token ids.

        Works in place when `owned` (x is a scratch copy) because at V ~ 128k every fresh [n, V]
        allocation costs about as much as the arithmetic itself."""
        n, V = x.shape
        device = x.device
        params = [r.params for r in rows]
        neg_inf = float("-inf")

        def scratch() -> torch.Tensor:
            nonlocal x, owned
            if not owned:
                x, owned = x.clone(), True
            return x

        def masked_rows(sel: list[int], fill_mask) -> None:
            """Apply fill_mask(sub) -> bool mask to the rows in sel, writing -inf into x."""
            if len(sel) == n:
                xs = scratch()
                xs.masked_fill_(fill_mask(xs), neg_inf)
            else:
                idx = _index(sel, device)
                sub = x[idx]
                scratch()[idx] = sub.masked_fill_(fill_mask(sub), neg_inf)

        temps = [p.temperature for p in params]
        if any(t != 1.0 for t in temps):
            xs = scratch()
            if min(temps) < _SHIFT_BELOW_TEMPERATURE:
                # Shift the max to 0 first: a tiny temperature then gives -huge/-inf, never inf - inf = NaN.
                xs.sub_(xs.amax(dim=-1, keepdim=True))
            xs.div_(torch.tensor(temps, dtype=torch.float32, device=device).unsqueeze(1))

        k_rows = [j for j, p in enumerate(params) if 0 < p.top_k < V]
        if k_rows:
            ks = torch.tensor([params[j].top_k for j in k_rows], dtype=torch.long, device=device).unsqueeze(1)
            kmax = max(params[j].top_k for j in k_rows)

            def below_kth(sub: torch.Tensor) -> torch.Tensor:
                kth = sub.topk(kmax, dim=-1, sorted=True).values.gather(1, ks - 1)
                return sub < kth  # ties with the k-th value survive

            masked_rows(k_rows, below_kth)

        p_rows = [j for j, p in enumerate(params) if p.top_p < 1.0]
        if p_rows:
            ps = torch.tensor([params[j].top_p for j in p_rows], dtype=torch.float32, device=device).unsqueeze(1)
            masked_rows(p_rows, lambda sub: _outside_nucleus(sub, ps))

        m_rows = [j for j, p in enumerate(params) if p.min_p > 0.0]
        if m_rows:
            # prob_i < min_p * prob_max  <=>  x_i - x_max < log(min_p); no softmax needed.
            log_min_p = torch.tensor([math.log(params[j].min_p) for j in m_rows],
                                     dtype=torch.float32, device=device).unsqueeze(1)
            masked_rows(m_rows, lambda sub: sub < sub.amax(dim=-1, keepdim=True) + log_min_p)

        # Unnormalised probabilities are enough: argmax(p / E) does not care about scale.
        xs = scratch()
        probs = xs.sub_(xs.amax(dim=-1, keepdim=True)).exp_()

        # argmax(p / E) with E ~ Exp(1) is an exact draw from p (the exponential race), and it lets each
        # row's noise come from its own generator with a fixed shape [V], independent of the batch.
        # E = -log(U) rather than exponential_(): same law, several times cheaper on CPU, and U < 1
        # keeps E > 0, so there is no division by zero.
        noise = torch.empty_like(probs)
        shared = [j for j, r in enumerate(rows) if r.generator is None]
        if len(shared) == n:
            noise.uniform_()
        elif shared:
            noise[_index(shared, device)] = torch.empty(len(shared), V, device=device).uniform_()
        for j, r in enumerate(rows):
            g = r.generator
            if g is None:
                continue
            if g.device == noise.device:
                noise[j].uniform_(generator=g)
            else:
                noise[j].copy_(torch.empty(V, device=g.device).uniform_(generator=g))
        return probs.div_(noise.log_().neg_()).argmax(dim=-1)


def skip_draws(generator: torch.Generator, draws: int, vocab_size: int) -> None:
    """Moves `generator` past the draws `draws` sampled tokens took (one [vocab_size] uniform draw each, as
    `_sample` makes): a seeded request continued in another worker (disaggregation, migration) then samples
    the same tokens as one worker doing everything."""
    for _ in range(draws):
        torch.empty(vocab_size, device=generator.device).uniform_(generator=generator)


def _min_tokens_held(rows: list[SamplingRow], vocab_size: int,
                     device: torch.device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(row, token) coordinates of the ids that must not be sampled yet: a row below its min_tokens cannot pick
    EOS or a stop id. None when no row is held. Ids outside the logits (>= V) cannot be sampled anyway."""
    held = [(i, [t for t in r.params.min_tokens_blocked_ids if t < vocab_size]) for i, r in enumerate(rows)
            if len(r.output_token_ids) < r.params.min_tokens]
    held = [(i, ids) for i, ids in held if ids]
    if not held:
        return None
    r, t = _scatter_coords([ids for _, ids in held], device)
    return _index([i for i, _ in held], device)[r], t


def _add_logit_bias(x: torch.Tensor, rows: list[SamplingRow], biased: list[int]) -> None:
    """In place on x [B, V]: each biased row's logit_bias added to its tokens' logits (before penalties, as
    vLLM's logits processors; a token held back by min_tokens stays at -inf). Ids >= V do not exist here."""
    V = x.shape[1]
    items = [[(t, b) for t, b in rows[i].params.logit_bias.items() if t < V] for i in biased]
    r, t = _scatter_coords([[token for token, _ in row] for row in items], x.device)
    if t.numel() == 0:
        return
    bias = torch.tensor([b for row in items for _, b in row], dtype=x.dtype, device=x.device)
    x.index_put_((_index(biased, x.device)[r], t), bias, accumulate=True)


def _outside_nucleus(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask of tokens outside each row's nucleus: the smallest most-likely set whose mass reaches top_p
    (tokens tied with the last one kept survive too).

    A full sort of V ~ 128k per row is the expensive part, and the nucleus is nearly always within
    the top few hundred tokens, so look there first and sort fully only the rows where it is not."""
    probs = x.softmax(dim=-1)
    V = probs.shape[1]
    top = probs.topk(min(V, _NUCLEUS_SEARCH), dim=-1, sorted=True).values
    cut, mass = _nucleus_cut(top, top_p)
    if top.shape[1] < V:
        # Where the searched tokens' mass falls short of top_p the nucleus may extend beyond them.
        unresolved = (mass < top_p).squeeze(1).nonzero().squeeze(1)
        if unresolved.numel():
            full = probs[unresolved].sort(dim=-1, descending=True).values
            cut[unresolved] = _nucleus_cut(full, top_p[unresolved])[0]
    return probs < cut


def _nucleus_cut(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability of the last token kept, total mass seen), given probabilities sorted descending."""
    cum = sorted_probs.cumsum(dim=-1)
    n_keep = (cum - sorted_probs < top_p).sum(dim=-1, keepdim=True).clamp_min_(1)  # always keep the top token
    return sorted_probs.gather(1, n_keep - 1), cum[:, -1:]
