"""The torch backend's decode attention (eager grouped gather, and the in-place `paged_decode` eager and compiled)
equals plain per-sequence attention over contiguous K/V: random caches, ragged lengths, GQA and MHA.

Tolerance: 1e-5 absolute and relative in float32 (the formulations differ only in summation order).
"""

from __future__ import annotations

import pytest
import torch

from splitserve.layers import attention
from splitserve.layers.attention import AttentionMetadata, TorchAttentionBackend, paged_decode
from splitserve.layers.block_decode import block_plan

BLOCK_SIZE = 16
TOL = dict(atol=1e-5, rtol=1e-5)
# 1 and 16: one slot, one exact block; 513 spans 33 blocks; the rest land mid-block.
LENS = [1, 16, 37, 200, 513, 90, 91, 300]


def _paged_case(lens, hq, hkv, d, seed, fill=0.0):
    """Per-sequence contiguous K/V, the same scattered into shuffled cache blocks, tables padded with block 0
    (as the runner pads them); slots no sequence owns hold `fill`."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // BLOCK_SIZE) for n in lens]
    num_blocks = sum(need) + 4
    k_cache = torch.full((num_blocks, BLOCK_SIZE, hkv, d), fill)
    v_cache = torch.full((num_blocks, BLOCK_SIZE, hkv, d), fill)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, ks, vs, used = [], [], [], 0
    for n, nb in zip(lens, need):
        ids = perm[used:used + nb]
        used += nb
        k, v = torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g)
        slots = torch.tensor([i * BLOCK_SIZE + s for i in ids for s in range(BLOCK_SIZE)][:n])
        k_cache.view(-1, hkv, d)[slots] = k
        v_cache.view(-1, hkv, d)[slots] = v
        tables.append(ids + [0] * (max(need) - nb))
        ks.append(k)
        vs.append(v)
    q = torch.randn(len(lens), hq, d, generator=g)
    return q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), ks, vs


def _reference(q, ks, vs, scale):
    """Each row on its own: softmax(q K^T * scale) V with K/V heads repeated for GQA."""
    rows = []
    for b, (k, v) in enumerate(zip(ks, vs)):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        weights = (torch.einsum("hd,khd->hk", q[b], k) * scale).softmax(-1)
        rows.append(torch.einsum("hk,khd->hd", weights, v))
    return torch.stack(rows)


def _meta(tables, lens):
    n = len(lens)
    return AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64), block_tables=tables, context_lens=lens,
        cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32), num_decodes=n, query_lens=[1] * n,
        context_lens_list=lens.tolist(), block_size=BLOCK_SIZE)


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2), (4, 1)])
def test_eager_decode_equals_reference(hq, hkv):
    q, k_cache, v_cache, tables, lens, ks, vs = _paged_case(LENS, hq, hkv, 32, seed=hq + hkv, fill=7.0)
    out = TorchAttentionBackend()._decode(q, k_cache, v_cache, _meta(tables, lens), 0.2)
    torch.testing.assert_close(out, _reference(q, ks, vs, 0.2), **TOL)


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2), (4, 1)])
def test_paged_decode_equals_reference(hq, hkv):
    # NaN in every slot no sequence owns: a masked read that leaked would show.
    q, k_cache, v_cache, tables, lens, ks, vs = _paged_case(LENS, hq, hkv, 32, seed=hq * hkv, fill=float("nan"))
    torch.testing.assert_close(paged_decode(q, k_cache, v_cache, tables, lens, 0.2), _reference(q, ks, vs, 0.2),
                               **TOL)


@pytest.mark.parametrize("slack,split", [(1.25, float("inf")), (float("inf"), float("inf")), (float("inf"), 0.0)],
                         ids=["grouped", "one-group", "split-by-block"])
def test_compiled_paged_decode_equals_reference(slack, split, monkeypatch):
    """The torch-compile backend's paths: compiled once with dynamic shapes, then called at other batch sizes and
    lengths (one row, one block included) without changing its results. split 0: every step of two rows or more
    runs split by block (layers/block_decode.py); inf: never."""
    backend = TorchAttentionBackend(compile_decode=True, slack=slack, split_padding=split)
    monkeypatch.setattr(attention, "_SPLIT_MIN_ROWS", 2)
    for lens, hq, hkv in [(LENS, 8, 2), (LENS[:3], 8, 2), ([700, 5, 64, 65, 2], 8, 2), ([9], 8, 2), ([3, 16], 8, 2)]:
        q, k_cache, v_cache, tables, lens_t, ks, vs = _paged_case(lens, hq, hkv, 32, seed=len(lens),
                                                                  fill=float("nan"))
        empty = torch.zeros(0, hkv, 32)
        out = backend.forward(q, empty, empty, k_cache, v_cache, _meta(tables, lens_t), 0.2)
        torch.testing.assert_close(out, _reference(q, ks, vs, 0.2), **TOL)


def test_long_or_ragged_rows_run_split_by_block_and_short_ones_in_one_pass():
    """The default choice: rows averaging 6 blocks or more (even ones, even two of them), 8 or more rows whose
    padded blocks far outnumber their own, and a single row of 28 blocks or more read only their own blocks; short
    rows keep the one-pass kernel (a short single row its eager read), as do rows with under two full blocks among
    them (the split graph would specialise on 0 or 1 of them and recompile)."""
    backend = TorchAttentionBackend(compile_decode=True)
    for lens, split in [(LENS, True), ([200, 190, 201, 195, 180, 199, 170, 203], True), ([200, 190], True),
                        ([40, 38, 41, 39, 35, 40, 33, 41], False), ([20, 50, 30], False),
                        ([33, 1, 2, 3, 4, 5, 6, 7], True), ([17, 1, 2, 3, 4, 5, 6, 7], False),
                        ([600], True), ([300], False)]:
        q, k_cache, v_cache, tables, lens_t, ks, vs = _paged_case(lens, 8, 2, 32, seed=9, fill=float("nan"))
        meta = _meta(tables, lens_t)
        empty = torch.zeros(0, 2, 32)
        out = backend.forward(q, empty, empty, k_cache, v_cache, meta, 0.2)
        torch.testing.assert_close(out, _reference(q, ks, vs, 0.2), **TOL)
        assert (meta.decode_blocks is not None) == split


def test_block_plan_lists_full_blocks_first_then_each_rows_last():
    """Only a row's last block can hold unwritten slots: the plan puts those n items last, so only they are masked,
    and `combine` still finds every row's blocks in order."""
    tables = torch.tensor([[5, 6, 7], [8, 0, 0], [9, 10, 0]], dtype=torch.int32)
    plan = block_plan(tables, torch.tensor([40, 3, 32], dtype=torch.int32), 16)
    assert plan.blocks.tolist() == [5, 6, 9, 7, 8, 10]
    assert plan.rows.tolist() == [0, 0, 2, 0, 1, 2]
    assert plan.lens.tolist() == [16, 16, 16, 8, 3, 16]
    assert plan.combine.tolist() == [[0, 1, 3], [4, 6, 6], [2, 5, 6]]


