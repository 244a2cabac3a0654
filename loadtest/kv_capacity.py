"""Prompts that together exceed the workers' KV caches: does every stream finish, correctly, and how fast?

The scenario that once hung the stack: `splitserve up --num-kv-blocks 200` (block 16: 3,200 tokens per worker),
one prefill and one decode worker, 8 concurrent streaming completions with prompts of 1,300-1,450 tokens,
max_tokens 400, ignore_eos. Starts that stack (demo model unless --model), runs the streams, compares each with
the offline engine running it alone (greedy), and prints a table plus the workers' preemption counters.

  .venv/bin/python loadtest/kv_capacity.py [--model PATH] [--num-kv-blocks 200] [--streams 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import sys
import time

import httpx

from serve_load import RefusedError, completion_events  # loadtest/ is on sys.path: this script runs from it
from splitserve.launcher.stack import Stack


async def _stream(http: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
                  deadline_s: float) -> dict:
    started = time.perf_counter()
    out = {"text": "", "finish": None, "tokens": 0, "ttft": None, "error": "", "chunks": 0}
    try:
        async with asyncio.timeout(deadline_s):
            async with contextlib.aclosing(completion_events(http, url, model, prompt, max_tokens)) as events:
                async for event in events:
                    if "error" in event:
                        out["error"] = event["error"]["message"][:80]
                        continue
                    out["chunks"] += 1
                    if event.get("usage"):
                        out["tokens"] = event["usage"]["completion_tokens"]
                    for choice in event["choices"]:
                        if choice["text"] and out["ttft"] is None:
                            out["ttft"] = time.perf_counter() - started
                        out["text"] += choice["text"]
                        out["finish"] = choice.get("finish_reason") or out["finish"]
    except RefusedError as exc:
        out["error"] = str(exc)
    except TimeoutError:
        out["error"] = f"no end within {deadline_s:.0f} s"
    out["seconds"] = time.perf_counter() - started
    return out


def _worker_counters(stack: Stack) -> dict[str, float]:
    counters = {}
    for role, ports in stack.metrics_ports.items():
        if role not in ("prefill", "decode"):
            continue
        for port in ports:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            for name in ("splitserve_preemptions_total", "splitserve_kv_load_failures_total"):
                match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)
                if match:
                    key = f"{role}:{name.removeprefix('splitserve_').removesuffix('_total')}"
                    counters[key] = counters.get(key, 0.0) + float(match.group(1))
    return counters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    parser.add_argument("--num-kv-blocks", type=int, default=200, help="each worker's KV cache, in blocks of 16")
    parser.add_argument("--streams", type=int, default=8, help="streaming completions, all at once")
    parser.add_argument("--min-prompt", type=int, default=1300, help="shortest prompt, in tokens")
    parser.add_argument("--max-prompt", type=int, default=1450, help="longest prompt, in tokens")
    parser.add_argument("--max-tokens", type=int, default=400, help="tokens each stream generates (EOS ignored)")
    parser.add_argument("--deadline-s", type=float, default=600.0, help="a stream not ended by then has failed")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the offline engine")
    args = parser.parse_args()

    rng = random.Random(0)
    with Stack(model=args.model, prefill_workers=1, decode_workers=1, num_kv_blocks=args.num_kv_blocks,
               torch_threads=1, prefill_decider="threshold") as stack:
        url = stack.base_url
        model = httpx.get(f"{url}/models", timeout=10).json()["data"][0]["id"]
        vocab = 1000
        prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
                   for _ in range(args.streams)]

        async def run_all():
            async with httpx.AsyncClient(timeout=args.deadline_s) as http:
                return await asyncio.gather(*(_stream(http, url, model, p, args.max_tokens, args.deadline_s)
                                              for p in prompts))

        started = time.perf_counter()
        results = asyncio.run(run_all())
        wall = time.perf_counter() - started
        counters = _worker_counters(stack)
        checkpoint = stack.model

    expected = [None] * len(prompts)
    if not args.no_check:
        from splitserve import LLM, SamplingParams

        llm = LLM(checkpoint, dtype="float32", device="cpu", num_kv_blocks=4 * args.num_kv_blocks)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        expected = [llm.generate([p], params)[0].outputs[0].text for p in prompts]

    print("| stream | prompt tokens | finish | tokens | chunks | TTFT s | total s | equals offline |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for i, (prompt, result, text) in enumerate(zip(prompts, results, expected)):
        same = "-" if text is None else ("yes" if result["text"] == text else "NO")
        ttft = f"{result['ttft']:.2f}" if result["ttft"] is not None else "-"
        finish = result["finish"] or f"error: {result['error']}"
        print(f"| {i} | {len(prompt)} | {finish} | {result['tokens']} | {result['chunks']} | {ttft} | "
              f"{result['seconds']:.2f} | {same} |")
        ok &= result["finish"] == "length" and result["tokens"] == args.max_tokens and same != "NO"
    print(f"\nwall: {wall:.2f} s for {len(prompts)} streams; " +
          ", ".join(f"{k} {v:.0f}" for k, v in sorted(counters.items())))
    print(f"all_finished_correctly: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
