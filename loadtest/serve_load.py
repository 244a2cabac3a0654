"""Drives a running splitserve stack over its OpenAI HTTP API and prints latency and throughput.

A fixed-seed workload (prompt lengths, output lengths) of streaming completions at a given concurrency; each
request is timed from send to first content chunk (TTFT) and between content chunks (inter-token latency).
Used two ways:
  python loadtest/serve_load.py --url http://127.0.0.1:8000/v1             # an already running stack
  python loadtest/serve_load.py --start both --rounds 3                     # starts the stack itself, runs
        disaggregated (a prefill worker beside the decode worker: each prompt prefilled where its first token is
        predicted sooner, the gateway's default) and aggregated (no prefill worker: the decode worker prefills
        every prompt, on every engine core), same workload, modes interleaved, medians at the end
With --start it also reports each process's CPU seconds over the measured run and its share (CPU seconds from
/proc/<pid>/stat per wall second, replicas summed): where the serving CPU goes.
--guided json sends every request with a JSON schema (response_format, guided decoding); --guided compare runs
the workload without and with it on the same stack, interleaved per round, and ends with
`guided_itl_ratio: X.XX` (mean inter-token latency with the schema over without; the goal is <= 1.1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import httpx


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0         # of the prompt, reused from a prefix cache (usage.prompt_tokens_details)
    latency: float = 0.0
    error: str = ""


def make_workload(num_requests: int, seed: int, min_in: int, max_in: int, min_out: int, max_out: int):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "model", "token", "cache", "block", "serve", "split", "route"]
    workload = []
    for _ in range(num_requests):
        n_words = rng.randint(min_in, max_in)
        prompt = " ".join(rng.choice(words) for _ in range(n_words))
        workload.append((prompt, rng.randint(min_out, max_out)))
    return workload


# A string that cannot end before max_tokens: guided outputs are as long as plain ones (both ignore EOS), so the
# two runs interleave the same prefills and the ITL compares like with like.
GUIDED_RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "load", "schema": {
    "type": "object", "properties": {"text": {"type": "string", "minLength": 100000}}, "required": ["text"]}}}
GUIDED_VARIANTS = {"off": [("", None)], "json": [("+json", GUIDED_RESPONSE_FORMAT)],
                   "compare": [("", None), ("+json", GUIDED_RESPONSE_FORMAT)]}


class RefusedError(Exception):
    """The server answered the request with an HTTP error instead of a stream."""


async def completion_events(client: httpx.AsyncClient, url: str, model: str, prompt: str | list[int],
                            max_tokens: int, api_key: str | None = None,
                            response_format: dict | None = None) -> AsyncIterator[dict]:
    """The JSON events of one greedy streamed completion that ignores EOS (usage included at the end), `[DONE]`
    left out. Close it (contextlib.aclosing) to end the stream early."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if response_format is not None:
        body["response_format"] = response_format
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with client.stream("POST", f"{url}/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RefusedError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str | list[int], max_tokens: int,
                      api_key: str | None, response_format: dict | None = None) -> RequestResult:
    start = time.perf_counter()
    last = None
    result = RequestResult(ok=False)
    try:
        async with contextlib.aclosing(completion_events(client, url, model, prompt, max_tokens, api_key,
                                                         response_format)) as events:
            async for chunk in events:
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error event")
                    return result
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    result.output_tokens = usage["completion_tokens"]
                    result.prompt_tokens = usage["prompt_tokens"]
                    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
    except RefusedError as exc:
        result.error = str(exc)
        return result
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.ok = True
    return result


async def run_load(url: str, model: str | None, workload, concurrency: int, api_key: str | None,
                   response_format: dict | None = None):
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        if model is None:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            model = (await client.get(f"{url}/models", headers=headers)).json()["data"][0]["id"]
        queue = list(workload)
        results: list[RequestResult] = []

        async def worker():
            while queue:
                prompt, max_tokens = queue.pop(0)
                results.append(await one_request(client, url, model, prompt, max_tokens, api_key, response_format))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(name: str, results: list[RequestResult], elapsed: float) -> dict:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok]
    itls = [x for r in ok for x in r.itls]
    tokens = sum(r.output_tokens for r in ok)
    return {"mode": name, "requests": len(results), "failed": len(results) - len(ok),
            "ttft_p50_ms": 1e3 * percentile(ttfts, 0.5), "ttft_p90_ms": 1e3 * percentile(ttfts, 0.9),
            "itl_p50_ms": 1e3 * percentile(itls, 0.5), "itl_p90_ms": 1e3 * percentile(itls, 0.9),
            # Chunks that arrive together (a client read, a proxy's buffer) make sub-millisecond gaps that pull
            # the median down; the mean is total streaming time over chunks, which bunching cannot hide.
            "itl_mean_ms": 1e3 * statistics.fmean(itls) if itls else float("nan"),
            "req_per_s": len(ok) / elapsed, "output_tok_per_s": tokens / elapsed,
            "mean_latency_s": statistics.fmean([r.latency for r in ok]) if ok else float("nan"),
            "errors": sorted({r.error for r in results if not r.ok})[:3]}


