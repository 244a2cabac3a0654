"""The engine makes the text: LLM.generate and the serving path (AsyncEngine deltas, split over a prefill and a
decode engine, or resumed on another engine after a failure) give the same text, stop strings cut alike."""

from __future__ import annotations

import asyncio

import pytest

from splitserve import LLM, SamplingParams
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.output_text import OutputText

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPT = list(range(1, 30))


class _BytesTokenizer:
    """Unit-test stand-in: each id is a few bytes; ids 7 and 8 are the two bytes of "é"; 0 is special."""

    @staticmethod
    def _bytes(token_id: int) -> bytes:
        return {0: b"<s>", 7: b"\xc3", 8: b"\xa9"}.get(token_id, f" w{token_id}".encode())

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        data = b"".join(self._bytes(t) for t in ids if not (skip_special_tokens and t == 0))
        return data.decode("utf-8", errors="replace")


def _stream(ids, params, prompt=(1, 2)):
    text = OutputText(_BytesTokenizer(), list(prompt), params)
    deltas = [text.push(t) for t in ids]
    return text, deltas


def test_text_never_shows_part_of_a_stop_string_and_ends_before_it():
    params = SamplingParams(stop=[" w5 w6"])
    text, deltas = _stream([3, 4, 5, 6, 9], params)
    assert deltas == [" w3", " w4", "", "", ""] and text.stop_string == " w5 w6"
    assert text.finish() == "" and text.text == " w3 w4"


def test_held_back_text_is_released_when_it_cannot_start_a_stop_string_or_at_the_end():
    text, deltas = _stream([3, 5, 4, 5], SamplingParams(stop=[" w5 w6"]))
    assert deltas == [" w3", "", " w5 w4", ""] and text.stop_string is None
    assert text.finish() == " w5" and text.text == " w3 w5 w4 w5"


def test_a_character_is_never_split_and_an_unfinished_one_ends_as_replacement():
    text, deltas = _stream([3, 7, 8, 7], SamplingParams())
    assert deltas == [" w3", "", "é", ""]
    assert text.finish() == "\ufffd"


def test_stop_strings_in_the_first_min_tokens_are_text():
    text, deltas = _stream([5, 6, 5, 6], SamplingParams(stop=[" w6"], min_tokens=2, max_tokens=8))
    assert deltas == [" w5", " w6", " w5", ""] and text.stop_string == " w6" and text.text == " w5 w6 w5"


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(stop=[" w5 w7", "é w9"]),
                                    SamplingParams(stop=["w5"], min_tokens=3, max_tokens=16)],
                         ids=["plain", "stop-strings", "min-tokens"])
def test_a_replayed_sequence_goes_on_exactly_where_the_first_left_off(params):
    ids = [3, 5, 7, 8, 5, 7, 8, 9, 5, 4]
    whole, deltas = _stream(ids, params)
    end = whole.finish()
    for split in range(1, len(ids)):
        resumed = OutputText(_BytesTokenizer(), [1, 2], params)
        resumed.replay(ids[:split])
        rest = [resumed.push(t) for t in ids[split:]]
        assert rest == deltas[split:] and resumed.finish() == end


# ---- through the real engine -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(llama_ckpt):
    return LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=128)


def _serve(engine, request_id, prompt, params, **kw):
    """The deltas of one request through AsyncEngine, as a worker streams them."""
    async def main():
        runner = AsyncEngine(engine)
        runner.start()
        try:
            return [delta async for delta in runner.generate(request_id, prompt, params, **kw)]
        finally:
            await runner.stop()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def stop_string(llm):
    text = llm.generate([PROMPT], GREEDY)[0].outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    return stop


@pytest.mark.parametrize("case", ["plain", "stop", "stop-after-min-tokens"])
def test_serving_deltas_and_every_handoff_give_the_offline_text(llm, stop_string, case):
    params = {"plain": GREEDY, "stop": GREEDY.replace(stop=[stop_string]),
              "stop-after-min-tokens": GREEDY.replace(stop=[stop_string], min_tokens=3)}[case]
    offline = llm.generate([PROMPT], params)[0].outputs[0]
    if case != "plain":
        assert offline.finish_reason == "stop" and offline.stop_reason == stop_string
    engine = llm.engine

    deltas = _serve(engine, "whole", PROMPT, params)
    assert [t for d in deltas for t in d.token_ids] == offline.token_ids
    assert "".join(d.text for d in deltas) == offline.text
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == (offline.finish_reason, offline.stop_reason)

    # Prefill on one engine (first token only; held-back text stays held), decode on another, as the workers do.
    [first] = _serve(engine, "prefill", PROMPT, params.replace(max_tokens=1, min_tokens=min(params.min_tokens, 1)))
    first_text = first.text[:len(first.text) - len(first.end_text)]
    rest = _serve(engine, "decode", PROMPT, params, produced_token_ids=first.token_ids[:1])
    assert first_text + "".join(d.text for d in rest) == offline.text

    # A decode worker dies after any number of tokens: the next one replays them and its text goes on exactly.
    for produced in range(1, len(deltas) - 1):
        streamed = "".join(d.text for d in deltas[:produced])
        resumed = _serve(engine, f"resume-{produced}", PROMPT, params,
                         produced_token_ids=offline.token_ids[:produced])
        assert streamed + "".join(d.text for d in resumed) == offline.text
