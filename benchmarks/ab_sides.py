"""The two sides of benchmarks/vs_vllm.py, as processes: each offline engine (benchmarks/offline_child.py, under its
own venv) and each server (`splitserve up`, vLLM's api_server), started, timed and stopped.

Every side starts in a session of its own and is stopped with everything under it; the measuring loops alternate
the order of the sides, so a machine whose load drifts favours neither.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ab_stats import format_table, itl_per_token_ms, median, per_1k
from proc_tree import process_tree  # loadtest/idle_rss.py's, on the path proc_tree sets

HERE = Path(__file__).resolve().parent


class BenchmarkError(Exception):
    """A side failed to start or to answer; the message carries the tail of its log."""


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


def stop(proc: subprocess.Popen, ask, wait_s: float = 60.0, orphans_s: float = 10.0) -> None:
    """`ask()` asks the side to exit (a signal, or the end of its input); after `wait_s`, and `orphans_s` more for
    the processes it started, whatever is left of its process tree is killed. The tree is read first: processes
    whose parent is gone are no longer found under it (vLLM's engine core outlives a main process that exits)."""
    if proc.poll() is None:
        pids = process_tree(proc.pid)
        ask()
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + orphans_s
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in pids[1:]):
            time.sleep(0.5)
        for pid in pids[1:] if proc.poll() is not None else pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


def split_env(flags: str) -> tuple[dict[str, str], str]:
    """'OMP_WAIT_POLICY=PASSIVE --prefill-workers 0' -> ({'OMP_WAIT_POLICY': 'PASSIVE'}, '--prefill-workers 0'):
    leading NAME=VALUE words are the variant's environment."""
    words = shlex.split(flags)
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, shlex.join(words)


def vllm_env(args) -> dict:
    return {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib),
            "VLLM_CPU_OMP_THREADS_BIND": args.vllm_threads_bind or f"0-{args.threads - 1}"}


@dataclass
class OfflineSide:
    name: str
    python: str
    env: dict
    proc: subprocess.Popen | None = None
    engine: str = ""    # offline_child.py's engine (splitserve or vllm); the name when empty
    log: Path | None = None
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)

    def start(self, job: Path, workdir: Path) -> None:
        self.log = workdir / f"offline-{self.name}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([self.python, str(HERE / "offline_child.py"), self.engine or self.name,
                                          str(job)],
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
        self.token_ids = result["token_ids"]  # the last run's: greedy, so every run's should be the same


def write_offline_job(args, model: str, workdir: Path) -> tuple[Path, list[int]]:
    """offline_child.py's job (offline_throughput.py's workload): its path and the output lengths."""
    from offline_throughput import benchmark_workload

    prompts, out_lens = benchmark_workload(args.quick, args.num_requests, args.seed)
    prompts, out_lens = prompts[:args.num_requests], out_lens[:args.num_requests]  # --quick: its first ones
    job = workdir / "offline-job.json"
    job.write_text(json.dumps({"model": model, "prompts": prompts, "out_lens": out_lens, "threads": args.threads,
                               "kv_cache_memory_bytes": args.kv_gib * 2**30}))
    return job, out_lens


def start_offline(args, model: str, workdir: Path) -> tuple[list[OfflineSide], list[int]]:
    """Both engines load at once (loading is not measured); returns the sides and the output lengths."""
    job, out_lens = write_offline_job(args, model, workdir)
    sides = [OfflineSide("splitserve", sys.executable, {**os.environ, "OMP_NUM_THREADS": str(args.threads)}),
             OfflineSide("vllm", args.vllm_python, vllm_env(args))]
    for side in sides:
        side.start(job, workdir)
    return sides, out_lens


def wait_offline(args, sides: list[OfflineSide]) -> None:
    for side in sides:
        print(f"offline {side.name}: loaded in {side.wait_ready(args.start_timeout_s):.0f} s", flush=True)


def measure_offline(args, sides: list[OfflineSide], tokens: int) -> None:
    for pair in range(args.pairs):
        for side in sides if pair % 2 == 0 else sides[::-1]:
            side.run(args.run_timeout_s)
        print(f"offline pair {pair + 1}/{args.pairs}: " + ", ".join(
            f"{s.name} {tokens / s.wall_s[-1]:.1f} tok/s {per_1k(s.cpu_s[-1], tokens):.1f} cpu_s/1k_tok"
            for s in sides), flush=True)


