"""Prefix-aware routing against round-robin on a multi-tenant workload like llm-d's.

K tenants each have a system prompt of 1,000-4,000 tokens; users send short questions after one of them (the
tenant drawn uniformly), arriving as a Poisson process at a fixed rate; everything from one seed. Prompts are
token ids, so prompt and cached token counts are exact. The model (built offline like the demo model, random
weights) is big enough that prefill dominates: 8 layers x 1024 hidden, or 4 x 512 with --quick so that it ends
within 5 minutes on a small CPU machine.

The regime is llm-d's, where routing matters: the tenants' system prompts together need more KV blocks than one
worker's cache holds, but fit in the decode workers' caches together. By default each worker's cache is sized
from the workload to the tenants' blocks split over the decode workers plus a quarter (for an uneven split and
the running requests' own blocks), printed at the start; --num-kv-blocks overrides it. Routed by prefix, each
tenant's requests meet its cached prompt; round-robin sends every tenant to every worker, whose cache then
evicts what it will need again. The kv-store (host tier) holds every block the prefill workers wrote, beyond
any worker's cache: a prefill worker lacking a prefix reads it from there instead of computing it, so it gives
round-robin hits too (at the cost of the transfer), while a decode worker that prefills a prompt itself computes
what its own cache lacks. Under round-robin the gateway does not consult the prefix index, so its path choice
sees no cached prefix: a prompt goes to a prefill worker (and can meet the kv-store's copy) only when the decode
worker's queue makes that sooner. The `from_kv_store` column says which share of each policy's hits came from
the kv-store.

The script starts its own stack (2 prefill and 2 decode workers, Redis, kv-store; no Envoy) and runs the workload
under router policy `round-robin`, then `prefix`, against the same running workers, Redis and kv-store: the policy
is a gateway flag, so between the two only the gateway is restarted (the launcher's supervisor starts it again on
the same ports with the new flag). Each policy gets system prompts of its own (same lengths, arrivals and
questions; other tokens), so neither finds the other's prefixes in a cache. Per policy it prints TTFT p50/p90,
requests/s and output tokens/s, the prefix-cache hit rate (cached / prompt tokens, from each response's
usage.prompt_tokens_details.cached_tokens), how much of it the prefill workers read from the kv-store rather than
their own cache, and its share of the ideal hit rate (each system prompt computed once, every later request
reusing its full blocks); then where prompts were prefilled (the gateway's path choices: local on the decode
worker, or remote on a prefill worker, by reason), each path's mean measured over predicted time to the first
token, and the prefill workers the router chose. The full workload arrives at 0.2/s: a 2-core machine prefills
the 8 x 1024 model at ~230 tokens/s per core, and at 0.5/s round-robin's queues grew to minutes.

--compare-aggregated then starts a second stack without prefill workers (the decode workers prefill every prompt,
`splitserve up --prefill-workers 0`), same decode workers, KV blocks and workload as the `prefix` run, and prints
`ttft_p50_disagg_vs_aggregated: X.XX` (disaggregated with the predicted-TTFT path choice / aggregated; the goal is
<= 1). The last line is `ttft_p50_prefix_vs_round_robin: X.XX` (prefix / round-robin).

    python loadtest/prefix_routing.py [--quick] [--compare-aggregated] [--rate R] [--requests N] [--tenants K]
                                      [--num-kv-blocks B] [--model M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families

from serve_load import RequestResult, one_request, percentile

POLICIES = ("round-robin", "prefix")
# Random weights, built offline; max_position_embeddings leaves room for the longest prompt and its answer.
MODELS = {
    "full": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=2816, max_position_embeddings=8192),
    "quick": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1408, max_position_embeddings=8192),
}
FIRST_TOKEN_ID = 16          # below: the demo tokenizer's special tokens, never in a prompt
STORE_HITS = "splitserve_prefill_store_prefix_hit_tokens_total"
DECISIONS = "splitserve_router_decisions_total"
PATHS = "splitserve_gateway_prefill_path_total"
PATH_TTFT_RATIO = "splitserve_gateway_prefill_path_ttft_ratio"
PREFILL_WORKERS, DECODE_WORKERS = 2, 2


@dataclass(frozen=True)
class Request:
    arrival_s: float             # after the phase starts
    tenant: int                  # whose system prompt comes first
    question: tuple[int, ...]


@dataclass(frozen=True)
class Workload:
    system_lengths: tuple[int, ...]
    requests: tuple[Request, ...]
    seed: int
    vocab_size: int


def make_workload(seed: int, tenants: int, system_min: int, system_max: int, requests: int, question_min: int,
                  question_max: int, rate: float, vocab_size: int) -> Workload:
    rng = random.Random(seed)
    lengths = tuple(rng.randint(system_min, system_max) for _ in range(tenants))
    arrival, made = 0.0, []
    for _ in range(requests):
        arrival += rng.expovariate(rate)
        question = tuple(rng.randrange(FIRST_TOKEN_ID, vocab_size)
                         for _ in range(rng.randint(question_min, question_max)))
        made.append(Request(arrival, rng.randrange(tenants), question))
    return Workload(lengths, tuple(made), seed, vocab_size)


def system_prompts(workload: Workload, phase: int) -> list[list[int]]:
    """The tenants' system prompts for one phase: the workload's lengths, tokens of the phase's own."""
    rng = random.Random(f"{workload.seed}/system/{phase}")
    return [[rng.randrange(FIRST_TOKEN_ID, workload.vocab_size) for _ in range(n)] for n in workload.system_lengths]


