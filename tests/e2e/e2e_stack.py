"""One running stack (real processes: Redis, Envoy, tokenizer, kv-store, prefill, decode, gateway) per module.

The model is the session's tiny Llama test checkpoint (init range 0.1, so greedy choices are not decided by
float noise); the offline reference is `LLM.generate` on the same folder, in this process.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from splitserve.launcher.stack import Stack
from splitserve.v1 import decode_pb2, decode_pb2_grpc, kv_store_pb2, kv_store_pb2_grpc, prefill_pb2, prefill_pb2_grpc

API_KEY = "test-key"


@pytest.fixture(scope="module")
def stack(llama_ckpt, tmp_path_factory):
    with Stack(model=str(llama_ckpt), prefill_workers=1, decode_workers=1, api_key=API_KEY, torch_threads=1,
               num_kv_blocks=256, kv_checksum=True, log_dir=str(tmp_path_factory.mktemp("stack-logs"))) as running:
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
                               prefill_pb2.PrefillStatsRequest()).engine)
    for address in stack.addresses["decode"]:
        if address not in exclude:
            stats.append(_call(address, decode_pb2_grpc.DecodeStub, "Stats", decode_pb2.DecodeStatsRequest()).engine)
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


def gateway_metric(stack, name: str) -> float:
    """The sum of the gateway's samples whose line starts with `name` (labels may follow)."""
    import httpx

    [port] = stack.metrics_ports["gateway"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))
