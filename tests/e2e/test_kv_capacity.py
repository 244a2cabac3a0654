"""Prompts that together exceed the workers' KV caches, through the whole stack: every stream finishes with the
output it has alone (the offline engine), no request hangs, and afterwards every pool is whole and no pin is left.

The issue's scenario (200 blocks of 16, prompts of 1,300-1,450 tokens, 8 streams of 400 tokens) scaled to the
test model's 1,024 positions: 100 blocks (1,600 tokens) per worker, prompts of 600-700 tokens, 200 tokens each.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from e2e_stack import wait_until_pools_whole
from splitserve import LLM, SamplingParams
from splitserve.launcher.stack import Stack

pytestmark = pytest.mark.timeout(400)

NUM_BLOCKS = 100
PROMPT_LENS = [640, 690, 610, 700, 650, 620, 680, 660]
MAX_TOKENS = 200
STREAM_DEADLINE_S = 180


@pytest.fixture(scope="module")
def small_cache_stack(llama_ckpt, tmp_path_factory):
    # Every prompt through the prefill worker and the store (--prefill-decider threshold): the scenario is the
    # decode worker's loads waiting for room, which prompts it prefills itself would skip.
    with Stack(model=str(llama_ckpt), prefill_workers=1, decode_workers=1, torch_threads=1,
               num_kv_blocks=NUM_BLOCKS, kv_checksum=True, prefill_decider="threshold",
               log_dir=str(tmp_path_factory.mktemp("capacity-logs"))) as running:
        yield running


def _prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(3, 1000) for _ in range(n)] for n in PROMPT_LENS]


async def _stream(http: httpx.AsyncClient, base_url: str, model: str, prompt: list[int]) -> tuple[str, str, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    text, finish, completion_tokens, events = "", None, None, 0
    async with http.stream("POST", f"{base_url}/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            events += 1
            assert events <= MAX_TOKENS + 2, "more events than tokens: a stream repeats itself"
            if event.get("usage"):
                completion_tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                text += choice["text"]
                finish = choice.get("finish_reason") or finish
    return text, finish, completion_tokens


def test_streams_beyond_the_kv_cache_all_finish_equal_to_offline(small_cache_stack, llama_ckpt):
    stack = small_cache_stack
    model = httpx.get(f"{stack.base_url}/models", timeout=10).json()["data"][0]["id"]
    prompts = _prompts()

    async def run_all():
        async with httpx.AsyncClient(timeout=STREAM_DEADLINE_S) as http:
            return await asyncio.wait_for(asyncio.gather(*(_stream(http, stack.base_url, model, p) for p in prompts)),
                                          STREAM_DEADLINE_S)

    started = time.monotonic()
    results = asyncio.run(run_all())
    wall = time.monotonic() - started
    reference = LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=512)
    expected = reference.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    for i, ((text, finish, completion_tokens), ref) in enumerate(zip(results, expected)):
        assert (finish, completion_tokens) == ("length", MAX_TOKENS), i
        assert text == ref.outputs[0].text, f"stream {i} differs from the offline engine"
    whole, stats, store = wait_until_pools_whole(stack)
    assert whole, (stats, store)
    print(f"capacity scenario: {len(prompts)} streams finished in {wall:.1f} s")