def prompts(workload: Workload, systems: Sequence[Sequence[int]]) -> list[list[int]]:
    return [[*systems[r.tenant], *r.question] for r in workload.requests]


def ideal_cached_tokens(workload: Workload, block_size: int) -> list[int]:
    """Per request, what a perfect cache reuses: nothing for a tenant's first request (in arrival order), the
    system prompt's full blocks for every later one (the block holding its end also holds the question)."""
    seen: set[int] = set()
    ideal = []
    for request in workload.requests:
        full_blocks = workload.system_lengths[request.tenant] // block_size * block_size
        ideal.append(full_blocks if request.tenant in seen else 0)
        seen.add(request.tenant)
    return ideal


def system_blocks(workload: Workload, block_size: int) -> int:
    """KV blocks the tenants' system prompts take, all of them cached at once."""
    return sum(math.ceil(n / block_size) for n in workload.system_lengths)


def default_kv_blocks(workload: Workload, block_size: int, workers: int = DECODE_WORKERS) -> int:
    """Per worker: the system prompts' blocks split over the workers, plus a quarter for an uneven split (tenants
    are placed whole) and the running requests' own blocks; never less than the longest prompt needs."""
    longest = math.ceil((max(workload.system_lengths) + max(len(r.question) for r in workload.requests))
                        / block_size) + 1
    return max(math.ceil(system_blocks(workload, block_size) * 5 / (4 * workers)), longest)


def sizing(workload: Workload, block_size: int, num_kv_blocks: int, workers: int = DECODE_WORKERS) -> str:
    """The regime in one line: how the system prompts compare with one worker's cache and with all of theirs."""
    needed = system_blocks(workload, block_size)
    return (f"KV cache per worker: {num_kv_blocks} blocks of {block_size} tokens; the {len(workload.system_lengths)} "
            f"system prompts take {needed} blocks: {needed / num_kv_blocks:.2f}x one worker's cache, "
            f"{needed / (workers * num_kv_blocks):.2f}x the {workers} decode workers' caches together")


