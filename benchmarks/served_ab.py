"""Served A/B of `splitserve up` variants: the served part of benchmarks/vs_vllm.py, without vLLM, with a
per-process CPU breakdown.

Each variant is `splitserve up` as a user starts it plus the flags given (`--variant NAME='FLAGS'`, repeatable; an
empty FLAGS is the default stack; leading NAME=VALUE words are environment variables of that stack). All start at
once and are warmed up; then rounds at c=8 and c=1 (vs_vllm's workloads) rotate the variants' order. Per run: TTFT
p50/p90, ITL per token p50, output tok/s, the decode workers' tokens per step (the batch they ran) and prompt
tokens they prefilled themselves, and each service's CPU seconds per output token (its whole process, from
/proc/<pid>/stat; replicas summed). Medians over the rounds at the end. Noisy on a shared machine: compare
variants within one run only.

  python benchmarks/served_ab.py --quick --rounds 3 --variant default= --variant agg='--prefill-workers 0'
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from ab_sides import (BenchmarkError, ServedSide, ServedWorkloads, split_env, start_splitserve, stop_served,
                      wait_served)
from ab_stats import format_table, itl_per_token_ms, median
from proc_tree import stat_cpu_seconds

from idle_rss import process_name, process_tree  # on the path proc_tree sets

KEYS = ["ttft_p50_ms", "ttft_p90_ms", "itl_tok_p50_ms", "itl_p90_ms", "output_tok_per_s", "decode_batch", "decode_prefill_tok"]


def role_cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds of each service under `root` (decode:41233 -> decode; replicas summed)."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = {}
    for pid in process_tree(root):
        try:
            cpu = stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text(), ticks)
        except OSError:
            continue
        role = process_name(pid).split(":")[0]
        seconds[role] = seconds.get(role, 0.0) + cpu
    return seconds


def decode_counters(root: int) -> tuple[float, float, float]:
    """(engine steps, generation tokens, prompt tokens computed) of the decode workers under `root`, summed from
    their Prometheus metrics: generation tokens per step is the batch they ran at."""
    import httpx

    totals = [0.0, 0.0, 0.0]
    names = ("splitserve_engine_steps_total", "splitserve_generation_tokens_total",
             "splitserve_prompt_tokens_computed_total")
    for pid in process_tree(root):
        if not process_name(pid).startswith("decode:"):
            continue
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        port = argv[argv.index("--metrics-port") + 1]
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).text.splitlines():
            for i, name in enumerate(names):
                if line.startswith(name + "{"):
                    totals[i] += float(line.rsplit(" ", 1)[1])
    return totals[0], totals[1], totals[2]


def measure(side: ServedSide, workload: list, concurrency: int) -> dict:
    import serve_load

    before, counters_before = role_cpu_seconds(side.proc.pid), decode_counters(side.proc.pid)
    results, elapsed = asyncio.run(serve_load.run_load(side.url, None, workload, concurrency, None))
    after, counters_after = role_cpu_seconds(side.proc.pid), decode_counters(side.proc.pid)
    steps, generated, prompt = (a - b for a, b in zip(counters_after, counters_before))
    row = serve_load.summarize(side.name, results, elapsed)
    row["itl_tok_p50_ms"] = itl_per_token_ms(results)
    tokens = sum(r.output_tokens for r in results if r.ok) or 1
    # Tokens the decode workers generated per step (their running batch), and prompt tokens they prefilled.
    row["decode_batch"] = generated / steps if steps else float("nan")
    row["decode_prefill_tok"] = prompt
    row["cpu_ms_per_tok"] = {role: 1e3 * (after[role] - before.get(role, 0.0)) / tokens for role in after}
    return row


def report(sides: list[ServedSide]) -> str:
    rows, cpu_lines = [], []
    for c in (8, 1):
        for side in sides:
            runs = side.rounds.get(c, [])
            rows.append([side.name, c, len(runs), *(median([r[k] for r in runs]) for k in KEYS),
                         " ".join(f"{r['output_tok_per_s']:.0f}" for r in runs), sum(r["failed"] for r in runs)])
            roles = sorted({role for r in runs for role in r["cpu_ms_per_tok"]})
            per_role = {role: median([r["cpu_ms_per_tok"].get(role, 0.0) for r in runs]) for role in roles}
            cpu_lines.append(f"  c={c} {side.name}: total {sum(per_role.values()):.1f}; " + ", ".join(
                f"{role} {v:.2f}" for role, v in sorted(per_role.items(), key=lambda kv: -kv[1]) if v >= 0.05))
    return "\n".join([format_table(["variant", "c", "rounds", *KEYS, "tok/s per round", "failed"], rows),
                      "CPU ms per output token (median over rounds), per service:", *cpu_lines])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=FLAGS",
                    help="a `splitserve up` to measure: its name and extra flags (repeatable)")
    ap.add_argument("--model", default=None, help="checkpoint (default: offline_throughput.py's, float32)")
    ap.add_argument("--quick", action="store_true", help="vs_vllm's --quick workloads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--c8-requests", type=int, default=None, help="default 64, --quick 8")
    ap.add_argument("--c1-requests", type=int, default=None, help="default 16, --quick 3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-gib", type=int, default=1)
    ap.add_argument("--start-timeout-s", type=float, default=900.0)
    args = ap.parse_args(argv)
    args.c8_requests = args.c8_requests or (8 if args.quick else 64)
    args.c1_requests = args.c1_requests or (3 if args.quick else 16)
    from offline_throughput import benchmark_checkpoint

    model = args.model or benchmark_checkpoint()
    workdir = Path(tempfile.mkdtemp(prefix="served-ab-"))
    print(f"model {model}; logs in {workdir}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
          flush=True)
    workloads = ServedWorkloads(args)
    sides: list[ServedSide] = []
    try:
        for spec in args.variant:
            name, _, flags = spec.partition("=")
            env, flags = split_env(flags)
            variant_args = argparse.Namespace(**{**vars(args), "splitserve_up_args": flags})
            (workdir / name).mkdir()
            saved = dict(os.environ)
            os.environ.update(env)  # `splitserve up` inherits it, and its services inherit it from there
            try:
                sides.append(start_splitserve(variant_args, model, workdir / name))
            finally:
                os.environ.clear()
                os.environ.update(saved)
        wait_served(args, sides, workloads)  # reads each one's ready line while it is still named splitserve
        for side, spec in zip(sides, args.variant):
            side.name = spec.partition("=")[0]
        for rnd in range(args.rounds):
            for c, workload in workloads.round(rnd).items():
                order = sides[rnd % len(sides):] + sides[:rnd % len(sides)]
                for side in order if rnd % 2 == 0 else order[::-1]:
                    side.rounds.setdefault(c, []).append(measure(side, workload, c))
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
                f"{s.name} c8 {s.rounds[8][-1]['output_tok_per_s']:.0f} c1 {s.rounds[1][-1]['output_tok_per_s']:.0f}"
                " tok/s" for s in sides), flush=True)
    except BenchmarkError as exc:
        print(f"served_ab: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_served(sides)
    print(report(sides))
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
