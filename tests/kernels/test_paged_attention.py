"""Paged attention kernels vs. a plain torch reference, on small shapes under the Triton interpreter."""

import os

import pytest
import torch

# Without a GPU, tests/conftest.py has set TRITON_INTERPRET=1 before anything imported triton.
pytest.importorskip("triton")

from splitserve.kernels.paged_attention import (  # noqa: E402
    paged_decode_attention,
    paged_prefill_attention,
    triton_available,
)

if not triton_available():
    pytest.skip("triton cannot run here (no CUDA and TRITON_INTERPRET unset)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
BLOCK_SIZE = 16
# Absolute/relative tolerances vs. the fp32 reference.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _bf16_works() -> bool:
    """The interpreter goes through numpy, which has no bfloat16; probe instead of assuming."""
    try:
        q = torch.randn(1, 1, 32, dtype=torch.bfloat16, device=DEVICE)
        kc = torch.randn(1, BLOCK_SIZE, 1, 32, dtype=torch.bfloat16, device=DEVICE)
        bt = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
        cl = torch.ones(1, dtype=torch.int32, device=DEVICE)
        out = paged_decode_attention(q, kc, kc, bt, cl, 1.0)
        return torch.allclose(out.float(), kc[0, 0].float(), atol=2e-2)
    except Exception:
        return False


DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not _bf16_works(), reason="bf16 unsupported here")),
]


