"""Guided decoding (engine/guided.py): the mask is exactly what xgrammar's own matcher allows, unguided rows are
untouched, a replayed matcher equals the incremental one, outputs follow their grammar (through preemption and
continuation elsewhere), and the grammar's end ends the sequence."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch
import xgrammar as xgr

from json_schemas import MAX_TOKENS, random_schemas
from splitserve import LLM, InvalidRequestError, SamplingParams, StructuredOutput
from splitserve.engine.guided import GrammarMasks, choice_grammar
from splitserve.proto_convert import sampling_params_from_proto, sampling_params_to_proto

VOCAB = 1000
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["n", "tags"],
          "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                         "name": {"type": "string", "maxLength": 3}}}
SPECS = [StructuredOutput(json_schema=json.dumps(SCHEMA)), StructuredOutput(json_object=True),
         StructuredOutput(regex=r"[a-c]{2}-\d{1,2}"), StructuredOutput(choice=("yes", "no", 'say "hi"\n')),
         StructuredOutput(grammar='root ::= "x" ("," "x")*')]


@pytest.fixture(scope="module")
def llm(llama_ckpt):
    return LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=256)


@pytest.fixture(scope="module")
def grammars(llm):
    return llm.engine.grammars


def _allowed_by_xgrammar(matcher: xgr.GrammarMatcher) -> set[int]:
    """The reference: every id the matcher itself accepts as the next token (each tried, then rolled back)."""
    allowed = set()
    for token in range(VOCAB):
        if matcher.accept_token(token):
            allowed.add(token)
            matcher.rollback(1)
    return allowed


@pytest.fixture(scope="module")
def control_tokens(llm) -> set[int]:
    """Ids whose bytes hold a raw control character (never in compact JSON; xgrammar 0.2.9 allows them in
    length-bounded strings, mlc-ai/xgrammar#800, so the engine masks them for JSON)."""
    return {t for t in range(VOCAB) if any(b < 0x20 for b in llm.engine.token_pieces(t)[1])
            and t not in llm.engine.eos_token_ids}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_mask_is_what_xgrammar_accepts_and_unguided_rows_are_untouched(grammars, control_tokens, spec):
    rng = random.Random(0)
    json_kind = spec.kind.startswith("json")
    guided = grammars.start(spec)
    reference = xgr.GrammarMatcher(grammars.compile(spec))
    masks = GrammarMasks(VOCAB)
    for _ in range(12):
        logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        before = logits.clone()
        masks.apply(logits, [None, guided, None])       # a guided row between two unguided ones
        assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
        finite = torch.isfinite(logits[1])
        expected = _allowed_by_xgrammar(reference) - (control_tokens if json_kind else set())
        assert set(finite.nonzero().squeeze(1).tolist()) == expected
        assert torch.equal(logits[1][finite], before[1][finite])     # allowed logits keep their values
        token = rng.choice(finite.nonzero().squeeze(1).tolist())
        assert guided.accept(token) and reference.accept_token(token)
        if guided.terminated:
            break


def test_unguided_batch_is_left_alone():
    logits = torch.randn(4, VOCAB)
    before = logits.clone()
    GrammarMasks(VOCAB).apply(logits, [None] * 4)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_replayed_matcher_equals_the_incremental_one(llm, grammars, spec):
    [out] = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=40, temperature=1.0, seed=3, structured_output=spec))
    tokens = out.outputs[0].token_ids
    incremental = grammars.start(spec)
    masks = GrammarMasks(VOCAB)
    for k in range(len(tokens)):
        logits = torch.zeros(2, VOCAB)
        masks.apply(logits, [incremental, grammars.start(spec, tokens[:k])])
        assert torch.equal(logits[0], logits[1]), f"masks differ after {k} tokens"
        assert incremental.accept(tokens[k])


