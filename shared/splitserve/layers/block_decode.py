"""Decode attention over only the blocks each row owns: split by block, then combined (flash-decoding style).

Why: the one-pass `paged_decode` pads every row to the longest row's blocks, and decode attention reads the KV
cache from memory, so a ragged batch pays for its padding in bandwidth (64 rows of 33-768 tokens: half of what it
read was padding, and attention was 63 % of the offline run). Here each real block of the step is one item: its
scores, its softmax max and sum and its weighted values are computed per block, then each row combines its own
blocks' partials. Reads are the real KV plus the last block's tail.

Two compiled calls, not one: in a single graph Inductor recomputes the scores inside each reduction that uses them
(max, sum, weighted values) and reads K three times; materialising the scores (P x block_size x heads floats, 1/64
of K at head_dim 64) keeps it to one read of K and one of V (measured at 64 rows of 33-768 tokens: 8.1 -> 4.9 ms).
Between the two the scores are transposed (eager, a copy of 1/64 of K's bytes) so that block_size is their last
dimension: Inductor vectorises a kernel along its last dimension, and with heads last (8 here, under one AVX-512
vector of 16 floats) the softmax ran as scalar tail loops and did not scale to two threads (64 rows, 2 threads:
11.1 -> 7.6 ms per layer, benchmarks/decode_attention.py; offline throughput +25 % in an interleaved A/B).
Only the sizes that change from step to step are dynamic (rows, items, blocks per row, cache blocks); block size,
heads and head_dim stay static, so Inductor unrolls and vectorises the inner loops for them (measured: 22 % faster
than all-dynamic at 16-64 rows).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch._dynamo


@dataclass
class BlockPlan:
    """A step's real blocks, built once from the block tables and reused by every layer.

    blocks [P]: cache block of each item; rows [P]: its decode row; lens [P]: tokens of it the row has written;
    combine [n, max_blocks]: item index of each row's j-th block, P (no item) past the row's last block. The items
    are every row's full blocks first (lens = block_size), then each row's last block, in row order: only those
    last n can hold unwritten slots, so only they pay for masking them.
    """

    blocks: torch.Tensor
    rows: torch.Tensor
    lens: torch.Tensor
    combine: torch.Tensor

    @property
    def num_items(self) -> int:
        return self.blocks.shape[0]


def block_plan(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> BlockPlan:
    """`block_tables` [n, max_blocks] (padded past each row's blocks), `context_lens` [n] (>= 1 each).

    Dynamo specialises sizes of 1: callers keep n >= 2 (so there are >= 2 items); max_blocks is padded to >= 2 here,
    so that one compiled graph serves every step."""
    n, max_blocks = block_tables.shape
    device = block_tables.device
    lens = context_lens.long()
    owned = -(-lens // block_size)
    col = torch.arange(max(max_blocks, 2), device=device)
    last = col[None, :] == (owned - 1)[:, None]
    full = col[None, :] < (owned - 1)[:, None]
    num_full = int(full.sum())
    row = torch.arange(n, device=device)
    combine = torch.where(full, torch.cumsum(full.reshape(-1), 0).view(full.shape) - 1,
                          torch.where(last, num_full + row[:, None], num_full + n))
    tables = block_tables.long()
    full = full[:, :max_blocks]
    return BlockPlan(
        blocks=torch.cat([tables[full], tables[row, owned - 1]]),
        rows=torch.cat([row[:, None].expand(n, max_blocks)[full], row]),
        lens=torch.cat([torch.full((num_full,), block_size, device=device), lens - (owned - 1) * block_size]),
        combine=combine)


def block_scores(q, k_cache, blocks, rows) -> torch.Tensor:
    """[P, block_size, Hkv, G]: each item's query (q [n, Hq, D], already scaled) against its block's keys."""
    _, hq, d = q.shape
    hkv = k_cache.shape[2]
    queries = q.float()[rows].view(-1, 1, hkv, hq // hkv, d)
    keys = k_cache[blocks].float().unsqueeze(-2)  # [P, bs, Hkv, 1, D]
    return (keys * queries).sum(-1)


def combine_blocks(scores, v_cache, blocks, lens, combine) -> torch.Tensor:
    """`scores` [P, Hkv, G, block_size]: softmax within each block (slots past `lens` excluded, so unwritten slots,
    even NaN, add nothing), weighted values per block, then each row's blocks rescaled to their common max and
    summed: [n, Hq, D] in float32. The last n items (each row's last block) are the only ones masked."""
    num_items, hkv, g, bs = scores.shape
    n = combine.shape[0]
    full = num_items - n
    valid = torch.arange(bs, device=scores.device) < lens.view(-1, 1, 1, 1)
    scores = torch.where(valid, scores, float("-inf"))
    block_max = scores.amax(-1)  # [P, Hkv, G]
    weights = torch.where(valid, torch.exp(scores - block_max.unsqueeze(-1)), 0.0)
    block_sum = weights.sum(-1)
    values = v_cache[blocks].float().unsqueeze(-2)  # [P, bs, Hkv, 1, D]
    weighted = weights.permute(0, 3, 1, 2).unsqueeze(-1) * values
    last_valid = valid[full:].view(-1, bs, 1, 1, 1)
    block_out = torch.cat([weighted[:full].sum(1), torch.where(last_valid, weighted[full:], 0.0).sum(1)])
    present = (combine < num_items).view(n, -1, 1, 1)
    items = combine.clamp(max=num_items - 1)
    maxes = torch.where(present, block_max[items], float("-inf"))  # [n, max_blocks, Hkv, G]
    factors = torch.where(present, torch.exp(maxes - maxes.amax(1, keepdim=True)), 0.0)
    total = (block_sum[items] * factors).sum(1)
    out = (block_out[items] * factors.unsqueeze(-1)).sum(1) / total.unsqueeze(-1)
    return out.reshape(n, hkv * g, -1)


STAGES = (block_scores, combine_blocks)


_COMPILED: dict[tuple, tuple] = {}


def compiled_block_decode(k_cache: torch.Tensor, num_heads: int) -> tuple:
    """The two stages compiled for one cache shape (block size, heads, head_dim, dtype), static but for the
    dimensions `block_decode` marks dynamic; kept per process, so engines made one after another share them.

    Each shape gets code objects of its own: Dynamo keeps a function's graphs per code object, up to 8, and a process
    that serves several models (the tests) would otherwise run out and fall back to eager."""
    key = (*k_cache.shape[1:], num_heads, k_cache.dtype)
    if key not in _COMPILED:
        tag = "_".join(str(k).replace("torch.", "") for k in key)
        _COMPILED[key] = tuple(torch.compile(_own_code(fn, tag), dynamic=False) for fn in STAGES)
    return _COMPILED[key]


def _own_code(fn, tag: str):
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def block_decode(q, k_cache, v_cache, plan: BlockPlan, scale: float, stages=None) -> torch.Tensor:
    """q [n, Hq, D] (n >= 2) over the rows' real blocks; `stages` (scores, combine): compiled by default, the plain
    functions for a reference. The scale goes into q here, not into the graph, where a float would be a guard."""
    scores_fn, combine_fn = stages or compiled_block_decode(k_cache, q.shape[1])
    queries = q.float() * scale
    _dynamic(queries, k_cache, v_cache, plan.blocks, plan.rows, plan.lens, plan.combine)
    torch._dynamo.mark_dynamic(plan.combine, 1)
    scores = scores_fn(queries, k_cache, plan.blocks, plan.rows).permute(0, 2, 3, 1).contiguous()
    _dynamic(scores)
    return combine_fn(scores, v_cache, plan.blocks, plan.lens, plan.combine).to(q.dtype)


def _dynamic(*tensors: torch.Tensor) -> None:
    for t in tensors:
        torch._dynamo.mark_dynamic(t, 0)
