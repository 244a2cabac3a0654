"""What one prefix index lookup costs the gateway: a 4k-token prompt (256 blocks of 16) against a real
redis-server (the launcher's, with its ACL), with 1 and 8 workers each holding the whole prompt (the worst
case: every run goes to the end) plus a kv-store holding it too.

Columns, medians and p99 of the timed lookups after warm-ups, in ms:
  lookup   PrefixIndexReader.lookup as the router calls it: hashing the prompt's block chain (SHA-256 per block,
           as the engines do) plus the one EVALSHA round trip and parsing its answer;
  script   the EVALSHA round trip alone (chain already hashed);
  hashing  chain_block_hashes alone.
A row with a miss (no worker holds the prompt) shows the early exit: each publisher costs one probe chunk.

`.venv/bin/python benchmarks/prefix_index.py [--quick]`
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis
import redis.asyncio as aredis

from splitserve.kv_blocks.hashing import chain_block_hashes
from splitserve.kv_events.events import MEDIUM_DEVICE, MEDIUM_HOST_STORE
from splitserve.kv_events.index import (APPLY_LUA, LOOKUP_CHUNK, LOOKUP_LUA, MODE_SNAPSHOT, PublisherInfo,
                                        apply_args, lookup_args)
from splitserve.launcher import probe
from splitserve.launcher.ports import free_ports
from splitserve.launcher.processes import ChildProcess, stop_together
from splitserve.launcher.redis_server import (find_redis_server, new_secret, redis_server_argv, redis_url,
                                              write_redis_config)
from splitserve.services.gateway.prefix_index import PrefixIndexReader

BLOCK, MODEL, PROMPT_TOKENS = 16, "bench-model", 4096


def start_redis(folder: Path) -> tuple[ChildProcess, str]:
    password = new_secret()
    [port] = free_ports(1)
    config = folder / "redis.conf"
    write_redis_config(config, password)
    child = ChildProcess("redis", redis_server_argv(find_redis_server(), "127.0.0.1", port, config),
                         folder / "redis.log")
    child.start()
    url = redis_url("127.0.0.1", port, password)
    deadline = time.monotonic() + 10
    while not probe.is_ready("redis", url) and time.monotonic() < deadline:
        time.sleep(0.05)
    return child, url


def populate(url: str, workers: int, chain: list[bytes]) -> list[PublisherInfo]:
    client = redis.Redis.from_url(url)
    apply = client.register_script(APPLY_LUA)
    infos = [PublisherInfo("prefill", f"10.0.0.{i}:50061", MEDIUM_DEVICE, BLOCK, MODEL) for i in range(workers)]
    infos.append(PublisherInfo("kv-store", "10.0.1.1:50090", MEDIUM_HOST_STORE, None, None))
    ops = b"".join(b"S" + h for h in chain)
    for info in infos:
        keys, args = apply_args(info, "bench", 0, MODE_SNAPSHOT, ops, ttl_s=600)
        apply(keys=keys, args=args)
    client.close()
    return infos


def clear(url: str, infos: list[PublisherInfo]) -> None:
    from splitserve.kv_events.index import PUBLISHERS_KEY, set_key, state_key

    client = redis.Redis.from_url(url)
    for info in infos:
        client.delete(set_key(info.id), state_key(info.id))
        client.hdel(PUBLISHERS_KEY, info.id)
    client.close()


def summary(times: list[float]) -> str:
    times = sorted(times)
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    return f"{statistics.median(times) * 1e3:7.3f} {p99 * 1e3:7.3f}"


async def measure(url: str, prompt: list[int], infos: list[PublisherInfo], repeats: int) -> dict[str, list[float]]:
    client = aredis.Redis.from_url(url)
    reader = PrefixIndexReader(client, timeout_s=5.0, max_age_s=3600)   # populate() announced them once
    await reader.refresh()
    script = client.register_script(LOOKUP_LUA)
    chain = chain_block_hashes(prompt, BLOCK, MODEL)
    args = lookup_args(chain, [i.id for i in infos])
    times: dict[str, list[float]] = {"lookup": [], "script": [], "hashing": []}
    for i in range(repeats + repeats // 10):
        t0 = time.perf_counter()
        hits = await reader.lookup(prompt)
        t1 = time.perf_counter()
        await script(keys=[], args=args)
        t2 = time.perf_counter()
        chain_block_hashes(prompt, BLOCK, MODEL)
        t3 = time.perf_counter()
        if i >= repeats // 10:                # warm-ups left out
            times["lookup"].append(t1 - t0)
            times["script"].append(t2 - t1)
            times["hashing"].append(t3 - t2)
    assert hits is not None and hits.device, "the lookup did not reach the index"
    await client.aclose()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 lookups per row instead of 2000")
    args = ap.parse_args()
    repeats = 200 if args.quick else 2000
    prompt = list(range(PROMPT_TOKENS))
    chain = chain_block_hashes(prompt, BLOCK, MODEL)
    print(f"prefix index lookup: {len(chain)} blocks of {BLOCK} tokens, probe chunk {LOOKUP_CHUNK}, "
          f"redis-server over loopback, Python {sys.version.split()[0]}")
    print(f"  {'workers':>7s} {'prompt':>6s} {'lookup ms p50  p99':>19s} {'script ms p50  p99':>19s} "
          f"{'hashing ms p50  p99':>20s}")
    with tempfile.TemporaryDirectory() as folder:
        child, url = start_redis(Path(folder))
        try:
            for workers in (1, 8):
                infos = populate(url, workers, chain)
                for label, asked in (("held", prompt), ("miss", [t + 1 for t in prompt])):
                    times = asyncio.run(measure(url, asked, infos, repeats))
                    print(f"  {workers:7d} {label:>6s}  {summary(times['lookup'])}     {summary(times['script'])}"
                          f"      {summary(times['hashing'])}")
                clear(url, infos)
        finally:
            stop_together([child], grace_s=5)


if __name__ == "__main__":
    main()
