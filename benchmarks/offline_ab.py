"""Offline A/B of splitserve against itself: two code trees or two settings, the offline half of
benchmarks/vs_vllm.py with splitserve on both sides.

Each variant is `--variant NAME='NAME=VALUE ...'`: environment variables of that side's engine process, e.g. a
PYTHONPATH that puts another checkout's `shared/` first (its `splitserve` package is then the one imported):

  git worktree add /tmp/before HEAD~1
  python benchmarks/offline_ab.py --variant before=PYTHONPATH=/tmp/before/shared --variant now=

Both engines load once (offline_child.py, vs_vllm.py's workload: token-id prompts, greedy, ignore_eos), then run
the whole workload in interleaved pairs (the order alternates); prints tok/s and CPU seconds per 1k tokens per
run, the greedy agreement between the sides, and last `offline_<second>_vs_<first>: X.XX` (median of the per-pair
tok/s ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from ab_sides import OfflineSide, measure_offline, stop_offline, wait_offline
from ab_stats import agreement, format_table, median, median_ratio, per_1k


def variant_env(spec: str, threads: int) -> tuple[str, dict]:
    name, _, words = spec.partition("=")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for word in shlex.split(words):
        key, sep, value = word.partition("=")
        if not sep:
            raise SystemExit(f"--variant {spec!r}: {word!r} is not NAME=VALUE")
        env[key] = value
    return name, env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=ENV",
                    help="a side: its name and environment (exactly two)")
    ap.add_argument("--model", default=None, help="checkpoint (default: offline_throughput.py's, float32)")
    ap.add_argument("--quick", action="store_true", help="offline_throughput's --quick workload")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-gib", type=int, default=2)
    ap.add_argument("--start-timeout-s", type=float, default=900.0)
    ap.add_argument("--run-timeout-s", type=float, default=1800.0)
    args = ap.parse_args()
    if len(args.variant) != 2:
        ap.error("give exactly two --variant")
    from offline_throughput import benchmark_checkpoint, benchmark_workload

    model = args.model or benchmark_checkpoint()
    workdir = Path(tempfile.mkdtemp(prefix="offline-ab-"))
    prompts, out_lens = benchmark_workload(args.quick, args.num_requests, args.seed)
    prompts, out_lens = prompts[:args.num_requests], out_lens[:args.num_requests]
    job = workdir / "offline-job.json"
    job.write_text(json.dumps({"model": model, "prompts": prompts, "out_lens": out_lens, "threads": args.threads,
                               "kv_cache_memory_bytes": args.kv_gib * 2**30}))
    print(f"model {model}; logs in {workdir}", flush=True)
    sides = []
    try:
        for spec in args.variant:
            name, env = variant_env(spec, args.threads)
            sides.append(OfflineSide(name, sys.executable, env, engine="splitserve"))
            sides[-1].start(job, workdir)
        wait_offline(args, sides)
        tokens = sum(out_lens)
        measure_offline(args, sides, tokens)
    finally:
        stop_offline(sides)
    first, second = sides
    rows = [[s.name, len(s.wall_s), tokens, median([tokens / w for w in s.wall_s]),
             median([per_1k(c, tokens) for c in s.cpu_s]), " ".join(f"{tokens / w:.1f}" for w in s.wall_s)]
            for s in sides]
    print(format_table(["offline", "pairs", "out_tok", "out_tok/s", "cpu_s/1k_tok", "tok/s per pair"], rows))
    print(f"greedy agreement: {agreement(first.token_ids, second.token_ids)}/{len(first.token_ids)} requests with "
          "identical token ids")
    cpu = median_ratio([per_1k(c, tokens) for c in second.cpu_s], [per_1k(c, tokens) for c in first.cpu_s])
    print(f"cpu_s per token {second.name} / {first.name}: {cpu:.2f}")
    ratio = median_ratio([tokens / w for w in second.wall_s], [tokens / w for w in first.wall_s])
    print(f"offline_{second.name}_vs_{first.name}: {ratio:.2f}")


if __name__ == "__main__":
    main()
