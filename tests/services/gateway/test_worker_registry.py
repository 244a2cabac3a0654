"""splitserve.worker_registry against a real Redis: announce, read, staleness, removal, Redis being down."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from splitserve.worker_registry import WorkerAnnouncer, WorkerInfo, read_workers, registry_key

from .conftest import free_port


def test_announced_worker_is_read_back_with_its_load(loop_thread, clean_redis):
    async def scenario():
        announcer = WorkerAnnouncer(clean_redis, "decode", "10.0.0.1:50060", "m", lambda: {
            "num_running": 3, "num_waiting": 1, "kv_blocks_free": 90, "kv_blocks_total": 100,
            "queued_prompt_tokens": 700, "prefill_tokens_per_s": 2500, "kv_put_bytes_per_s": 10**9,
            "kv_bytes_per_token": 4096}, interval_s=0.1)
        client = aioredis.from_url(clean_redis)
        try:
            await announcer.start()
            [info] = await read_workers(client, "decode")
            assert info == WorkerInfo("10.0.0.1:50060", "decode", "m", info.updated, 3, 1, 90, 100, 700, 2500, 10**9,
                                      4096)
            assert abs(info.updated - time.time()) < 5
            assert await read_workers(client, "prefill") == []
            first = info.updated
            await asyncio.sleep(0.35)
            [again] = await read_workers(client, "decode")
            assert again.updated > first                            # kept fresh
            raw = json.loads(await client.hget(registry_key("decode"), "10.0.0.1:50060"))
            assert set(raw) == {"address", "kind", "model", "updated", "num_running", "num_waiting",
                                "kv_blocks_free", "kv_blocks_total", "queued_prompt_tokens", "prefill_tokens_per_s",
                                "kv_put_bytes_per_s", "kv_bytes_per_token", "decode_step_us"}
            await announcer.stop()
            assert await read_workers(client, "decode") == []       # removed on stop
        finally:
            await client.aclose()

    loop_thread.run(scenario())


def test_stale_and_malformed_entries_are_ignored(loop_thread, clean_redis):
    async def scenario():
        client = aioredis.from_url(clean_redis)
        try:
            stale = WorkerInfo("10.0.0.2:1", "prefill", "m", time.time() - 60)
            fresh = WorkerInfo("10.0.0.3:1", "prefill", "m", time.time())
            await client.hset(registry_key("prefill"), mapping={stale.address: stale.to_json(),
                                                                fresh.address: fresh.to_json(),
                                                                "10.0.0.4:1": "{not json"})
            assert [w.address for w in await read_workers(client, "prefill", max_age_s=5)] == ["10.0.0.3:1"]
            assert len(await read_workers(client, "prefill", max_age_s=120)) == 2
        finally:
            await client.aclose()

    loop_thread.run(scenario())


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError):
        registry_key("tokenizer")


def test_redis_down_or_load_failing_never_raises_into_the_worker(loop_thread):
    def errors(op: str) -> float:
        return REGISTRY.get_sample_value("splitserve_worker_registry_errors_total", {"kind": "decode", "op": op}) or 0

    async def scenario():
        before_announce, before_load = errors("announce"), errors("load")
        nowhere = f"redis://127.0.0.1:{free_port()}/0"
        announcer = WorkerAnnouncer(nowhere, "decode", "10.0.0.5:1", "m", lambda: {}, interval_s=0.05)
        await announcer.start()                    # does not raise
        await asyncio.sleep(0.2)
        await announcer.stop()                     # nor does this
        assert errors("announce") >= before_announce + 2

        def broken_load():
            raise RuntimeError("stats unavailable")
        failing = WorkerAnnouncer(nowhere, "decode", "10.0.0.6:1", "m", broken_load)
        assert await failing.announce_once() is False
        assert errors("load") == before_load + 1
        await failing.stop()

    loop_thread.run(scenario())


def test_async_load_fn(loop_thread, clean_redis):
    async def load():
        return {"num_running": 7}

    async def scenario():
        announcer = WorkerAnnouncer(clean_redis, "prefill", "10.0.0.7:1", "m", load)
        client = aioredis.from_url(clean_redis)
        try:
            assert await announcer.announce_once() is True
            [info] = await read_workers(client, "prefill")
            assert info.num_running == 7 and info.kv_blocks_total == 0
        finally:
            await announcer.stop()
            await client.aclose()

    loop_thread.run(scenario())
