"""The torch backend's prefill attention (whole prompts, and chunks over a cached prefix) equals plain causal
attention, and runs torch's CPU flash kernel rather than the math path that builds the whole score matrix.

Tolerance: 1e-5 absolute and relative in float32 (the kernels differ only in summation order).
"""

from __future__ import annotations

import pytest
import torch

from splitserve.layers.attention import AttentionMetadata, TorchAttentionBackend

BLOCK_SIZE = 16
TOL = dict(atol=1e-5, rtol=1e-5)


def _reference(q, k, v, ctx, scale):
    """q [q_len, Hq, D] at the last q_len of ctx positions over k/v [ctx, Hkv, D]; GQA by repeating K/V heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - q.shape[0], ctx)[:, None]
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)


def _prefill_step(q_lens, ctx_lens, hq, hkv, d, seed):
    """A step of prefill rows: each sequence's first ctx - q_len tokens already in shuffled cache blocks (NaN
    elsewhere), its last q_len tokens this step's. Returns the backend's output and the reference's."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // BLOCK_SIZE) for n in ctx_lens]
    num_blocks = sum(need) + 2
    k_cache = torch.full((num_blocks, BLOCK_SIZE, hkv, d), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots, qs, ks, vs, expected, used = [], [], [], [], [], [], 0
    for q_len, ctx, nb in zip(q_lens, ctx_lens, need):
        ids = perm[used:used + nb]
        used += nb
        seq_slots = torch.tensor([i * BLOCK_SIZE + s for i in ids for s in range(BLOCK_SIZE)][:ctx])
        k, v, q = (torch.randn(ctx, hkv, d, generator=g), torch.randn(ctx, hkv, d, generator=g),
                   torch.randn(q_len, hq, d, generator=g))
        cached = seq_slots[:ctx - q_len]
        k_cache.view(-1, hkv, d)[cached] = k[:ctx - q_len]
        v_cache.view(-1, hkv, d)[cached] = v[:ctx - q_len]
        tables.append(ids + [0] * (max(need) - nb))
        slots.append(seq_slots[ctx - q_len:])
        qs.append(q)
        ks.append(k[ctx - q_len:])
        vs.append(v[ctx - q_len:])
        expected.append(_reference(q, k, v, ctx, 0.2))
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots), block_tables=torch.tensor(tables, dtype=torch.int32),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32), cu_seqlens_q=cu, num_decodes=0,
        query_lens=list(q_lens), context_lens_list=list(ctx_lens), block_size=BLOCK_SIZE)
    out = TorchAttentionBackend().forward(torch.cat(qs), torch.cat(ks), torch.cat(vs), k_cache, v_cache, meta, 0.2)
    return out, torch.cat(expected)


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2)])
@pytest.mark.parametrize("q_lens,ctx_lens", [
    ([5, 40, 100], [5, 40, 100]),  # whole prompts
    ([20, 1, 64], [36, 17, 64]),   # chunks after a cached prefix (one token, one from the start), whole prompt
], ids=["whole", "chunked"])
def test_prefill_equals_reference(q_lens, ctx_lens, hq, hkv):
    out, expected = _prefill_step(q_lens, ctx_lens, hq, hkv, 32, seed=sum(ctx_lens) + hkv)
    torch.testing.assert_close(out, expected, **TOL)


def test_prefill_runs_the_flash_kernel():
    """Three-dimensional inputs send CPU SDPA to the math path (a q_len x ctx score matrix per head: measured 4x
    slower at 1024 tokens); the backend must hand it a batch dimension."""
    with torch.profiler.profile() as prof:
        _prefill_step([48, 16], [48, 40], 8, 2, 32, seed=1)
    ops = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops


def test_a_chunk_over_consecutive_cached_blocks_reads_them_in_place():
    """A prompt chunk whose sequence holds consecutive blocks reads its cached prefix as one slice of the cache
    (run_start), with the reference's results; NaN in every other slot would show a read outside it."""
    g = torch.Generator().manual_seed(3)
    q_len, ctx, hq, hkv, d = 20, 75, 8, 2, 32
    num_blocks = -(-ctx // BLOCK_SIZE)
    k_cache = torch.full((num_blocks + 6, BLOCK_SIZE, hkv, d), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    k, v, q = (torch.randn(ctx, hkv, d, generator=g), torch.randn(ctx, hkv, d, generator=g),
               torch.randn(q_len, hq, d, generator=g))
    first = 2
    slots = torch.arange(first * BLOCK_SIZE, first * BLOCK_SIZE + ctx)
    k_cache.view(-1, hkv, d)[slots[:ctx - q_len]] = k[:ctx - q_len]
    v_cache.view(-1, hkv, d)[slots[:ctx - q_len]] = v[:ctx - q_len]
    meta = AttentionMetadata(
        slot_mapping=slots[ctx - q_len:], block_tables=torch.arange(first, first + num_blocks, dtype=torch.int32)[None],
        context_lens=torch.tensor([ctx], dtype=torch.int32), cu_seqlens_q=torch.tensor([0, q_len], dtype=torch.int32),
        num_decodes=0, query_lens=[q_len], context_lens_list=[ctx], block_size=BLOCK_SIZE)
    out = TorchAttentionBackend().forward(q, k[ctx - q_len:], v[ctx - q_len:], k_cache, v_cache, meta, 0.2)
    assert meta.run_start(0) == first
    torch.testing.assert_close(out, _reference(q, k, v, ctx, 0.2), **TOL)