@dataclass
class PhaseResult:
    policy: str
    results: list[RequestResult]
    elapsed_s: float
    ideal_cached: list[int]
    store_hit_tokens: float = 0.0            # read from the kv-store by the prefill workers
    decisions: dict[str, float] = field(default_factory=dict)   # the gateway's prefill choices, by reason
    paths: dict[str, float] = field(default_factory=dict)       # where prompts were prefilled: "path reason"
    # Per path: the mean of each first token's measured time over the time predicted for it (1: exact).
    prediction_ratios: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    @property
    def failed(self) -> int:
        return len(self.results) - len(self.ok)

    def ttft(self, q: float) -> float:
        return percentile([r.ttft for r in self.ok], q)

    @property
    def req_per_s(self) -> float:
        return len(self.ok) / self.elapsed_s

    @property
    def output_tok_per_s(self) -> float:
        return sum(r.output_tokens for r in self.ok) / self.elapsed_s

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.ok)

    @property
    def hit_rate(self) -> float:
        return sum(r.cached_tokens for r in self.ok) / self.prompt_tokens if self.prompt_tokens else float("nan")

    @property
    def ideal_hit_rate(self) -> float:
        ideal = sum(i for r, i in zip(self.results, self.ideal_cached) if r.ok)
        return ideal / self.prompt_tokens if self.prompt_tokens else float("nan")

    @property
    def share_of_ideal(self) -> float:
        return self.hit_rate / self.ideal_hit_rate if self.ideal_hit_rate else float("nan")

    @property
    def store_share(self) -> float:
        """Of the cached tokens, those the prefill workers read from the kv-store rather than their own cache."""
        cached = sum(r.cached_tokens for r in self.ok)
        return self.store_hit_tokens / cached if cached else float("nan")


COLUMNS = ("policy", "requests", "failed", "ttft_p50_ms", "ttft_p90_ms", "req_per_s", "output_tok_per_s",
           "hit_rate", "ideal_hit_rate", "share_of_ideal", "from_kv_store")


def table(phases: Sequence[PhaseResult]) -> list[str]:
    lines = [" | ".join(f"{c:>16}" for c in COLUMNS)]
    for p in phases:
        values = (p.policy, len(p.results), p.failed, 1e3 * p.ttft(0.5), 1e3 * p.ttft(0.9), p.req_per_s,
                  p.output_tok_per_s, p.hit_rate, p.ideal_hit_rate, p.share_of_ideal, p.store_share)
        lines.append(" | ".join(f"{v:>16.2f}" if isinstance(v, float) else f"{v:>16}" for v in values))
    for p in phases:
        paths = ", ".join(f"{path} {count:.0f}" for path, count in sorted(p.paths.items()) if count)
        ratios = ", ".join(f"{path} {ratio:.2f}" for path, ratio in sorted(p.prediction_ratios.items()))
        lines.append(f"{p.policy}: prefill paths: {paths or 'none counted'}"
                     + (f"; first token measured / predicted, mean: {ratios}" if ratios else ""))
        reasons = ", ".join(f"{reason} {count:.0f}" for reason, count in sorted(p.decisions.items()) if count)
        lines.append(f"{p.policy}: prefill worker choices by reason: {reasons or 'none counted'}")
        for error in sorted({r.error for r in p.results if not r.ok})[:3]:
            lines.append(f"{p.policy}: error: {error}")
    return lines


def last_line(round_robin: PhaseResult, prefix: PhaseResult) -> str:
    return f"ttft_p50_prefix_vs_round_robin: {prefix.ttft(0.5) / round_robin.ttft(0.5):.2f}"


def aggregated_line(disaggregated: PhaseResult, aggregated: PhaseResult) -> str:
    return f"ttft_p50_disagg_vs_aggregated: {disaggregated.ttft(0.5) / aggregated.ttft(0.5):.2f}"


def sample_sum(metrics_text: str, sample: str, **labels: str) -> float:
    """The sum of a Prometheus exposition's samples named `sample` whose labels include `labels`."""
    return sum(s.value for family in text_string_to_metric_families(metrics_text) for s in family.samples
               if s.name == sample and labels.items() <= s.labels.items())


