"""What a worker announces to Redis for the gateway's prefill choice: its queued prompt tokens, the prefill rate
its engine measured on real prefill steps, its KV write rate (of writes big enough to measure one), the time of a
step that only decoded, and the KV bytes of one token."""

from __future__ import annotations

import asyncio

from splitserve import LLM, SamplingParams
from splitserve.engine.async_engine import AsyncEngine
from splitserve.kv_transfer.metrics import KV_PUT_RATE, MIN_MEASURED_PUT_BLOCKS, record_transfer
from splitserve.serving.engine_worker import load_report


def test_the_report_carries_measured_rates_and_the_queue(llama_ckpt):
    engine = LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=64).engine
    runner = AsyncEngine(engine)
    assert load_report(runner)["prefill_tokens_per_s"] == 0          # nothing measured yet
    one = SamplingParams(max_tokens=1, temperature=0.0)

    async def main():
        runner.start()
        try:
            async for _ in runner.generate("short", list(range(1, 20)), one):   # too small a step to measure
                pass
            assert runner.prefill_rate.rate is None
            async for _ in runner.generate("long", list(range(1, 200)), one):
                pass
            assert runner.decode_step_rate.rate is None                       # no step only decoded yet
            async for _ in runner.generate("decoded", list(range(1, 20)), SamplingParams(max_tokens=4)):
                pass
        finally:
            await runner.stop()

    asyncio.run(main())
    before = KV_PUT_RATE.rate
    record_transfer("put", 10.0, 4 * 4096, 4)       # a warm-up-sized write: its time is fixed cost, not bandwidth
    assert KV_PUT_RATE.rate == before
    record_transfer("put", 0.5, 10**6, MIN_MEASURED_PUT_BLOCKS)
    report = load_report(runner)
    assert report["prefill_tokens_per_s"] > 0
    assert report["kv_put_bytes_per_s"] > 0
    assert report["decode_step_us"] > 0
    layout = engine.layout
    assert report["kv_bytes_per_token"] == layout.bytes_per_block // layout.block_size > 0
    assert report["queued_prompt_tokens"] == 0

    engine.add_request("queued", list(range(1, 100)), one)   # not stepped: all 99 prompt tokens wait
    assert engine.stats()["queued_prompt_tokens"] == 99