def test_outputs_follow_their_grammar_greedy_and_sampled(llm):
    schemas = random_schemas(6, seed=1)
    for temperature in (0.0, 1.0):
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=i,
                                 structured_output=StructuredOutput(json_schema=json.dumps(schema)))
                  for i, schema in enumerate(schemas)]
        outs = llm.generate([[10 + i, 20, 30] for i in range(len(schemas))], params)
        for schema, out in zip(schemas, outs):
            completion = out.outputs[0]
            assert completion.finish_reason == "stop", completion.text
            jsonschema.validate(json.loads(completion.text), schema)     # strict: no raw control characters
    outs = llm.generate([[1, 2], [3, 4], [5, 6]], [SamplingParams(max_tokens=64, temperature=1.0, seed=s,
                                                                   structured_output=spec) for s, spec in
                                                    enumerate([SPECS[2], SPECS[3], SPECS[4]])])
    regex, choice, grammar = [o.outputs[0] for o in outs]
    assert re.fullmatch(r"[a-c]{2}-\d{1,2}", regex.text) and regex.finish_reason == "stop"
    assert choice.text in ("yes", "no", 'say "hi"\n') and choice.finish_reason == "stop"
    assert re.fullmatch(r"x(,x)*", grammar.text) and grammar.finish_reason == "stop"


def test_the_grammar_ends_the_sequence_even_with_ignore_eos(llm):
    spec = StructuredOutput(choice=("yes", "no"))
    [out] = llm.generate([[7, 8]], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True,
                                                  structured_output=spec))
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text in ("yes", "no")
    assert out.outputs[0].token_ids[-1] in llm.engine.eos_token_ids   # the end token the grammar allowed
    [cut] = llm.generate([[7, 8]], SamplingParams(max_tokens=3, temperature=0.0,
                                                  structured_output=StructuredOutput(json_schema=json.dumps(SCHEMA))))
    assert cut.outputs[0].finish_reason == "length" and len(cut.outputs[0].token_ids) == 3


