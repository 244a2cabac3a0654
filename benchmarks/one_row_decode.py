"""Decode attention of a single row (c=1), the three ways the torch backend can read it, alternated in one process:
split by block (layers/block_decode.py), in place (its blocks consecutive in the cache: one slice of it) and
gathered (its blocks scattered: index_select copies). One call is a step over --layers layers, each its own cache,
the step's plan made once, as the runner does. Prints the median milliseconds per step of each round.

  OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/one_row_decode.py --ctx 450,600,900,1400
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from splitserve.layers import attention
from splitserve.layers.attention import AttentionMetadata, TorchAttentionBackend

BLOCK_SIZE = 16


def step_ms(backend: TorchAttentionBackend, caches, q, table: list[int], ctx: int, iters: int,
            force_split: bool = False) -> float:
    """With `force_split`, the single-row rules split at any length (the module's thresholds set to 2 blocks for
    the duration: the backend has no switch for it, nor should it)."""
    saved = attention._SPLIT_ONE_ROW_BLOCKS, attention._SPLIT_ONE_RUN_BLOCKS
    if force_split:
        attention._SPLIT_ONE_ROW_BLOCKS = attention._SPLIT_ONE_RUN_BLOCKS = 2
    try:
        return _median_step_ms(backend, caches, q, table, ctx, iters)
    finally:
        attention._SPLIT_ONE_ROW_BLOCKS, attention._SPLIT_ONE_RUN_BLOCKS = saved


def _median_step_ms(backend, caches, q, table: list[int], ctx: int, iters: int) -> float:
    def step():
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(0, dtype=torch.int64), block_tables=torch.tensor([table], dtype=torch.int32),
            context_lens=torch.tensor([ctx], dtype=torch.int32), cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32),
            num_decodes=1, query_lens=[1], context_lens_list=[ctx], block_size=BLOCK_SIZE, block_table_lists=[table])
        for k_cache, v_cache in caches:
            backend._decode(q, k_cache, v_cache, meta, 0.125)

    for _ in range(3):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", default="300,600,900,1400", help="comma-separated context lengths")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cache-blocks", type=int, default=4096, help="blocks per layer's cache")
    args = ap.parse_args(argv)
    lengths = [int(c) for c in args.ctx.split(",")]
    if min(lengths) < 1 or max(-(-n // BLOCK_SIZE) for n in lengths) >= args.cache_blocks:
        ap.error("every --ctx must be >= 1 and fit in --cache-blocks")
    shape = (args.cache_blocks, BLOCK_SIZE, args.heads, 64)
    caches = [(torch.randn(shape), torch.randn(shape)) for _ in range(args.layers)]
    q = torch.randn(1, args.heads, 64)
    split = TorchAttentionBackend(compile_decode=True)
    split.warm_up(*caches[0], args.heads)
    one_pass = TorchAttentionBackend(compile_decode=True, split_padding=float("inf"))  # never split
    generator = torch.Generator().manual_seed(0)
    print(f"one row, {args.layers} layers, threads {torch.get_num_threads()}; ms per step, one column per round")
    print(f"{'ctx':>5}  {'split':>20}  {'in place':>20}  {'gathered':>20}")
    with torch.inference_mode():
        for ctx in lengths:
            n = -(-ctx // BLOCK_SIZE)
            run = list(range(1, 1 + n))
            scattered = torch.randperm(args.cache_blocks, generator=generator)[:n].tolist()
            rounds = [(step_ms(split, caches, q, run, ctx, args.iters, force_split=True) if n >= 2 else float("nan"),
                       step_ms(one_pass, caches, q, run, ctx, args.iters),
                       step_ms(one_pass, caches, q, scattered, ctx, args.iters)) for _ in range(args.rounds)]
            cols = [" ".join(f"{r[i]:6.2f}" for r in rounds) for i in range(3)]
            print(f"{ctx:>5}  {cols[0]:>20}  {cols[1]:>20}  {cols[2]:>20}")


if __name__ == "__main__":
    main()
