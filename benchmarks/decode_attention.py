"""Decode attention alone: the torch backend's eager gather + SDPA vs the compiled in-place `paged_decode`, each
with its rows grouped by length (slack) or not, and the compiled split by block (layers/block_decode.py, the
default for long or ragged rows; where the backend's rules keep a step in one pass, its row times that).

Shapes as in the offline benchmark's steady state (demo model: 8 heads of 64, 16-token blocks, float32): rows of
--min-ctx..--max-ctx tokens whose blocks are scattered over the cache. A call is one step over `--layers` layers,
each its own cache, with the step's plan built once, as the runner does. Prints milliseconds per call (median of
`--iters`) and each compiled variant's first call (compile included).

  python benchmarks/decode_attention.py --rows 8 --min-ctx 300 --max-ctx 340 --layers 8
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

import torch

from splitserve.layers.attention import AttentionMetadata, TorchAttentionBackend


def case(rows: int, max_ctx: int, heads: int, kv_heads: int, head_dim: int, block_size: int, seed: int,
         min_ctx: int = 33, layers: int = 1, consecutive: bool = False):
    """q, then per layer (k_cache, v_cache), and the step's metadata (`consecutive`: each row's blocks in one run,
    as a sequence served alone usually has them)."""
    rng = random.Random(seed)
    lens = [rng.randint(min_ctx, max_ctx) for _ in range(rows)]
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) * 2
    perm = list(range(num_blocks))
    if not consecutive:
        rng.shuffle(perm)
    tables, used = [], 0
    for nb in need:
        tables.append(perm[used:used + nb] + [0] * (max(need) - nb))
        used += nb
    # Layers of a stacked cache, as the runner lays it out (views at an offset), from the fourth on.
    stacked = torch.randn(3 + layers, 2, num_blocks, block_size, kv_heads, head_dim)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64), block_tables=torch.tensor(tables, dtype=torch.int32),
        context_lens=torch.tensor(lens, dtype=torch.int32), cu_seqlens_q=torch.arange(rows + 1, dtype=torch.int32),
        num_decodes=rows, query_lens=[1] * rows, context_lens_list=lens, block_size=block_size)
    return torch.randn(rows, heads, head_dim), [(stacked[3 + i, 0], stacked[3 + i, 1]) for i in range(layers)], meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--min-ctx", type=int, default=33)
    ap.add_argument("--max-ctx", type=int, default=768)
    ap.add_argument("--layers", type=int, default=1,
                    help="a step over this many layers (each its own cache), the plan built once per step")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--consecutive", action="store_true",
                    help="each row's blocks consecutive in the cache (a single row then reads them in place)")
    args = ap.parse_args()
    q, caches, meta = case(args.rows, args.max_ctx, args.heads, args.kv_heads, 64, 16, seed=0, min_ctx=args.min_ctx,
                           layers=args.layers, consecutive=args.consecutive)
    empty = torch.zeros(0, args.kv_heads, 64)
    inf = float("inf")
    variants = [("eager, slack 1.25", False, 1.25, inf), ("eager, one group", False, inf, inf),
                ("compiled, slack 1.25", True, 1.25, inf), ("compiled, slack 2", True, 2.0, inf),
                ("compiled, one group", True, inf, inf), ("compiled, split", True, inf, 0.0)]
    kv_mib = sum(meta.context_lens_list) * args.kv_heads * 64 * 4 * 2 / 2**20
    print(f"rows {args.rows}, KV read {kv_mib:.1f} MiB per layer, {args.layers} layer(s) per call, "
          f"threads {torch.get_num_threads()}")
    reference = None
    with torch.inference_mode():
        for name, compiled, slack, split in variants:
            backend = TorchAttentionBackend(compile_decode=compiled, slack=slack, split_padding=split)

            def run():
                # A new step: the plan is rebuilt, as the runner's fresh metadata is, and reused by every layer.
                step = dataclasses.replace(meta, decode_groups=None, decode_blocks=None)
                for k_cache, v_cache in caches:
                    out = backend.forward(q, empty, empty, k_cache, v_cache, step, 0.125)
                return out

            start = time.perf_counter()
            out = run()
            first = time.perf_counter() - start
            if reference is None:
                reference = out
            torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
            times = []
            for _ in range(args.iters):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            print(f"{name:22s} {statistics.median(times) * 1e3:8.2f} ms/call   (first call {first:.2f} s)")


if __name__ == "__main__":
    main()