def test_continuing_elsewhere_replays_the_grammar(llm):
    """Decode after prefill, or after a decode worker's failure: the produced tokens rebuild the matcher, and the
    greedy continuation equals the uninterrupted run."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                            structured_output=StructuredOutput(json_schema=json.dumps(SCHEMA)))
    [whole] = llm.generate([[9, 9, 9]], params)
    tokens = whole.outputs[0].token_ids
    for k in (1, len(tokens) // 2):
        llm.engine.add_request(f"continued-{k}", [9, 9, 9], params, produced_token_ids=tokens[:k])
        finished = []
        while llm.engine.has_unfinished_requests():
            finished += llm.engine.step()
        assert finished[0].outputs[0].token_ids == tokens
        assert finished[0].outputs[0].text == whole.outputs[0].text
    with pytest.raises(InvalidRequestError) as info:     # tokens the grammar cannot have produced
        llm.engine.add_request("bad", [9, 9, 9], params, produced_token_ids=[tokens[1]])
    assert info.value.param == "produced_token_ids"


def test_preempted_sequences_keep_their_grammar(llama_ckpt):
    engine = LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=16, block_size=16).engine
    schemas = random_schemas(4, seed=5)
    prompts = [[(7 * i + j) % VOCAB + 1 for j in range(100)] for i in range(len(schemas))]
    for i, (prompt, schema) in enumerate(zip(prompts, schemas)):
        engine.add_request(f"p{i}", prompt, SamplingParams(max_tokens=200, temperature=1.0, seed=i,
                           structured_output=StructuredOutput(json_schema=json.dumps(schema))))
    finished = []
    while engine.has_unfinished_requests():
        finished += engine.step()
    assert engine.stats()["preemptions"] > 0     # the scenario did put the cache under pressure
    for out in finished:
        completion = out.outputs[0]
        if completion.finish_reason == "stop":
            jsonschema.validate(json.loads(completion.text), schemas[int(out.request_id[1:])])
        else:    # the cache caps a sequence at 16 * 16 tokens: what it wrote is still on the grammar's path
            assert completion.finish_reason == "length"
            spec = StructuredOutput(json_schema=json.dumps(schemas[int(out.request_id[1:])]))
            engine.grammars.start(spec, completion.token_ids)    # raises if a token left the grammar


def test_logprobs_are_those_of_the_masked_distribution(llm):
    spec = StructuredOutput(choice=("yes", "no"))
    [out] = llm.generate([[4, 5]], SamplingParams(max_tokens=10, temperature=0.0, logprobs=5,
                                                  structured_output=spec))
    first = out.outputs[0].logprobs[0]
    allowed = {t for t in range(VOCAB) if llm.engine.tokenizer.decode([t]) and
               any(c.startswith(llm.engine.tokenizer.decode([t])) for c in ("yes", "no"))}
    assert set(first) <= allowed and len(first) >= 1
    # Only allowed tokens carry mass: their probabilities sum to 1 (the unmasked model spreads it over 1000).
    reference = xgr.GrammarMatcher(llm.engine.grammars.compile(spec))
    assert set(first) <= _allowed_by_xgrammar(reference)
    assert all(lp > -float("inf") for lp in first.values())
    assert sum(torch.tensor(list(first.values())).exp().tolist()) <= 1.0 + 1e-5


@pytest.mark.parametrize("spec, message", [
    (StructuredOutput(json_schema="{not json"), "not valid JSON"),
    (StructuredOutput(json_schema='{"type": "frobnicate"}'), "frobnicate"),
    (StructuredOutput(regex="(ab"), "parenthesis"),
    (StructuredOutput(grammar="root ::= undefined_rule"), "undefined_rule"),
])
def test_invalid_grammars_are_the_users_error_and_the_engine_goes_on(llm, spec, message):
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([[1, 2]], SamplingParams(max_tokens=4, structured_output=spec))
    assert info.value.param == "structured_outputs" and message in str(info.value)
    assert "/project/" not in str(info.value)     # xgrammar's source location is not the user's business
    assert llm.generate([[1, 2]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_structured_output_checks_and_travels_on_the_wire():
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutput(regex="a", choice=("a",))
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutput()
    with pytest.raises(InvalidRequestError, match="non-empty"):
        StructuredOutput(choice=())
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(min_tokens=2, structured_output=StructuredOutput(json_object=True))
    assert info.value.param == "min_tokens"
    for spec in SPECS:
        params = SamplingParams(max_tokens=7, structured_output=spec)
        assert sampling_params_from_proto(sampling_params_to_proto(params)).structured_output == spec
    assert sampling_params_from_proto(sampling_params_to_proto(SamplingParams())).structured_output is None


def test_choice_grammar_escapes_quotes_and_newlines(llm, grammars):
    assert choice_grammar(['a"b', "c\nd"]) == 'root ::= "a\\"b" | "c\\nd"'
    guided = grammars.start(StructuredOutput(choice=('a"b', "c\nd")))
    for token in llm.engine.tokenizer.encode("c\nd", add_special_tokens=False):
        assert guided.accept(token)
    assert not guided.terminated and guided.accept(min(llm.engine.eos_token_ids)) and guided.terminated


def test_a_token_outside_the_grammar_ends_the_sequence_with_an_error_and_is_counted(llama_ckpt, monkeypatch):
    engine = LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=32).engine
    [outside] = engine.tokenizer.encode("a", add_special_tokens=False)     # never allowed by the regex below

    def faulty_mask(logits, grammars):     # a masking fault: every row picks `outside`
        logits[:, outside] = 1e4

    monkeypatch.setattr(engine.runner.grammar_masks, "apply", faulty_mask)
    engine.add_request("unmasked", [3, 4, 5], SamplingParams(max_tokens=8, temperature=0.0,
                                                             structured_output=StructuredOutput(regex="z+")))
    engine.add_request("plain", [3, 4, 5], SamplingParams(max_tokens=2, temperature=0.0))
    finished = []
    while engine.has_unfinished_requests():
        finished += engine.step()
    assert {out.request_id: out.outputs[0].finish_reason for out in finished} == {"unmasked": "error",
                                                                                    "plain": "length"}
    assert engine.stats()["guided_rejected_tokens"] == 1 and engine.stats()["guided_sequences"] == 1


def test_xgrammar_is_loaded_only_by_the_first_guided_request(llama_ckpt):
    """Engines that never see a guided request pay nothing for it at start: no import, no vocabulary tables."""
    import subprocess
    import sys

    script = (
        "import sys; from splitserve import LLM, SamplingParams; from splitserve.sampling_params import "
        "StructuredOutput\n"
        f"llm = LLM({str(llama_ckpt)!r}, device='cpu', dtype='float32', num_kv_blocks=64)\n"
        "llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0.0))\n"
        "before = 'xgrammar' in sys.modules\n"
        "out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0.0, "
        "structured_output=StructuredOutput(choice=['yes', 'no'])))\n"
        "print(before, 'xgrammar' in sys.modules, out[0].outputs[0].text)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    before, after, text = result.stdout.split()
    assert (before, after) == ("False", "True") and text in ("yes", "no")
