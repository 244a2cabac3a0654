"""Medians, ratios and tables of an A/B benchmark (benchmarks/vs_vllm.py). Pure functions, unit-tested."""

from __future__ import annotations

import math
import statistics


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

