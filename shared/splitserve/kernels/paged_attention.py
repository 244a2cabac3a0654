"""Triton paged attention over a block-paged KV cache (decode and causal/chunked prefill).

Cache layout per layer: ``k_cache``/``v_cache`` are ``[num_blocks, block_size, num_kv_heads, head_dim]``;
logical KV position ``p`` of sequence ``b`` lives at ``cache[block_tables[b, p // block_size], p % block_size]``.

Both entry points share one kernel. A program owns one KV head and a tile of query rows; the rows are
(query, q head) pairs for every q head in that KV head's GQA group, so each K/V tile is loaded once per
group instead of once per q head. Softmax is computed online (flash-attention style) in fp32.

On CPU the kernels only run under the Triton interpreter (``TRITON_INTERPRET=1``, which must be set
before ``triton`` is first imported).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton: the module still imports, the wrappers refuse to run.
    triton = None
    tl = None

__all__ = ["paged_decode_attention", "paged_prefill_attention", "triton_available"]

_LOG2E = 1.4426950408889634
# Tile sizes for 2-byte dtypes at head_dim <= 128; wider rows (fp32, head_dim 256) get proportionally
# smaller tiles so shared memory stays under ~100 KB (the sm_86/89 limit).
# Query rows (query x head-in-group) per prefill program; >= 16 so tl.dot has a legal M.
_PREFILL_ROWS = 64
# KV positions per loop iteration: this many, or one whole block if blocks are larger.
_MIN_KV_TILE = 64
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    if triton is not None:
        knobs = getattr(triton, "knobs", None)
        if knobs is not None:
            return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """True when the kernels can actually run here: triton imports and there is a GPU or the interpreter."""
    if triton is None:
        return False
    return torch.cuda.is_available() or _interpreting()


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


if triton is not None:

    @triton.jit
    def _paged_attn_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr,
        block_tables_ptr, context_lens_ptr,
        cu_seqlens_ptr, tile_seq_ptr, tile_start_ptr,
        scale_log2,
        stride_qt, stride_qh, stride_qd,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_ot, stride_oh, stride_od,
        stride_bt,
        GROUP: tl.constexpr,        # q heads per kv head
        GROUP_P: tl.constexpr,      # GROUP padded to a power of two (and so that rows >= 16)
        BLOCK_Q: tl.constexpr,      # queries per program
        BLOCK_N: tl.constexpr,      # KV positions per iteration (multiple of BLOCK_SIZE)
        BLOCK_SIZE: tl.constexpr,   # paged-cache block size
        HEAD_DIM: tl.constexpr,
        IS_DECODE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOT_UPCAST: tl.constexpr,   # interpreter only: its tl.dot multiplies raw bf16 bit patterns
    ):
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)

        if IS_DECODE:
            # One query per sequence: grid axis 0 is the sequence, which is also its row in q.
            seq = tile
            q_start = 0
            q_len = 1
            first_tok = tile
        else:
            # The host-built tile map says which sequence (and which slice of its queries) this is.
            seq = tl.load(tile_seq_ptr + tile)
            if seq < 0:
                return
            q_start = tl.load(tile_start_ptr + tile)
            seq_tok0 = tl.load(cu_seqlens_ptr + seq)
            q_len = tl.load(cu_seqlens_ptr + seq + 1) - seq_tok0
            first_tok = seq_tok0 + q_start
        ctx_len = tl.load(context_lens_ptr + seq)

        # Row r of the tile is query r // GROUP_P, q head kv_head * GROUP + r % GROUP_P.
        rows = tl.arange(0, BLOCK_Q * GROUP_P)
        q_idx = rows // GROUP_P
        h_in_group = rows % GROUP_P
        head = kv_head * GROUP + h_in_group
        row_ok = (q_start + q_idx < q_len) & (h_in_group < GROUP)
        tok = (first_tok + q_idx).to(tl.int64)
        dims = tl.arange(0, HEAD_DIM)

        q = tl.load(
            q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :] * stride_qd,
            mask=row_ok[:, None], other=0.0,
        )
        if DOT_UPCAST:
            q = q.to(tl.float32)
        # Absolute position of each query; it sees KV positions <= its own.
        q_pos = ctx_len - q_len + q_start + q_idx
        # Causal: nothing past the last query of this tile is ever needed, so those tiles are skipped.
        kv_end = tl.minimum(ctx_len, ctx_len - q_len + q_start + BLOCK_Q)

        # Finite floor (not -inf) so fully masked rows give exp2(-inf - floor) = 0 instead of NaN.
        m_i = tl.full([BLOCK_Q * GROUP_P], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_Q * GROUP_P], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP_P, HEAD_DIM], dtype=tl.float32)

        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
        v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
        for kv_start in range(0, kv_end, BLOCK_N):
            pos = kv_start + tl.arange(0, BLOCK_N)
            pos_ok = pos < kv_end
            phys = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
            slot = pos % BLOCK_SIZE
            k = tl.load(  # [HEAD_DIM, BLOCK_N], already transposed for q @ k^T
                k_head + phys[None, :] * stride_kb + slot[None, :] * stride_kt + dims[:, None] * stride_kd,
                mask=pos_ok[None, :], other=0.0,
            )
            if DOT_UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
            s = tl.where(pos_ok[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)

            v = tl.load(  # [BLOCK_N, HEAD_DIM]
                v_head + phys[:, None] * stride_vb + slot[:, None] * stride_vt + dims[None, :] * stride_vd,
                mask=pos_ok[:, None], other=0.0,
            )
            p_lo = p.to(v.dtype)  # same rounding of P as the GPU path, even when upcasting below
            if DOT_UPCAST:
                p_lo = p_lo.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p_lo, v, input_precision=DOT_PRECISION)
            m_i = m_new

        # A row with no visible KV (context_len 0) outputs zeros rather than 0/0.
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(
            out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None],
        )


def _check_common(q, k_cache, v_cache, block_tables, context_lens):
    if triton is None:
        raise RuntimeError("paged attention needs triton, which is not installed")
    if q.device.type == "cpu" and not _interpreting():
        raise RuntimeError(
            "paged attention on CPU tensors only runs under the Triton interpreter; "
            "set TRITON_INTERPRET=1 before importing triton"
        )
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {q.dtype}; expected one of {_SUPPORTED_DTYPES}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q/k_cache/v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_q_heads = q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} != cache head_dim {head_dim}")
    if not (_is_pow2(head_dim) and 16 <= head_dim <= 256):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")
    if not _is_pow2(block_size):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if block_tables.dim() != 2 or block_tables.shape[0] != context_lens.shape[0]:
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} disagree on batch"
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("context_lens", context_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q is on {q.device}")
    return block_size, num_kv_heads, head_dim, num_q_heads // num_kv_heads


def _tile_shrink(dtype: torch.dtype, head_dim: int) -> int:
    return max(dtype.itemsize * head_dim // 256, 1)


def _as_int32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).contiguous()


def _launch(q, k_cache, v_cache, out, block_tables, context_lens, cu_seqlens, tile_seq, tile_start,
            scale, grid, *, group, group_p, block_q, block_size, head_dim, is_decode):
    block_n = max(block_size, _MIN_KV_TILE // _tile_shrink(q.dtype, head_dim), 16)
    # The Triton interpreter's tl.dot treats bf16 operands as their uint16 bit patterns.
    upcast = _interpreting() and q.dtype == torch.bfloat16
    # fp32 inputs would otherwise be rounded to TF32 on tensor cores; None = the backend default.
    precision = "ieee" if q.dtype == torch.float32 or upcast else None
    _paged_attn_kernel[grid](
        q, k_cache, v_cache, out,
        block_tables, context_lens,
        cu_seqlens, tile_seq, tile_start,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        block_tables.stride(0),
        GROUP=group, GROUP_P=group_p, BLOCK_Q=block_q, BLOCK_N=block_n,
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, IS_DECODE=is_decode,
        DOT_PRECISION=precision, DOT_UPCAST=upcast,
        num_warps=4,
    )


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """One new query per sequence attending to its whole paged context (positions 0..context_len-1).

    q: [B, Hq, D]; block_tables: [B, max_blocks] int32; context_lens: [B] int32 (including the current
    token, whose K/V are already in the cache). Returns [B, Hq, D] in q's dtype.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got {tuple(q.shape)}")
    block_size, num_kv_heads, head_dim, group = _check_common(q, k_cache, v_cache, block_tables, context_lens)
    batch = q.shape[0]
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for a batch of {batch}")
    q = q.contiguous()
    out = torch.empty_like(q)
    if batch == 0:
        return out
    block_tables = _as_int32(block_tables)
    context_lens = _as_int32(context_lens)
    group_p = max(_next_pow2(group), 16)  # 16: smallest M tl.dot accepts; the padding rows are masked off
    _launch(q, k_cache, v_cache, out, block_tables, context_lens,
            context_lens, context_lens, context_lens,  # cu_seqlens / tile map unused when decoding
            scale, (batch, num_kv_heads),
            group=group, group_p=group_p, block_q=1, block_size=block_size, head_dim=head_dim,
            is_decode=True)
    return out