def counts_by(metrics_text: str, sample: str, keys: Sequence[str], **labels: str) -> dict[str, float]:
    """A counter's samples whose labels include `labels`, summed by the values of the labels `keys` (joined by a
    space)."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == sample and labels.items() <= s.labels.items() and s.value:
                key = " ".join(s.labels.get(k, "") for k in keys)
                counts[key] = counts.get(key, 0.0) + s.value
    return counts


def decisions_by_reason(metrics_text: str, kind: str = "prefill") -> dict[str, float]:
    return counts_by(metrics_text, DECISIONS, ("reason",), kind=kind)


def paths_by_reason(metrics_text: str) -> dict[str, float]:
    return counts_by(metrics_text, PATHS, ("path", "reason"))


def since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: n - before.get(key, 0.0) for key, n in after.items() if n - before.get(key, 0.0)}


def prediction_ratios(before: str, after: str) -> dict[str, float]:
    """Per path, the mean measured / predicted time to the first token between two expositions."""
    sums = since(counts_by(before, PATH_TTFT_RATIO + "_sum", ("path",)),
                 counts_by(after, PATH_TTFT_RATIO + "_sum", ("path",)))
    counts = since(counts_by(before, PATH_TTFT_RATIO + "_count", ("path",)),
                   counts_by(after, PATH_TTFT_RATIO + "_count", ("path",)))
    return {path: sums.get(path, 0.0) / n for path, n in counts.items()}


async def run_arrivals(url: str, schedule: Sequence[tuple[float, list[int]]], max_tokens: int
                       ) -> tuple[list[RequestResult], float]:
    """Sends each prompt at its arrival time (open loop: a slow server does not slow the arrivals)."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=None)) as client:
        model = (await client.get(f"{url}/models")).json()["data"][0]["id"]
        start = time.perf_counter()

        async def send(at: float, prompt: list[int]) -> RequestResult:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            return await one_request(client, url, model, prompt, max_tokens, None)

        results = await asyncio.gather(*(send(at, prompt) for at, prompt in schedule))
        return list(results), time.perf_counter() - start