def offline_table(sides: list[OfflineSide], tokens: int) -> str:
    """Per side: runs, output tokens, median tok/s and CPU s per 1k tokens, each run's tok/s."""
    rows = [[s.name, len(s.wall_s), tokens, median([tokens / w for w in s.wall_s]),
             median([per_1k(c, tokens) for c in s.cpu_s]), " ".join(f"{tokens / w:.1f}" for w in s.wall_s)]
            for s in sides]
    return format_table(["offline", "pairs", "out_tok", "out_tok/s", "cpu_s/1k_tok", "tok/s per pair"], rows)


def stop_offline(sides: list[OfflineSide]) -> None:
    for side in sides:
        if side.proc is not None:
            stop(side.proc, side.proc.stdin.close, wait_s=60.0)  # at the end of its input the child exits


@dataclass
class ServedSide:
    name: str
    proc: subprocess.Popen
    log: Path
    stop_signal: int
    url: str = ""
    idle_rss_bytes: int = 0  # sums over the side's processes: RSS counts shared pages once per process, PSS
    idle_pss_bytes: int = 0  # splits them among their users
    rounds: dict[int, list[dict]] = field(default_factory=dict)


def start_splitserve(args, model: str, workdir: Path) -> ServedSide:
    """`splitserve up` as a user types it, on free ports, with vLLM's KV cache budget (its default takes a quarter
    of free memory per worker); its one stdout line says when and where it is ready."""
    log = workdir / "served-splitserve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "splitserve"), "up", "--model", model,
                                 "--port", "0", "--grpc-port", "0",
                                 "--kv-cache-memory-bytes", str(args.kv_gib * 2**30),
                                 *shlex.split(args.splitserve_up_args)],
                                stdout=subprocess.PIPE, stderr=f, text=True, start_new_session=True)
    return ServedSide("splitserve", proc, log, signal.SIGINT)  # Ctrl-C: what its user would press


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


def wait_ready(side: ServedSide, timeout_s: float) -> None:
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


class ServedWorkloads:
    """serve_load.py's workloads, new prompts for every run (--quick: shorter prompts and outputs). Both sides of
    a round get the same prompts, but no run repeats an earlier run's: a repeated prompt is a prefix-cache hit, so
    rounds that repeated one workload measured cached prefills, and the c=1 workload (the first prompts of the
    c=8 one) measured nothing else."""

    def __init__(self, args):
        sys.path.insert(0, str(HERE.parent / "loadtest"))
        self.seed, self.requests = args.seed, {8: args.c8_requests, 1: args.c1_requests}
        self.words, self.out = ((20, 100), (16, 48)) if args.quick else ((20, 300), (16, 64))

    def _make(self, num_requests: int, index: int) -> list:
        import serve_load

        return serve_load.make_workload(num_requests, self.seed * 1000 + index, *self.words, *self.out)

    def warm_up(self) -> list:
        return self._make(4, 0)

    def round(self, rnd: int) -> dict[int, list]:
        """The c=8 and c=1 workloads of round `rnd` (from 0)."""
        return {c: self._make(n, 1 + 2 * rnd + (c == 1)) for c, n in self.requests.items()}


def wait_served(args, sides: list[ServedSide], workloads: ServedWorkloads) -> None:
    """Ready, warmed up (a first request compiles), then idle memory."""
    import serve_load

    for side in sides:
        wait_ready(side, args.start_timeout_s)
        results, _ = asyncio.run(serve_load.run_load(side.url, None, workloads.warm_up(), 2, None))
        failed = [r.error for r in results if not r.ok]
        if failed:
            raise BenchmarkError(f"served {side.name}: warm-up requests failed: {failed[:2]}; log {side.log}")
        print(f"served {side.name}: ready at {side.url}", flush=True)
    import idle_rss

    time.sleep(5.0)  # let both settle before reading idle memory
    for side in sides:
        memory = idle_rss.measure(side.proc.pid)
        side.idle_rss_bytes, side.idle_pss_bytes = sum(m.rss for m in memory), sum(m.pss for m in memory)


def measure_served(args, sides: list[ServedSide], workloads: ServedWorkloads) -> None:
    import serve_load

    for rnd in range(args.rounds):
        for c, workload in workloads.round(rnd).items():
            for side in sides if rnd % 2 == 0 else sides[::-1]:
                results, elapsed = asyncio.run(serve_load.run_load(side.url, None, workload, c, None))
                row = serve_load.summarize(side.name, results, elapsed)
                row["itl_tok_p50_ms"] = itl_per_token_ms(results)
                side.rounds.setdefault(c, []).append(row)
        print(f"served round {rnd + 1}/{args.rounds}: " + ", ".join(
            f"{s.name} c8 {s.rounds[8][-1]['output_tok_per_s']:.1f} tok/s" for s in sides), flush=True)


def stop_served(sides: list[ServedSide]) -> None:
    for side in sides:
        stop(side.proc, lambda: side.proc.send_signal(side.stop_signal))