def _prefill_tile_map(cu_seqlens: torch.Tensor, num_tokens: int, block_q: int):
    """Map each query tile to (sequence, first query) without a device->host sync.

    The grid is sized by an upper bound (ceil(T / block_q) + B) known from shapes alone; spare tiles
    get sequence -1 and exit immediately.
    """
    batch = cu_seqlens.shape[0] - 1
    q_lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    tiles_per_seq = (q_lens + block_q - 1) // block_q
    tile_ends = torch.cumsum(tiles_per_seq, 0)
    num_tiles = (num_tokens + block_q - 1) // block_q + batch
    tile_ids = torch.arange(num_tiles, device=cu_seqlens.device, dtype=torch.int64)
    seq = torch.searchsorted(tile_ends, tile_ids, right=True)
    valid = seq < batch
    seq_c = seq.clamp(max=batch - 1)
    start = (tile_ids - (tile_ends[seq_c] - tiles_per_seq[seq_c])) * block_q
    tile_seq = torch.where(valid, seq, torch.full_like(seq, -1)).to(torch.int32)
    tile_start = torch.where(valid, start, torch.zeros_like(start)).to(torch.int32)
    return tile_seq, tile_start, num_tiles


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale) -> torch.Tensor:
    """Causal attention for new tokens of several sequences, whose K/V (prefix + new) are in the cache.

    q: [T, Hq, D], sequence b's queries are rows cu_seqlens_q[b]:cu_seqlens_q[b+1]; context_lens[b] is
    the total KV length including those new tokens, so query i of b sits at position
    context_len_b - q_len_b + i. Covers plain prefill, chunked prefill and q_len == 1. Returns [T, Hq, D].
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got {tuple(q.shape)}")
    block_size, num_kv_heads, head_dim, group = _check_common(q, k_cache, v_cache, block_tables, context_lens)
    batch = context_lens.shape[0]
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(f"cu_seqlens_q must be [B+1] = [{batch + 1}], got {tuple(cu_seqlens_q.shape)}")
    if cu_seqlens_q.device != q.device:
        raise ValueError(f"cu_seqlens_q is on {cu_seqlens_q.device}, q is on {q.device}")
    q = q.contiguous()
    out = torch.empty_like(q)
    num_tokens = q.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    block_tables = _as_int32(block_tables)
    context_lens = _as_int32(context_lens)
    cu_seqlens_q = _as_int32(cu_seqlens_q)

    group_p = _next_pow2(group)
    rows = max(_PREFILL_ROWS // _tile_shrink(q.dtype, head_dim), 16)
    block_q = max(rows // group_p, 1)
    group_p = max(group_p, 16 // block_q)  # keep rows >= 16 for tl.dot
    tile_seq, tile_start, num_tiles = _prefill_tile_map(cu_seqlens_q, num_tokens, block_q)
    _launch(q, k_cache, v_cache, out, block_tables, context_lens, cu_seqlens_q, tile_seq, tile_start,
            scale, (num_tiles, num_kv_heads),
            group=group, group_p=group_p, block_q=block_q, block_size=block_size, head_dim=head_dim,
            is_decode=False)
    return out
