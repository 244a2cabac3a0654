"""The gateway's own added latency and its maximum request rate on one core, with max_tokens=1.

Starts its own stack (demo model unless --model; no Envoy, so clients talk to the gateway itself) with the
gateway's process (every thread) pinned to one core and everything else (the other services, this client) kept
off it, and runs two phases of short streamed completions, max_tokens=1:
  latency:  one request at a time. The gateway's own time per request (its handling time less its waits on the
            tokenizer and the workers) comes from its histogram splitserve_gateway_overhead_seconds, read before
            and after the phase; p50/p99 are interpolated within buckets as Prometheus' histogram_quantile does.
  max-rate: many requests at once. Measured: requests/s, and the gateway's CPU seconds over the phase (from
            /proc, less what it spends idle: health checks, discovery), so CPU per request and the rate its one core
            sustains at most (1 / CPU per request). When the measured rate is below that, something else (the
            workers, the client, a shared machine) bounded it.
The last line is `gateway_overhead_p50_ms: X.XX` (the latency phase's p50; goal < 2 ms).

    python loadtest/gateway_overhead.py [--quick] [--model M] [--gateway-cpu N] [--router-policy P]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families

from serve_load import RequestResult, cpu_seconds, make_workload, run_load

OVERHEAD_METRIC = "splitserve_gateway_overhead_seconds"
IDLE_S = 3.0     # how long the gateway's idle CPU use is measured

Buckets = list[tuple[float, float]]   # (upper bound, cumulative count), ascending, +Inf last


def parse_buckets(metrics_text: str, name: str = OVERHEAD_METRIC) -> Buckets:
    """The cumulative buckets of histogram `name` in a Prometheus text exposition (empty if it is absent)."""
    for family in text_string_to_metric_families(metrics_text):
        if family.name == name:
            return sorted((float(s.labels["le"]), s.value) for s in family.samples if s.name == name + "_bucket")
    return []


def bucket_delta(before: Buckets, after: Buckets) -> Buckets:
    """What was observed between two scrapes of the same histogram."""
    earlier = dict(before)
    return [(bound, count - earlier.get(bound, 0.0)) for bound, count in after]


def histogram_quantile(q: float, buckets: Buckets) -> float:
    """The q-quantile, linearly interpolated within its bucket (lower bound of the first bucket: 0), as
    Prometheus' histogram_quantile; in the +Inf bucket, the highest finite bound. NaN with no observations."""
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass
class Phase:
    name: str
    concurrency: int
    requests: int
    failed: int
    elapsed_s: float
    client_p50_s: float            # send to last byte, at the client
    overhead: Buckets              # the gateway's own time of this phase's requests
    gateway_cpu_s: float           # over the phase, less what it spends idle in as long

    @property
    def req_per_s(self) -> float:
        return (self.requests - self.failed) / self.elapsed_s if self.elapsed_s > 0 else float("nan")

    @property
    def cpu_per_request_s(self) -> float:
        done = self.requests - self.failed
        return self.gateway_cpu_s / done if done else float("nan")

    @property
    def max_rate_on_one_core(self) -> float:
        """Requests/s the gateway's core could serve if nothing else bounded it."""
        return 1.0 / self.cpu_per_request_s if self.cpu_per_request_s > 0 else float("nan")

    @property
    def cpu_share(self) -> float:
        """Of the one core the gateway has: 1.0 means it was the bottleneck."""
        return self.gateway_cpu_s / self.elapsed_s if self.elapsed_s > 0 else float("nan")


def phase_from(name: str, concurrency: int, results: Sequence[RequestResult], elapsed_s: float,
               overhead: Buckets, gateway_cpu_s: float) -> Phase:
    latencies = [r.latency for r in results if r.ok]
    return Phase(name, concurrency, len(results), sum(not r.ok for r in results), elapsed_s,
                 statistics.median(latencies) if latencies else float("nan"), overhead, gateway_cpu_s)


COLUMNS = ("phase", "conc", "requests", "failed", "req_per_s", "client_p50_ms", "overhead_p50_ms",
           "overhead_p99_ms", "gw_cpu_ms_per_req", "gw_core_busy")


def table(phases: Sequence[Phase]) -> list[str]:
    lines = [" | ".join(f"{c:>17}" for c in COLUMNS)]
    for p in phases:
        values = (p.name, p.concurrency, p.requests, p.failed, p.req_per_s, 1e3 * p.client_p50_s,
                  1e3 * histogram_quantile(0.5, p.overhead), 1e3 * histogram_quantile(0.99, p.overhead),
                  1e3 * p.cpu_per_request_s, p.cpu_share)
        lines.append(" | ".join(f"{v:>17.2f}" if isinstance(v, float) else f"{v:>17}" for v in values))
    return lines


