"""One running stack (real processes: Redis, Envoy, tokenizer, kv-store, prefill, decode, gateway) per module.

The model is the session's tiny Llama test checkpoint (init range 0.1, so greedy choices are not decided by
float noise); the offline reference is `LLM.generate` on the same folder, in this process.
"""

from __future__ import annotations

import asyncio
from typing import Optional

import grpc
import pytest

from splitserve.launcher.stack import Stack
from splitserve.v1 import common_pb2, decode_pb2_grpc, kv_store_pb2, kv_store_pb2_grpc, prefill_pb2_grpc

API_KEY = "test-key"


@pytest.fixture(scope="module")
def stack(llama_ckpt, tmp_path_factory):
    # Every prompt through the prefill worker, the kv-store and the decode worker (--prefill-decider threshold),
    # the path these tests check (transfers, pins, checksums); test_prefill_path.py checks the predicted choice.
    with Stack(model=str(llama_ckpt), prefill_workers=1, decode_workers=1, api_key=API_KEY, torch_threads=1,
               num_kv_blocks=256, kv_checksum=True, prefill_decider="threshold",
               log_dir=str(tmp_path_factory.mktemp("stack-logs"))) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack):
    """The official client, on the module's stack."""
    import openai

    return openai.OpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def reference_llm(llama_ckpt):
    from splitserve import LLM

    return LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=512)


def _call(address: str, stub_class, method: str, request):
    async def go():
        async with grpc.aio.insecure_channel(address) as channel:
            return await getattr(stub_class(channel), method)(request, timeout=10)

    return asyncio.run(go())


def engine_stats(stack, exclude: frozenset = frozenset()) -> list:
    """EngineStats of every prefill and decode worker (but those at `exclude` addresses), from their Stats RPCs."""
    stats = []
    for address in stack.addresses["prefill"]:
        if address not in exclude:
            stats.append(_call(address, prefill_pb2_grpc.PrefillStub, "Stats",
                               common_pb2.WorkerStatsRequest()).engine)
    for address in stack.addresses["decode"]:
        if address not in exclude:
            stats.append(_call(address, decode_pb2_grpc.DecodeStub, "Stats", common_pb2.WorkerStatsRequest()).engine)
    return stats


def kv_store_stats(stack):
    [address] = stack.addresses["kv-store"]
    return _call(address, kv_store_pb2_grpc.KVStoreStub, "Stats", kv_store_pb2.KVStoreStatsRequest())


def wait_until_pools_whole(stack, timeout_s: float = 15.0, exclude: frozenset = frozenset()):
    """Polls until no worker runs anything and every block is free (cached blocks count as free); returns stats.
    `exclude`: addresses of workers known dead."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine_stats(stack, exclude)
        store = kv_store_stats(stack)
        whole = all(s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_free == s.kv_blocks_total
                    for s in stats) and store.pinned_blocks == 0
        if whole or time.monotonic() > deadline:
            return whole, stats, store
        time.sleep(0.2)


def gateway_metric(stack, name: str, replica: Optional[int] = None) -> float:
    """The sum of the gateways' samples whose line starts with `name` (labels may follow); of one gateway replica
    when `replica` is its index."""
    ports = stack.metrics_ports["gateway"]
    return sum(metric(port, name) for port in (ports if replica is None else [ports[replica]]))


def metric(port: int, name: str) -> float:
    """The sum of the samples whose line starts with `name` at the metrics port of one service."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def prefix_tokens(k: int) -> list[int]:
    """A 160-token prompt prefix (10 blocks of 16), a different one for each k."""
    return [3 + (k * 31 + 7 * i) % 250 for i in range(160)]


def complete(base_url: str, prompt: list[int], max_tokens: int = 2):
    """A greedy completion of token ids at `base_url` (Envoy's or one gateway's /v1); the httpx response."""
    import httpx

    model = httpx.get(f"{base_url}/models", timeout=10).json()["data"][0]["id"]
    return httpx.post(f"{base_url}/completions", timeout=60, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0})


def index_holders(stack, tokens: list[int], kind: str = "prefill") -> list[int]:
    """Leading blocks of `tokens` the Redis prefix index says each worker of `kind` holds, in the order of
    stack.addresses[kind] (0 while Redis is unreachable)."""
    import redis

    from splitserve.kv_blocks.hashing import chain_block_hashes
    from splitserve.kv_events.index import LOOKUP_LUA, PUBLISHERS_KEY, PublisherInfo, lookup_args

    client = redis.Redis.from_url(stack.redis_url, socket_timeout=2)
    try:
        infos = [PublisherInfo.from_json(raw) for raw in client.hgetall(PUBLISHERS_KEY).values()]
        [info] = {(i.block_size, i.model_id) for i in infos if i.kind == kind}
        ids = [f"{kind}|{a}" for a in stack.addresses[kind]]
        chain = chain_block_hashes(tokens, *info)
        answer = client.eval(LOOKUP_LUA, 0, *lookup_args(chain, ids))   # (confirmed, speculative) each
        return [int(run) for run in answer[::2]]
    except (redis.RedisError, ValueError):
        return [0] * len(stack.addresses[kind])
    finally:
        client.close()


def wait_until(condition, timeout_s: float = 30.0):
    """Polls `condition` until it returns something true; that."""
    import time

    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)
    return result


def prefix_queries(stack, kind: str) -> list[int]:
    """Prompt tokens each worker of `kind` looked up in its prefix cache so far: one request adds to one worker."""
    stub = prefill_pb2_grpc.PrefillStub if kind == "prefill" else decode_pb2_grpc.DecodeStub
    request = common_pb2.WorkerStatsRequest()
    return [_call(a, stub, "Stats", request).engine.prefix_cache_queries for a in stack.addresses[kind]]


def held_by_one(stack, tokens: list[int], kind: str = "prefill") -> int:
    """Waits until the index shows the prefix (9 blocks or more) on exactly one worker of `kind`; its index."""
    def one_holder():
        runs = index_holders(stack, tokens, kind)
        return runs if max(runs) >= 9 and sorted(runs)[-2] == 0 else None

    runs = wait_until(one_holder)
    return runs.index(max(runs))


def second_request_goes_to_the_holders(stack, k: int, first_url: str, second_url: str,
                                       kinds: tuple[str, ...] = ("prefill",)) -> dict:
    """A request with prefix k at `first_url`, then one sharing its prefix at `second_url` (Envoy's or one
    gateway's): the second is served, for each of `kinds`, by the one worker whose cache the index says holds
    the prefix (and by no other). The second response's JSON."""
    prefix = prefix_tokens(k)
    assert complete(first_url, prefix + [1]).status_code == 200
    holders = {kind: held_by_one(stack, prefix, kind) for kind in kinds}
    before = {kind: prefix_queries(stack, kind) for kind in kinds}
    second = complete(second_url, prefix + [2, 3])
    assert second.status_code == 200, second.text
    for kind, holder in holders.items():
        grew = [b - a for a, b in zip(before[kind], prefix_queries(stack, kind))]
        assert grew[holder] > 0 and sum(grew) == grew[holder], (k, kind, holder, grew)
    return second.json()
