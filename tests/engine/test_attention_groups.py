"""The torch decode path splits rows of very different KV lengths into groups to avoid copying padding; the
result must be the one dense padded batch's."""

from __future__ import annotations

import random

import torch

from splitserve.layers.attention import AttentionMetadata, TorchAttentionBackend, _length_groups


def test_groups_cover_every_row_once_within_the_slack():
    rng = random.Random(0)
    lens = [rng.randint(1, 800) for _ in range(64)]
    groups = _length_groups(lens)
    assert sorted(i for g in groups for i in g) == list(range(64))
    assert len(groups) > 1
    for g in groups:
        longest = max(lens[i] for i in g)
        assert longest * len(g) <= 1.25 * sum(lens[i] for i in g) or len(g) == 1
    assert _length_groups([100, 100, 99]) == [[0, 1, 2]]


def test_grouped_decode_equals_one_padded_batch():
    torch.manual_seed(0)
    block_size, num_blocks, hkv, hq, d = 4, 200, 2, 4, 8
    k_cache = torch.randn(num_blocks, block_size, hkv, d)
    v_cache = torch.randn(num_blocks, block_size, hkv, d)
    lens = [3, 150, 9, 77, 150, 1, 40]
    perm = torch.randperm(num_blocks).tolist()
    tables, used = [], 0
    max_blocks = max(-(-n // block_size) for n in lens)
    for n in lens:
        need = -(-n // block_size)
        tables.append(perm[used:used + need] + [0] * (max_blocks - need))
        used += need
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64), block_tables=torch.tensor(tables, dtype=torch.int32),
        context_lens=torch.tensor(lens, dtype=torch.int32), cu_seqlens_q=torch.arange(len(lens) + 1),
        num_decodes=len(lens), query_lens=[1] * len(lens), context_lens_list=lens, block_size=block_size)
    q = torch.randn(len(lens), hq, d)
    grouped = TorchAttentionBackend()._decode(q, k_cache, v_cache, meta, 0.3)
    num_blocks_used = -(-max(lens) // block_size)
    dense = TorchAttentionBackend._decode_rows(q, k_cache, v_cache, meta.block_tables[:, :num_blocks_used],
                                               meta.context_lens, 0.3)
    assert len(_length_groups(lens)) > 1
    torch.testing.assert_close(grouped, dense, rtol=1e-5, atol=1e-6)
