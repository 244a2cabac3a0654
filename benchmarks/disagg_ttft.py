"""What disaggregation costs the first token: TTFT through the running stack, disaggregated (prefill worker ->
kv-store -> decode) minus aggregated (the decode worker prefills itself), for 512- and 2048-token prompts, as a
fraction of the prefill compute time (the same prompts prefilled offline by the engine in this process, with the
workers' thread count).

    python benchmarks/disagg_ttft.py [--lengths 512 2048] [--repeats 3] [--model PATH]

Prompts are random token ids, different for every request so no prefix cache helps either mode.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import httpx
import torch


def ttft_ms(base_url: str, model: str, prompt: list[int]) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0.0, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    with httpx.Client(timeout=600) as http, http.stream("POST", f"{base_url}/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                return 1e3 * (time.perf_counter() - start)
    raise RuntimeError("stream ended without a token")


def prompts_for(length: int, count: int, seed: int, vocab: int = 1000) -> list[list[int]]:
    rng = random.Random(seed * 100003 + length)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(count)]


def measure_stack(model: str, mode: str, lengths, repeats: int, threads: int) -> dict[int, float]:
    from splitserve.launcher.stack import Stack

    threshold = 0 if mode == "disagg" else 10**9
    with Stack(model=model, local_prefill_threshold=threshold, torch_threads=threads, log_level="WARNING") as stack:
        served = httpx.get(f"{stack.base_url}/models", timeout=30).json()["data"][0]["id"]
        ttft_ms(stack.base_url, served, prompts_for(64, 1, seed=99)[0])  # warm-up, not measured
        return {n: statistics.median(ttft_ms(stack.base_url, served, p)
                                     for p in prompts_for(n, repeats, seed=1 if mode == "disagg" else 2))
                for n in lengths}


def measure_prefill(model: str, lengths, repeats: int, threads: int) -> dict[int, float]:
    from splitserve import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(model, dtype="float32", device="cpu", enable_prefix_caching=False, max_num_batched_tokens=4096)
    llm.generate([prompts_for(64, 1, seed=99)[0]], SamplingParams(max_tokens=1))  # warm-up
    result = {}
    for n in lengths:
        times = []
        for prompt in prompts_for(n, repeats, seed=3):
            start = time.perf_counter()
            llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
            times.append(1e3 * (time.perf_counter() - start))
        result[n] = statistics.median(times)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: Llama-shaped, 8 layers, hidden 512)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args()
    from splitserve.demo_model import cached_checkpoint

    model = args.model or str(cached_checkpoint(
        "llama", hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        intermediate_size=1376, max_position_embeddings=4096))
    prefill = measure_prefill(model, args.lengths, args.repeats, args.torch_threads)
    agg = measure_stack(model, "agg", args.lengths, args.repeats, args.torch_threads)
    disagg = measure_stack(model, "disagg", args.lengths, args.repeats, args.torch_threads)
    print(f"{'prompt':>7s} {'prefill_ms':>11s} {'ttft_agg_ms':>12s} {'ttft_disagg_ms':>15s} {'overhead_ms':>12s} "
          f"{'overhead/prefill':>17s}")
    for n in args.lengths:
        overhead = disagg[n] - agg[n]
        print(f"{n:7d} {prefill[n]:11.1f} {agg[n]:12.1f} {disagg[n]:15.1f} {overhead:12.1f} "
              f"{overhead / prefill[n]:17.2f}")


if __name__ == "__main__":
    main()