def summary(latency: Phase, rate: Phase, gateway_cpu: int) -> list[str]:
    bound = ("the gateway's core was the bottleneck" if rate.cpu_share >= 0.9 else
             "something else bounded the measured rate (workers, the client, other load on this machine)")
    return [f"gateway pinned to core {gateway_cpu} (the stack's other processes and this client on the others); "
            "max_tokens=1, streamed completions",
            f"gateway max sustained rate on one core: {rate.max_rate_on_one_core:.0f} req/s "
            f"(1 / its CPU time per request at concurrency {rate.concurrency}); measured {rate.req_per_s:.1f} req/s "
            f"with its core {100 * rate.cpu_share:.0f}% busy: {bound}",
            f"gateway overhead at concurrency 1: p50 {1e3 * histogram_quantile(0.5, latency.overhead):.2f} ms, "
            f"p99 {1e3 * histogram_quantile(0.99, latency.overhead):.2f} ms",
            last_line(histogram_quantile(0.5, latency.overhead))]


def last_line(overhead_p50_s: float) -> str:
    return f"gateway_overhead_p50_ms: {1e3 * overhead_p50_s:.2f}"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests (about a minute)")
    parser.add_argument("--model", default=None, help="checkpoint (default: the demo model)")
    parser.add_argument("--latency-requests", type=int, default=None, help="default 400 (--quick: 60)")
    parser.add_argument("--rate-requests", type=int, default=None, help="default 2000 (--quick: 300)")
    parser.add_argument("--concurrency", type=int, default=32, help="of the max-rate phase")
    parser.add_argument("--gateway-cpu", type=int, default=None,
                        help="the core the gateway runs on (default: the first of this process's cores, the one "
                             "the launcher leaves to the services from 4 cores on)")
    parser.add_argument("--router-policy", default=None, help="the gateway's (default: its own default, prefix, "
                        "whose Redis lookup counts as the gateway's time; `load` makes none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.latency_requests is None:
        args.latency_requests = 60 if args.quick else 400
    if args.rate_requests is None:
        args.rate_requests = 300 if args.quick else 2000
    for name in ("latency_requests", "rate_requests", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from splitserve.cpus import allowed_cpus, pin_process
    from splitserve.launcher.stack import Stack

    cores = allowed_cpus()
    gateway_cpu = cores[0] if args.gateway_cpu is None else args.gateway_cpu
    # Every process the stack starts inherits this process's cores: all but the gateway's, which it gets alone.
    pin_process([core for core in cores if core != gateway_cpu] or cores)
    # Short prompts, one token each: the workers' share of a request is as small as it gets.
    workload = make_workload(args.latency_requests + args.rate_requests + 8, args.seed, 4, 12, 1, 1)
    warmup, workload = workload[:8], workload[8:]
    phases = []
    policy = ["--router-policy", args.router_policy] if args.router_policy else []
    with Stack(model=args.model, envoy=False, torch_threads=1, extra_args={"gateway": policy}) as stack:
        pin_process([gateway_cpu], pid=stack.process("gateway").pid)
        metrics_url = f"{stack.http_url}/metrics"
        asyncio.run(run_load(stack.base_url, None, warmup, 2, None))
        idle_before = cpu_seconds(stack).get("gateway", 0.0)
        time.sleep(IDLE_S)
        idle_cpu_per_s = (cpu_seconds(stack).get("gateway", 0.0) - idle_before) / IDLE_S
        for name, concurrency, requests in (("latency", 1, workload[:args.latency_requests]),
                                            ("max-rate", args.concurrency, workload[args.latency_requests:])):
            before, cpu_before = parse_buckets(httpx.get(metrics_url, timeout=10).text), cpu_seconds(stack)
            results, elapsed = asyncio.run(run_load(stack.base_url, None, requests, concurrency, None))
            after, cpu_after = parse_buckets(httpx.get(metrics_url, timeout=10).text), cpu_seconds(stack)
            gateway_cpu_s = cpu_after.get("gateway", 0.0) - cpu_before.get("gateway", 0.0) - idle_cpu_per_s * elapsed
            phases.append(phase_from(name, concurrency, results, elapsed, bucket_delta(before, after),
                                     gateway_cpu_s))
            for error in sorted({r.error for r in results if not r.ok})[:3]:
                print(f"    {name} error: {error}")
    print(f"gateway idle: {1e3 * idle_cpu_per_s:.1f} ms CPU per second (health checks, discovery), subtracted")
    print("\n".join(table(phases) + summary(phases[0], phases[1], gateway_cpu)))
    return 0 if all(p.failed == 0 for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
