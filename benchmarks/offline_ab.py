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
import os
import sys
import tempfile
from pathlib import Path

from ab_sides import (OfflineSide, measure_offline, offline_table, split_env, stop_offline, wait_offline,
                      write_offline_job)
from ab_stats import agreement, median_ratio, per_1k


def variant_env(spec: str, threads: int) -> tuple[str, dict]:
    """'before=PYTHONPATH=/x A=1' -> ('before', this environment with those set and OMP_NUM_THREADS=threads)."""
    name, _, words = spec.partition("=")
    env, rest = split_env(words)
    if rest:
        raise SystemExit(f"--variant {spec!r}: {rest!r} is not NAME=VALUE")
    return name, {**os.environ, "OMP_NUM_THREADS": str(threads), **env}


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
    from offline_throughput import benchmark_checkpoint

    model = args.model or benchmark_checkpoint()
    workdir = Path(tempfile.mkdtemp(prefix="offline-ab-"))
    job, out_lens = write_offline_job(args, model, workdir)
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
    print(offline_table(sides, tokens))
    print(f"greedy agreement: {agreement(first.token_ids, second.token_ids)}/{len(first.token_ids)} requests with "
          "identical token ids")
    cpu = median_ratio([per_1k(c, tokens) for c in second.cpu_s], [per_1k(c, tokens) for c in first.cpu_s])
    print(f"cpu_s per token {second.name} / {first.name}: {cpu:.2f}")
    ratio = median_ratio([tokens / w for w in second.wall_s], [tokens / w for w in first.wall_s])
    print(f"offline_{second.name}_vs_{first.name}: {ratio:.2f}")


if __name__ == "__main__":
    main()