def test_failed_compile_falls_back_to_eager_and_is_counted(caplog):
    """auto asks for the compiled path without requiring it: a compile failure at warm-up leaves an eager backend
    that still gives the reference's results; torch-compile, asked for by name, fails loudly instead."""
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    q, k_cache, v_cache, tables, lens, ks, vs = _paged_case(LENS, 8, 2, 32, seed=5)
    backend = TorchAttentionBackend(compile_decode=True, compile_required=False)
    backend._compiled = broken
    backend.warm_up(k_cache, v_cache, num_heads=8)
    assert backend.compile_fallbacks == 1 and "no C++ compiler" in caplog.text
    empty = torch.zeros(0, 2, 32)
    out = backend.forward(q, empty, empty, k_cache, v_cache, _meta(tables, lens), 0.2)
    torch.testing.assert_close(out, _reference(q, ks, vs, 0.2), **TOL)

    strict = TorchAttentionBackend(compile_decode=True)
    strict._compiled = broken
    with pytest.raises(RuntimeError, match="no C"):
        strict.warm_up(k_cache, v_cache, num_heads=8)


def test_engine_decodes_without_recompiling(llama_ckpt):
    """The engine's warm-up compiles the graphs every later step uses (one row or many, one block or many):
    a recompile inside a request would stall it for seconds."""
    import torch._dynamo

    from splitserve import LLM, SamplingParams

    llm = LLM(str(llama_ckpt), dtype="float32", device="cpu", block_size=16, num_kv_blocks=64,
              attention_backend="torch-compile")
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        llm.generate([[7, 8, 9]], params)
        outs = llm.generate([[5 + i % 40 for i in range(n)] for n in (1, 3, 20, 40, 90)], params)
        # Ten ragged rows: split by block (layers/block_decode.py), also compiled at warm-up.
        ragged = llm.generate([[5 + i % 40 for i in range(n)] for n in (1, 3, 20, 40, 90, 2, 7, 130, 11, 60)], params)
    assert [len(o.outputs[0].token_ids) for o in outs + ragged] == [24] * 15