def switch_router_policy(stack, policy: str, timeout_s: float = 120.0) -> None:
    """Restarts only the gateway, with `policy`: the supervisor starts it again with its (updated) command line
    on the same ports; returns once it routes to every worker again."""
    gateway = stack.process("gateway")
    gateway.argv[gateway.argv.index("--router-policy") + 1] = policy
    old_pid = gateway.pid
    gateway.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while True:
        if gateway.pid != old_pid and gateway.alive:
            try:
                if httpx.get(f"{stack.http_url}/health?all=true", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not come back with --router-policy {policy} in {timeout_s:.0f} s; "
                               f"see {gateway.log_path}")
        time.sleep(0.2)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller model and workload: under 5 minutes")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: built offline, see above)")
    parser.add_argument("--tenants", type=int, default=None, help="system prompts (default 8; --quick 3)")
    parser.add_argument("--requests", type=int, default=None, help="per policy (default 40; --quick 24)")
    parser.add_argument("--rate", type=float, default=None, help="arrivals per second (default 0.2; --quick 0.5)")
    parser.add_argument("--system-min", type=int, default=1000)
    parser.add_argument("--system-max", type=int, default=4000)
    parser.add_argument("--question-min", type=int, default=16)
    parser.add_argument("--question-max", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--num-kv-blocks", type=int, default=None,
                        help="KV cache blocks per worker (default: from the workload, the system prompts' blocks "
                             "over the decode workers plus a quarter: more than one worker holds, less than all "
                             "together; see above)")
    parser.add_argument("--compare-aggregated", action="store_true",
                        help="also run `prefix` on a stack without prefill workers (see above)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    args.tenants = args.tenants or (3 if quick else 8)
    args.requests = args.requests or (24 if quick else 40)
    args.rate = args.rate or (0.5 if quick else 0.2)
    if args.tenants < 1 or args.requests < 1 or args.rate <= 0 or args.max_tokens < 1:
        parser.error("--tenants, --requests and --max-tokens must be >= 1 and --rate > 0")
    if args.num_kv_blocks is not None and args.num_kv_blocks < 1:
        parser.error("--num-kv-blocks must be >= 1")
    if not 1 <= args.system_min <= args.system_max or not 1 <= args.question_min <= args.question_max:
        parser.error("need 1 <= --system-min <= --system-max and 1 <= --question-min <= --question-max")
    return args


def run_phase(stack, label: str, workload: Workload, systems: Sequence[Sequence[int]], ideal: list[int],
              max_tokens: int) -> PhaseResult:
    """Warms the stack up, then runs the workload on it and reads what its metrics say about the run."""
    prefill_metrics = [f"http://127.0.0.1:{port}/metrics" for port in stack.metrics_ports.get("prefill", [])]

    def store_hits() -> float:
        return sum(sample_sum(httpx.get(u, timeout=10).text, STORE_HITS) for u in prefill_metrics)

    def gateway_metrics() -> str:
        return httpx.get(f"{stack.http_url}/metrics", timeout=10).text

    # Warm-up (not measured): each worker's first steps, on tokens no phase uses.
    warm = [[FIRST_TOKEN_ID + i % 7] * 64 for i in range(4)]
    asyncio.run(run_arrivals(stack.base_url, [(0.0, p) for p in warm], 2))
    store_before, metrics_before = store_hits(), gateway_metrics()
    schedule = [(r.arrival_s, p) for r, p in zip(workload.requests, prompts(workload, systems))]
    results, elapsed = asyncio.run(run_arrivals(stack.base_url, schedule, max_tokens))
    store_after, metrics_after = store_hits(), gateway_metrics()
    return PhaseResult(label, results, elapsed, ideal, store_after - store_before,
                       since(decisions_by_reason(metrics_before), decisions_by_reason(metrics_after)),
                       since(paths_by_reason(metrics_before), paths_by_reason(metrics_after)),
                       prediction_ratios(metrics_before, metrics_after))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from splitserve.config import EngineConfig
    from splitserve.demo_model import cached_checkpoint
    from splitserve.launcher.stack import Stack

    model = args.model or str(cached_checkpoint("llama", **MODELS["quick" if args.quick else "full"]))
    vocab_size = int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    workload = make_workload(args.seed, args.tenants, args.system_min, args.system_max, args.requests,
                             args.question_min, args.question_max, args.rate, vocab_size)
    block_size = EngineConfig.block_size
    ideal = ideal_cached_tokens(workload, block_size)
    num_kv_blocks = args.num_kv_blocks or default_kv_blocks(workload, block_size)
    print(f"model {model}; {args.tenants} system prompts of {sorted(workload.system_lengths)} tokens, "
          f"{args.requests} requests per policy at {args.rate}/s (Poisson), {args.max_tokens} output tokens each")
    print(sizing(workload, block_size, num_kv_blocks), flush=True)
    phases, aggregated = [], None
    common = dict(model=model, decode_workers=DECODE_WORKERS, envoy=False, torch_threads=1,
                  num_kv_blocks=num_kv_blocks)
    with Stack(prefill_workers=PREFILL_WORKERS, extra_args={"gateway": ["--router-policy", POLICIES[0]]},
               **common) as stack:
        print(f"logs: {stack.log_dir}", flush=True)
        for index, policy in enumerate(POLICIES):
            if index:
                switch_router_policy(stack, policy)
            phases.append(run_phase(stack, policy, workload, system_prompts(workload, index), ideal, args.max_tokens))
    if args.compare_aggregated:
        # The prefix run's own prompts, on fresh caches: the same workload the disaggregated stack served.
        with Stack(prefill_workers=0, extra_args={"gateway": ["--router-policy", "prefix"]}, **common) as stack:
            print(f"logs (aggregated): {stack.log_dir}", flush=True)
            aggregated = run_phase(stack, "prefix, aggregated", workload,
                                   system_prompts(workload, POLICIES.index("prefix")), ideal, args.max_tokens)
    print("\n".join(table(phases + ([aggregated] if aggregated else []))))
    if aggregated is not None:
        print(aggregated_line(phases[1], aggregated))
    print(last_line(*phases))
    return 0 if all(p.failed == 0 for p in phases + ([aggregated] if aggregated else [])) else 1


if __name__ == "__main__":
    sys.exit(main())
