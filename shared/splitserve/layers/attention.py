"""Paged attention: write this step's K/V into the block cache, then attend over each sequence's blocks.

Two backends behind one call: torch (CPU, and the reference the kernels are tested against; decode compiled by
Inductor unless turned off) and Triton (CUDA). The runner orders a step's sequences decodes-first, so the decode
rows form one dense batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from splitserve.layers.block_decode import BlockPlan, block_decode, block_plan, compiled_block_decode

log = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32: KV length after this step
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    num_decodes: int  # sequences 0..num_decodes-1 contribute exactly one query each
    query_lens: list[int]
    context_lens_list: list[int]
    block_size: int
    decode_groups: Optional[list] = None  # the torch backend's decode plan: made by the first layer, reused
    decode_blocks: Optional[BlockPlan] = None  # or, compiled over ragged rows, its per-block plan
    block_table_lists: Optional[list[list[int]]] = None  # block_tables as Python lists, if the builder has them
    _run_starts: dict[int, Optional[int]] = field(default_factory=dict, init=False, repr=False)  # run_start, per row

    def run_start(self, row: int) -> Optional[int]:
        """The first block of `row` when the blocks holding its context are consecutive in the cache (its K/V are
        then one slice of it, read in place), else None. Asked by every layer, worked out by the first."""
        if row not in self._run_starts:
            table = (self.block_table_lists[row] if self.block_table_lists is not None
                     else self.block_tables[row].tolist())
            blocks = table[: -(-self.context_lens_list[row] // self.block_size)]
            first = blocks[0]
            consecutive = all(block == first + i for i, block in enumerate(blocks))
            self._run_starts[row] = first if consecutive else None
        return self._run_starts[row]

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens_list) if self.context_lens_list else 0


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


class TorchAttentionBackend:
    """Plain torch. Decode rows: with `compile_decode` (the CPU default), `paged_decode` compiled by Inductor
    reads the paged cache in place, one pass over K and one over V (measured 5x faster than the eager path at 64
    rows of 33-768 tokens); rows averaging 6 blocks or more, and ragged rows (8 or more, padded blocks over 1.3x
    their own), run split by block instead (layers/block_decode.py), reading only their own blocks; without
    `compile_decode`, each length group's blocks are gathered into a dense padded batch for one SDPA call. A single
    decode row (c=1) runs eager on its own slots only, cheaper than the compiled call's guards and two-row padding
    (200 tokens, 1 thread: 0.10 vs 0.19 ms, benchmarks/decode_attention.py), read in place where its blocks are
    consecutive, until it holds 28 blocks, 56 in place (then split by block, compiled). Prefill rows: SDPA, eager
    (a chunk over a cached prefix reads it in place the same way).
    """

    name = "torch"

    def __init__(self, compile_decode: bool = False, slack: Optional[float] = None, compile_required: bool = True,
                 split_padding: Optional[float] = None):
        self._compiled = _compiled_paged_decode() if compile_decode else None
        self._block_decode = compile_decode  # its stages compiled at warm-up, for the cache's shape
        self._block_stages = None
        # Compiled: rows whose padded blocks outnumber their real ones by this factor run split by block instead.
        self.split_padding = _SPLIT_PADDING if split_padding is None else split_padding
        # Eager pays for padding with copies, compiled only with reads of masked slots: each its own slack.
        self.slack = slack if slack is not None else (_COMPILED_SLACK if compile_decode else _EAGER_SLACK)
        self._compile_required = compile_required
        self.compile_fallbacks = 0

    def warm_up(self, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int) -> None:
        """Compiles the decode path now, at start-up, rather than inside the first request. Where compiling fails
        (no C++ compiler, say) and compiling was not asked for by name, decode attention runs eager."""
        if self._compiled is None:
            return
        # Warm up as the runner calls: under inference_mode, with the two caches, with sizes that share no value with
        # the caches' (Dynamo guards on the mode, on aliasing and on sizes that happened to be equal).
        rows, num_blocks, kw = 3, 5, dict(device=k_cache.device)
        try:
            with torch.inference_mode():
                q = torch.zeros(rows, num_heads, k_cache.shape[-1], dtype=k_cache.dtype, **kw)
                tables = torch.zeros(rows, num_blocks, dtype=torch.int32, **kw)
                lens = torch.ones(rows, dtype=torch.int32, **kw)
                self._compiled(q, k_cache, v_cache, tables, lens, 1.0)
                self._block_stages = compiled_block_decode(k_cache, num_heads)
                # Rows of 3, 2 and 1 blocks: 3 full blocks, as a split step has (_MIN_FULL_BLOCKS).
                block_lens = torch.tensor([2, 1, 0], dtype=torch.int32, **kw) * k_cache.shape[1] + 1
                block_decode(q, k_cache, v_cache, block_plan(tables, block_lens, k_cache.shape[1]), 1.0,
                             self._block_stages)
        except Exception as exc:  # Inductor fails in many ways (compiler, headers, codegen); all mean "run eager"
            if self._compile_required:
                raise
            log.warning("compiling decode attention failed, running it eager (several times slower): %s: %s",
                        type(exc).__name__, exc)
            self._compiled, self._block_decode, self.slack = None, False, _EAGER_SLACK
            self.compile_fallbacks += 1

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta, scale)
        start = nd
        for b in range(nd, len(meta.query_lens)):
            q_len, ctx = meta.query_lens[b], meta.context_lens_list[b]
            rows = slice(start, start + q_len)
            if q_len == ctx:  # a whole prompt in one go: its K/V are this step's, no need to read the cache
                out[rows] = prefill_sdpa(q[rows], k[rows], v[rows], scale)
            else:
                out[rows] = self._prefill_one(q[rows], k_cache, v_cache, meta.block_tables[b], meta.run_start(b),
                                              q_len, ctx, scale)
            start += q_len
        return out

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if self._compiled is not None and self._block_decode and _split_by_block(meta, self.split_padding):
            if q.shape[0] == 1:    # paired with a one-token row on its first block: the graphs need n >= 2
                return block_decode(q.expand(2, *q.shape[1:]), k_cache, v_cache, meta.decode_blocks, scale,
                                    self._block_stages)[:1]
            return block_decode(q, k_cache, v_cache, meta.decode_blocks, scale, self._block_stages)
        if q.shape[0] == 1:
            return self._decode_one_row(q, k_cache, v_cache, meta.block_tables[0], meta.run_start(0),
                                        meta.context_lens_list[0], scale)
        groups = _decode_groups(meta, self.slack)
        rows_fn = self._decode_rows if self._compiled is None else self._compiled_rows
        if len(groups) == 1:
            return rows_fn(q, k_cache, v_cache, *groups[0][1:], scale)
        out = torch.empty_like(q)
        for index, tables, context_lens in groups:
            out[index] = rows_fn(q.index_select(0, index), k_cache, v_cache, tables, context_lens, scale)
        return out

    def _compiled_rows(self, q, k_cache, v_cache, tables, context_lens, scale: float) -> torch.Tensor:
        n = q.shape[0]
        # Dynamo specialises sizes of 1: keep both dynamic sizes >= 2 so one compiled graph serves every step.
        if tables.shape[1] == 1:
            tables = F.pad(tables, (0, 1))
        if n == 1:
            q, tables, context_lens = q.repeat(2, 1, 1), tables.repeat(2, 1), context_lens.repeat(2)
        return self._compiled(q, k_cache, v_cache, tables, context_lens, scale)[:n]

    @staticmethod
    def _decode_rows(q, k_cache, v_cache, tables, context_lens, scale: float) -> torch.Tensor:
        """Gathers the rows' blocks (`tables` already cut to the longest row's) into a dense, padded batch and
        runs one SDPA over it."""
        n, num_blocks = tables.shape
        block_size = k_cache.shape[1]
        # index_select over the block dimension: on CPU several times faster than advanced indexing.
        flat = tables.reshape(-1)
        shape = (n, num_blocks * block_size, *k_cache.shape[2:])
        keys = k_cache.index_select(0, flat).view(shape).transpose(1, 2)  # [n, Hkv, L, D]
        values = v_cache.index_select(0, flat).view(shape).transpose(1, 2)
        positions = torch.arange(keys.shape[2], device=q.device)
        mask = (positions[None, :] < context_lens[:, None]).view(n, 1, 1, -1)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
        return out.squeeze(2)

    @staticmethod
    def _decode_one_row(q, k_cache, v_cache, block_table, run_start: Optional[int], ctx: int,
                        scale: float) -> torch.Tensor:
        """One decode row (c=1): exactly its own `ctx` slots, so there is nothing to mask."""
        keys, values = _own_slots(k_cache, v_cache, block_table, run_start, ctx)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                             scale=scale, enable_gqa=True)
        return out.transpose(0, 1)  # [Hq, 1, D] -> [1, Hq, D]

    @staticmethod
    def _prefill_one(q, k_cache, v_cache, block_table, run_start: Optional[int], q_len: int, ctx: int, scale: float):
        keys, values = _own_slots(k_cache, v_cache, block_table, run_start, ctx)
        if q_len == ctx:
            return prefill_sdpa(q, keys, values, scale)
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
        return prefill_sdpa(q, keys, values, scale, mask)


def _own_slots(k_cache, v_cache, block_table, run_start: Optional[int], ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first `ctx` keys and values, [ctx, Hkv, D] each: a slice of the cache where its blocks are
    consecutive (`run_start`, their first; as a sequence served alone usually has them), else gathered from its
    blocks. The slice saves a copy of every K/V byte, and the same values reach the same SDPA call (one decode row,
    8 layers, one thread, AVX2 EPYC, benchmarks/one_row_decode.py: 600 tokens 6.5-6.8 ms in place vs 6.9-7.3
    gathered, 900 tokens 9.9-12.0 vs 12.0-15.5)."""
    num_blocks = -(-ctx // k_cache.shape[1])
    if run_start is not None:
        blocks = slice(run_start, run_start + num_blocks)
        return k_cache[blocks].flatten(0, 1)[:ctx], v_cache[blocks].flatten(0, 1)[:ctx]
    blocks = block_table[:num_blocks]
    return (k_cache.index_select(0, blocks).flatten(0, 1)[:ctx], v_cache.index_select(0, blocks).flatten(0, 1)[:ctx])


def prefill_sdpa(q, k, v, scale: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SDPA over one sequence's tokens: q [q_len, Hq, D], k/v [ctx, Hkv, D] -> [q_len, Hq, D]; causal unless
    `mask` ([q_len, ctx], True = attend) says otherwise.

    Given a batch dimension: on CPU, torch picks its flash kernel only for 4-D inputs and runs 3-D ones through the
    math path, which builds the whole q_len x ctx score matrix (measured: 1.7x slower at 384 tokens, 4x at 1024)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask,
        is_causal=mask is None, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


_EAGER_SLACK = 1.25
_COMPILED_SLACK = float("inf")  # measured: one group is fastest compiled
# Split by block whenever the rows hold this many blocks each on average, or (from this many rows on) whenever
# their padding (padded blocks / real ones) passes `split_padding`. Measured per step (8 layers and the plan, one
# thread, benchmarks/decode_attention.py's shapes): the split read beats the one-pass kernel at every row count from
# 2 once the rows average about 5 blocks (2 rows of 100-600 tokens: 6.2 vs 8.7 ms; 8 of 300-340: 13.5 vs 23.9; 8 of
# 100-600: 16.1 vs 34.1), and loses below (2 rows of 20-40 tokens: 3.0 vs 1.9 ms, its plan and second call).
_SPLIT_MIN_BLOCKS_PER_ROW = 6
# A single row (c=1) reads only its own slots eagerly below this (one row, 8 layers, one thread: 300 tokens eager
# 2.35 vs split 2.93 ms; 700 tokens 7.67 vs 4.34).
_SPLIT_ONE_ROW_BLOCKS = 28
# A single row on consecutive blocks reads them in place (no gathered copy), faster than the split until about
# 900 tokens (benchmarks/one_row_decode.py, 8 layers, one thread, AVX2 EPYC, ms per step in 3 rounds: 600 tokens
# in place 6.5-6.8, split 8.2-8.4, gathered 6.9-7.3; 900: 9.9-12.0, 9.5-10.3, 12.0-15.5; 1400: 15-27, 12-14, 30-34).
_SPLIT_ONE_RUN_BLOCKS = 56
_SPLIT_PADDING = 1.3
_SPLIT_MIN_ROWS = 8
# And only with this many full blocks (all but each row's last): block_decode's graph would specialise on 0 or 1;
# block_plan's graphs also need n >= 2.
_MIN_FULL_BLOCKS = 2


def _split_by_block(meta: AttentionMetadata, split_padding: float) -> bool:
    """Whether this step's decode rows run split by block (and if so, their plan in meta.decode_blocks); decided
    once per step, by the first layer. `split_padding` inf: never. A single row runs split from
    _SPLIT_ONE_ROW_BLOCKS blocks on (_SPLIT_ONE_RUN_BLOCKS when they are consecutive, read in place below that),
    planned with a second row of one token on its first block."""
    nd = meta.num_decodes
    if meta.decode_blocks is None and meta.decode_groups is None and nd >= 1 and split_padding != float("inf"):
        owned = [-(-n // meta.block_size) for n in meta.context_lens_list[:nd]]
        if nd == 1:
            split_from = _SPLIT_ONE_ROW_BLOCKS if meta.run_start(0) is None else _SPLIT_ONE_RUN_BLOCKS
            if owned[0] >= split_from:
                tables = meta.block_tables[:1, :owned[0]]
                tables = torch.cat([tables, torch.zeros_like(tables)])
                tables[1, 0] = tables[0, 0]
                lens = torch.cat([meta.context_lens[:1], torch.ones_like(meta.context_lens[:1])])
                meta.decode_blocks = block_plan(tables, lens, meta.block_size)
            return meta.decode_blocks is not None
        total = sum(owned)
        long_rows = total >= _SPLIT_MIN_BLOCKS_PER_ROW * nd
        ragged = nd >= _SPLIT_MIN_ROWS and nd * max(owned) > split_padding * total
        if (long_rows or ragged) and total - nd >= _MIN_FULL_BLOCKS:
            tables = meta.block_tables[:nd, :max(owned)]
            meta.decode_blocks = block_plan(tables, meta.context_lens[:nd], meta.block_size)
    return meta.decode_blocks is not None


def _decode_groups(meta: AttentionMetadata, slack: float) -> list[tuple[Optional[torch.Tensor], torch.Tensor,
                                                                       torch.Tensor]]:
    """(row index or None for all rows, block tables cut to the group's longest row, context lengths) per
    length group; built once per step and reused by every layer."""
    if meta.decode_groups is None:
        nd = meta.num_decodes
        groups = _length_groups(meta.context_lens_list[:nd], slack)
        plan = []
        for rows in groups:
            index = None if len(groups) == 1 else torch.tensor(rows, device=meta.context_lens.device)
            tables = meta.block_tables[:nd] if index is None else meta.block_tables.index_select(0, index)
            lens = meta.context_lens[:nd] if index is None else meta.context_lens.index_select(0, index)
            num_blocks = -(-max(meta.context_lens_list[i] for i in rows) // meta.block_size)
            plan.append((index, tables[:, :num_blocks].contiguous(), lens))
        meta.decode_groups = plan
    return meta.decode_groups


_COMPILED_PAGED_DECODE = None


def _compiled_paged_decode():
    """One compiled function per process: engines made one after another (tests, restarts) share its graphs."""
    global _COMPILED_PAGED_DECODE
    if _COMPILED_PAGED_DECODE is None:
        _COMPILED_PAGED_DECODE = torch.compile(paged_decode, dynamic=True)
    return _COMPILED_PAGED_DECODE


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale: float) -> torch.Tensor:
    """One query per row over its blocks of the paged cache, written as reductions so that Inductor fuses the
    block lookup into them and reads the cache in place (eager torch would materialise every product: use it
    only compiled, or as a reference).

    q [n, Hq, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [n, nb]; context_lens [n].
    """
    n, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    nb = block_tables.shape[1]
    tables = block_tables.long()
    qg = q.float().view(n, 1, 1, hkv, hq // hkv, d)
    keys = k_cache[tables].float().unsqueeze(-2)  # [n, nb, bs, Hkv, 1, D]
    scores = (keys * qg).sum(-1) * scale  # [n, nb, bs, Hkv, G]
    positions = torch.arange(nb * block_size, device=q.device).view(1, nb, block_size, 1, 1)
    valid = positions < context_lens.view(n, 1, 1, 1, 1)
    scores = torch.where(valid, scores, float("-inf"))
    weights = torch.exp(scores - scores.amax(dim=(1, 2), keepdim=True))
    weights = torch.where(valid, weights, 0.0)  # so that unwritten (even NaN) slots add nothing
    values = v_cache[tables].float().unsqueeze(-2)  # [n, nb, bs, Hkv, 1, D]
    out = torch.where(valid.unsqueeze(-1), weights.unsqueeze(-1) * values, 0.0).sum(dim=(1, 2))
    out = out / weights.sum(dim=(1, 2)).unsqueeze(-1)
    return out.reshape(n, hq, d).to(q.dtype)


def _length_groups(context_lens: list[int], slack: float = 1.25) -> list[list[int]]:
    """Splits decode rows into groups whose padded size stays within `slack` of their real KV length.

    The torch path copies every row's KV into a dense batch padded to the longest row; with mixed lengths most
    of that copy is padding (measured: the gather alone outweighed the linear layers at 64 sequences of 32-768
    tokens). Rows are sorted by length and cut where padding would exceed the slack.
    """
    order = sorted(range(len(context_lens)), key=lambda i: -context_lens[i])
    groups: list[list[int]] = []
    total = 0
    for i in order:
        ctx = context_lens[i]
        if groups and context_lens[groups[-1][0]] * (len(groups[-1]) + 1) <= slack * (total + ctx):
            groups[-1].append(i)
            total += ctx
        else:
            groups.append([i])
            total = ctx
    return groups


class TritonAttentionBackend:
    name = "triton"

    def __init__(self):
        from splitserve.kernels import paged_attention

        self._kernels = paged_attention

    compile_fallbacks = 0

    def warm_up(self, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int) -> None:
        pass

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        nd = meta.num_decodes
        parts = []
        if nd:
            parts.append(
                self._kernels.paged_decode_attention(
                    q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.context_lens[:nd], scale
                )
            )
        if nd < len(meta.query_lens):
            cu = meta.cu_seqlens_q[nd:] - meta.cu_seqlens_q[nd]
            parts.append(
                self._kernels.paged_prefill_attention(
                    q[nd:], k_cache, v_cache, meta.block_tables[nd:], cu, meta.context_lens[nd:], scale
                )
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)


BACKENDS = ("auto", "torch", "torch-compile", "triton")


def select_backend(device: torch.device, requested: str = "auto"):
    """auto: Triton on CUDA, compiled torch elsewhere (eager if compiling fails); torch: eager, no compiling."""
    if requested == "torch":
        return TorchAttentionBackend()
    if requested == "torch-compile" or (requested == "auto" and device.type != "cuda"):
        return TorchAttentionBackend(compile_decode=True, compile_required=requested != "auto")
    if requested in ("triton", "auto"):
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {requested!r} ({', '.join(BACKENDS)})")