def _with_consecutive_blocks(k_cache, v_cache, table, ctx, first):
    """The same sequence moved into consecutive cache blocks from `first` on (NaN elsewhere): its new table."""
    n = -(-ctx // BLOCK_SIZE)
    moved_k, moved_v = torch.full_like(k_cache, float("nan")), torch.full_like(v_cache, float("nan"))
    moved_k[first:first + n] = k_cache[table[:n].long()]
    moved_v[first:first + n] = v_cache[table[:n].long()]
    return moved_k, moved_v, torch.tensor([list(range(first, first + n))], dtype=torch.int32)


@pytest.mark.parametrize("ctx", [1, 16, 17, 300])
def test_a_single_row_on_consecutive_blocks_is_read_in_place_with_the_same_result(ctx):
    """A row alone whose blocks are consecutive reads its K/V as one slice of the cache, not a gathered copy: the
    same values reach the same SDPA call, so the output is bit-identical to the gathered read of the same row
    elsewhere in the cache, and equals the reference. A row whose blocks are not consecutive is gathered."""
    q, k_cache, v_cache, tables, lens, ks, vs = _paged_case([ctx], 8, 2, 32, seed=ctx, fill=float("nan"))
    scattered = _meta(tables, lens)
    backend = TorchAttentionBackend()
    gathered = backend._decode(q, k_cache, v_cache, scattered, 0.2)
    expected_start = tables[0, 0].item() if -(-ctx // BLOCK_SIZE) == 1 else None
    assert scattered.run_start(0) == expected_start  # one block is a run of one; shuffled blocks are not a run
    k_run, v_run, run_table = _with_consecutive_blocks(k_cache, v_cache, tables[0], ctx, first=3)
    consecutive = _meta(run_table, lens)
    in_place = backend._decode(q, k_run, v_run, consecutive, 0.2)
    assert consecutive.run_start(0) == 3
    assert torch.equal(in_place, gathered)
    torch.testing.assert_close(in_place, _reference(q, ks, vs, 0.2), **TOL)


def test_run_start_reads_the_lists_the_runner_built_and_asks_once_a_step():
    """The runner hands its Python tables over (no tensor-to-list conversion per step); the answer, once worked
    out, is kept for the step's other layers. Only the blocks holding the context count: padding does not."""
    tables = [[4, 5, 6, 0], [9, 2, 0, 0]]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64), block_tables=torch.tensor(tables, dtype=torch.int32),
        context_lens=torch.tensor([40, 20], dtype=torch.int32), cu_seqlens_q=torch.arange(3, dtype=torch.int32),
        num_decodes=2, query_lens=[1, 1], context_lens_list=[40, 20], block_size=BLOCK_SIZE,
        block_table_lists=tables)
    assert meta.run_start(0) == 4 and meta.run_start(1) is None
    tables[0][1] = 7   # a later change to the lists is not looked at again within the step
    assert meta.run_start(0) == 4


@pytest.mark.parametrize("ctx,split", [(600, False), (900, True)])
def test_a_single_row_on_consecutive_blocks_splits_only_from_56_blocks(ctx, split):
    """Read in place, a single row beats the split read until about 900 tokens (benchmarks/one_row_decode.py);
    the same row scattered splits from 28 blocks (test above)."""
    q, k_cache, v_cache, tables, lens, ks, vs = _paged_case([ctx], 8, 2, 32, seed=ctx, fill=float("nan"))
    k_run, v_run, run_table = _with_consecutive_blocks(k_cache, v_cache, tables[0], ctx, first=1)
    meta = _meta(run_table, lens)
    empty = torch.zeros(0, 2, 32)
    out = TorchAttentionBackend(compile_decode=True).forward(q, empty, empty, k_run, v_run, meta, 0.2)
    torch.testing.assert_close(out, _reference(q, ks, vs, 0.2), **TOL)
    assert (meta.decode_blocks is not None) == split
