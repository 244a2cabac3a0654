"""The engine's decode step alone, per batch size: what served inter-token latency is made of.

Each batch size runs `batch` requests of one prompt length to their end on the offline engine (one process, the
threads it is given) and reports the median decode-only step in wall and CPU milliseconds. Run it under the
thread layout to study, e.g. one pinned thread as the default stack's decode worker:

  OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/decode_step.py

Compare variants by running them alternately (this machine is noisy), never against another day's figures.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def step_times(engine, batch: int, prompt_len: int, steps: int, rng: random.Random) -> tuple[list[float], list[float]]:
    """(wall ms, CPU ms) of every step after the first (the prompts'); take medians, which keep out the odd step
    that still prefills a prompt the token budget split."""
    from splitserve import SamplingParams

    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for index in range(batch):
        engine.add_request(f"b{batch}-{index}-{rng.random()}", [rng.randrange(3, 1000) for _ in range(prompt_len)],
                           params)
    engine.step()  # the prompts
    wall, cpu = [], []
    while engine.has_unfinished_requests():
        w, c = time.perf_counter(), time.process_time()
        engine.step()
        wall.append((time.perf_counter() - w) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    return wall, cpu


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the benchmarks' demo model)")
    ap.add_argument("--batches", default="1,5,8,16", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=80)
    ap.add_argument("--steps", type=int, default=60, help="decode steps timed per batch size")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if any(b < 1 for b in batches) or args.steps < 1 or args.prompt_len < 1:
        ap.error("batch sizes, --steps and --prompt-len must be >= 1")

    from offline_throughput import benchmark_checkpoint
    from splitserve import LLM

    engine = LLM(args.model or benchmark_checkpoint(), dtype="float32", device="cpu").engine
    rng = random.Random(0)
    step_times(engine, batches[0], args.prompt_len, 5, rng)  # warm-up: first calls compile
    print(f"threads {torch.get_num_threads()}, prompt {args.prompt_len} tokens, {args.steps} steps per batch size")
    print(f"{'batch':>5}  {'step_ms_p50':>11}  {'cpu_ms_p50':>10}  {'ms_per_token':>12}")
    for batch in batches:
        wall, cpu = step_times(engine, batch, args.prompt_len, args.steps, rng)
        step = statistics.median(wall)
        print(f"{batch:>5}  {step:>11.2f}  {statistics.median(cpu):>10.2f}  {step / batch:>12.2f}")


if __name__ == "__main__":
    main()