def cpu_seconds(stack) -> dict[str, float]:
    """User + system CPU seconds of each role's processes (replicas summed), from /proc/<pid>/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = {}
    for child in stack.children:
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, TypeError):
            continue  # exited (or never started): nothing to count
        role = child.name.rsplit("-", 1)[0] if child.name[-1].isdigit() else child.name
        seconds[role] = seconds.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def median_row(mode: str, rows: list[dict]) -> dict:
    """Each number the median over `rows` (one mode's rounds); CPU seconds per role too."""
    row = {key: statistics.median(r[key] for r in rows) for key in rows[0] if isinstance(rows[0][key], float)}
    row.update(mode=f"{mode} median", requests=sum(r["requests"] for r in rows),
               failed=sum(r["failed"] for r in rows), errors=[])
    row["cpu_s"] = {role: statistics.median(r.get("cpu_s", {}).get(role, 0.0) for r in rows)
                    for role in rows[0].get("cpu_s", {})}
    return row


def print_table(rows: list[dict]) -> None:
    cols = ["mode", "requests", "failed", "ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "itl_p90_ms", "itl_mean_ms",
            "req_per_s", "output_tok_per_s"]
    print(" | ".join(f"{c:>16}" for c in cols))
    for row in rows:
        print(" | ".join(f"{row[c]:>16.2f}" if isinstance(row[c], float) else f"{row[c]:>16}" for c in cols))
        for error in row["errors"]:
            print(f"    error: {error}")
    for row in rows:
        if row.get("cpu_share"):
            shares = ", ".join(f"{role} {share:.3f}" for role, share in sorted(row["cpu_share"].items()))
            print(f"{row['mode']}: CPU share (CPU s per wall s): {shares}")
        if row.get("cpu_s"):
            seconds = ", ".join(f"{role} {s:.1f}" for role, s in sorted(row["cpu_s"].items()))
            print(f"{row['mode']}: CPU seconds over the run: {seconds} (total {sum(row['cpu_s'].values()):.1f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="base URL of a running stack, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--start", choices=["disagg", "agg", "split", "both", "all"], help="start the stack here "
                        "(demo model unless --model) in this mode and measure it (split: disaggregated, every prompt "
                        "on the prefill worker; both: disagg and agg; all: the three)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-input-words", type=int, default=20)
    parser.add_argument("--max-input-words", type=int, default=300)
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=64)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads per engine worker (default: the launcher's, one per core it gives)")
    parser.add_argument("--rounds", type=int, default=1, help="with --start: run the modes this many times, "
                        "interleaved, and print each mode's median too")
    parser.add_argument("--guided", choices=sorted(GUIDED_VARIANTS), default="off", help="json: every request "
                        "with a JSON schema (response_format); compare: without and with, ending with "
                        "guided_itl_ratio")
    args = parser.parse_args(argv)
    if not args.url and not args.start:
        parser.error("give --url of a running stack or --start MODE")
    workload = make_workload(args.num_requests, args.seed, args.min_input_words, args.max_input_words,
                             args.min_output, args.max_output)
    rows = []
    variants = GUIDED_VARIANTS[args.guided]
    if args.url:
        for _ in range(args.rounds):
            for suffix, response_format in variants:
                results, elapsed = asyncio.run(run_load(args.url, None, workload, args.concurrency, args.api_key,
                                                        response_format))
                rows.append(summarize("given-url" + suffix, results, elapsed))
        modes = ["given-url"]
    else:
        from splitserve.launcher.stack import Stack

        modes = {"both": ["disagg", "agg"], "all": ["disagg", "split", "agg"]}.get(args.start, [args.start])
        for _ in range(args.rounds):
            for mode in modes:
                # Aggregated: no prefill worker, so the decode worker prefills every prompt and gets its cores.
                shape = {"disagg": dict(local_prefill_threshold=0), "agg": dict(prefill_workers=0),
                         "split": dict(local_prefill_threshold=0, prefill_decider="threshold")}[mode]
                with Stack(model=args.model, torch_threads=args.torch_threads, **shape) as stack:
                    for suffix, response_format in variants:    # warm-up (grammar compiled), not measured
                        asyncio.run(run_load(stack.base_url, None, workload[:4], 2, None, response_format))
                    for suffix, response_format in variants:
                        cpu_before = cpu_seconds(stack)
                        results, elapsed = asyncio.run(run_load(stack.base_url, None, workload, args.concurrency,
                                                                None, response_format))
                        cpu_after = cpu_seconds(stack)
                        row = summarize(mode + suffix, results, elapsed)
                        row["cpu_s"] = {role: cpu_after[role] - cpu_before.get(role, 0.0) for role in cpu_after}
                        row["cpu_share"] = {role: seconds / elapsed for role, seconds in row["cpu_s"].items()}
                        rows.append(row)
    names = [mode + suffix for mode in modes for suffix, _ in variants]
    if args.rounds > 1:
        rows += [median_row(name, [r for r in rows if r["mode"] == name]) for name in names]
    print_table(rows)
    if args.guided == "compare":
        for mode in modes:
            plain, guided = (statistics.median(r["itl_mean_ms"] for r in rows if r["mode"] == name)
                             for name in (mode, mode + "+json"))
            print(f"{mode}: mean ITL {plain:.2f} ms without a JSON schema, {guided:.2f} ms with")
        print(f"guided_itl_ratio: {guided / plain:.2f}")
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