def make_paged_kv(ctx_lens, num_kv_heads, head_dim, dtype, seed, spare_blocks=3):
    """Contiguous per-sequence K/V plus the same data scattered into shuffled cache blocks.

    Unwritten cache slots hold NaN, so any read the kernel fails to mask shows up in the output.
    """
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(n + BLOCK_SIZE - 1) // BLOCK_SIZE for n in ctx_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g)
    max_blocks = max(blocks_per_seq) + 1  # one trailing unused column per row
    block_tables = torch.full((len(ctx_lens), max_blocks), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, BLOCK_SIZE, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    ks, vs, used = [], [], 0
    for b, n in enumerate(ctx_lens):
        k = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
        ks.append(k)
        vs.append(v)
        ids = perm[used:used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        block_tables[b, : len(ids)] = ids.to(torch.int32)
        for p in range(n):
            k_cache[ids[p // BLOCK_SIZE], p % BLOCK_SIZE] = k[p]
            v_cache[ids[p // BLOCK_SIZE], p % BLOCK_SIZE] = v[p]
    return ks, vs, k_cache.to(DEVICE), v_cache.to(DEVICE), block_tables.to(DEVICE)


def ref_attention(q, k, v, q_positions, scale):
    """fp32 causal attention of queries at q_positions over KV positions 0..len(k)-1 (GQA by repeat)."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    visible = torch.arange(k.shape[0])[None, :] <= q_positions[:, None]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def run_prefill_case(q_lens, ctx_lens, hq, hkv, head_dim, dtype, seed):
    ks, vs, k_cache, v_cache, block_tables = make_paged_kv(ctx_lens, hkv, head_dim, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(sum(q_lens), hq, head_dim, generator=g).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    scale = head_dim ** -0.5
    out = paged_prefill_attention(
        q.to(DEVICE), k_cache, v_cache, block_tables, cu.to(DEVICE),
        torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE), scale,
    )
    assert out.shape == q.shape and out.dtype == dtype
    for b, (ql, n) in enumerate(zip(q_lens, ctx_lens)):
        qs = q[cu[b]:cu[b + 1]]
        expected = ref_attention(qs, ks[b], vs[b], torch.arange(n - ql, n), scale)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]].cpu().float(), expected, **TOL[dtype])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "ctx_lens,hq,hkv,head_dim",
    [
        ([1, 17, 70], 4, 4, 32),      # MHA; 1 and 17, 70 not block multiples
        ([16, 48, 33, 64], 8, 4, 64),  # GQA 2, exact block multiples mixed in
        ([5, 70], 8, 2, 32),           # GQA 4
    ],
)
def test_decode(ctx_lens, hq, hkv, head_dim, dtype):
    ks, vs, k_cache, v_cache, block_tables = make_paged_kv(ctx_lens, hkv, head_dim, dtype, seed=len(ctx_lens))
    q = torch.randn(len(ctx_lens), hq, head_dim, generator=torch.Generator().manual_seed(7)).to(dtype)
    scale = head_dim ** -0.5
    out = paged_decode_attention(
        q.to(DEVICE), k_cache, v_cache, block_tables,
        torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE), scale,
    )
    assert out.shape == q.shape and out.dtype == dtype
    for b, n in enumerate(ctx_lens):
        expected = ref_attention(q[b:b + 1], ks[b], vs[b], torch.tensor([n - 1]), scale)[0]
        torch.testing.assert_close(out[b].cpu().float(), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "q_lens,ctx_lens,hq,hkv,head_dim",
    [
        ([5, 33, 70], [5, 33, 70], 4, 4, 32),         # fresh prefill, MHA, ragged lengths
        ([20, 1, 9, 16], [36, 8, 49, 16], 8, 2, 64),  # chunked prefill with cached prefixes, GQA 4
        ([70, 3], [70, 40], 4, 2, 32),                # GQA 2, many query tiles in one sequence
    ],
)
def test_prefill(q_lens, ctx_lens, hq, hkv, head_dim, dtype):
    run_prefill_case(q_lens, ctx_lens, hq, hkv, head_dim, dtype, seed=sum(q_lens))


def test_prefill_q_len_one_matches_decode():
    ctx_lens, hq, hkv, d = [1, 17, 40, 64], 4, 2, 32
    out = run_prefill_case([1] * len(ctx_lens), ctx_lens, hq, hkv, d, torch.float32, seed=3)
    _, _, k_cache, v_cache, block_tables = make_paged_kv(ctx_lens, hkv, d, torch.float32, seed=3)
    q = torch.randn(len(ctx_lens), hq, d, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    cl = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    cu = torch.arange(len(ctx_lens) + 1, dtype=torch.int32, device=DEVICE)
    pre = paged_prefill_attention(q, k_cache, v_cache, block_tables, cu, cl, d ** -0.5)
    dec = paged_decode_attention(q, k_cache, v_cache, block_tables, cl, d ** -0.5)
    assert out.shape == pre.shape
    torch.testing.assert_close(pre, dec, atol=1e-5, rtol=1e-5)


def test_prefill_empty_sequence_in_batch():
    # A sequence contributing no new tokens must not disturb its neighbours.
    run_prefill_case([4, 0, 19], [20, 9, 19], 2, 1, 32, torch.float32, seed=11)


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, error", [
    (1, 1, 48, "head_dim"),     # not a power of two
    (3, 2, 32, "multiple"),     # query heads not a multiple of the KV heads (GQA)
])
def test_rejects_bad_shapes(num_heads, num_kv_heads, head_dim, error):
    q = torch.randn(1, num_heads, head_dim)
    kc = torch.randn(1, BLOCK_SIZE, num_kv_heads, head_dim)
    bt = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=error):
        paged_decode_attention(q, kc, kc, bt, torch.ones(1, dtype=torch.int32), 1.0)


def test_one_block_tiles(monkeypatch):
    # Smallest tiles: each KV iteration is exactly one cache block, 16 query rows per prefill program.
    from splitserve.kernels import paged_attention as pa

    monkeypatch.setattr(pa, "_MIN_KV_TILE", 16)
    monkeypatch.setattr(pa, "_PREFILL_ROWS", 16)
    run_prefill_case([20, 1, 37], [36, 8, 37], 4, 2, 32, torch.float32, seed=5)
    ctx_lens = [3, 40]
    ks, vs, k_cache, v_cache, block_tables = make_paged_kv(ctx_lens, 1, 32, torch.float32, seed=6)
    q = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(6))
    out = paged_decode_attention(q.to(DEVICE), k_cache, v_cache, block_tables,
                                 torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE), 0.2)
    for b, n in enumerate(ctx_lens):
        expected = ref_attention(q[b:b + 1], ks[b], vs[b], torch.tensor([n - 1]), 0.2)[0]
        torch.testing.assert_close(out[b].cpu(), expected, **TOL[torch.float32])
