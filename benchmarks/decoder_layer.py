"""One decoder layer's decode step alone, at a few batch sizes: what fusing or packing its projections buys.

Shapes as in the offline benchmark (benchmark_checkpoint: hidden 512, 8 heads of 64, MLP 1376, float32), random
weights, each decode row with `--ctx` tokens of context in a paged cache, eager torch attention (no compile, so
the number is the layer's own). Linear layers packed for oneDNN as the engine packs them (`--linear-backend`).
Prints microseconds per step per batch size: the median wall time of `--iters`, and CPU time per step (steadier
on a shared machine, where the wall time swings with other processes). It runs whatever `splitserve` is importable,
so an A/B of two versions is the same command with another PYTHONPATH.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from splitserve.layers.attention import AttentionMetadata, TorchAttentionBackend
from splitserve.layers.packed_linear import pack_linears, packing_applies
from splitserve.models.llama import DecoderLayer, LlamaArgs
from splitserve.layers.rotary import RotaryEmbedding

BLOCK_SIZE = 16


def layer_args() -> LlamaArgs:
    return LlamaArgs(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_layers=1, num_heads=8,
                     num_kv_heads=8, head_dim=64, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                     max_position=2048, tie_word_embeddings=False, qkv_bias=False, o_bias=False, mlp_bias=False,
                     qk_norm=False)


def decode_step(rows: int, ctx: int, args: LlamaArgs):
    """Inputs of one decode step: `rows` sequences, each `ctx` tokens long, its blocks its own."""
    blocks_per_row = -(-ctx // BLOCK_SIZE)
    cache = torch.randn(2, rows * blocks_per_row, BLOCK_SIZE, args.num_kv_heads, args.head_dim)
    tables = torch.arange(rows * blocks_per_row, dtype=torch.int32).view(rows, blocks_per_row)
    slots = tables[:, (ctx - 1) // BLOCK_SIZE].long() * BLOCK_SIZE + (ctx - 1) % BLOCK_SIZE
    meta = AttentionMetadata(
        slot_mapping=slots, block_tables=tables, context_lens=torch.full((rows,), ctx, dtype=torch.int32),
        cu_seqlens_q=torch.arange(rows + 1, dtype=torch.int32), num_decodes=rows, query_lens=[1] * rows,
        context_lens_list=[ctx] * rows, block_size=BLOCK_SIZE)
    return torch.randn(rows, args.hidden_size), torch.full((rows,), ctx - 1), cache, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--linear-backend", default="auto", help="auto|packed|torch, as the engine's flag")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_args = layer_args()
    layer = DecoderLayer(model_args, 0).eval()
    packed = packing_applies(torch.device("cpu"), torch.float32, args.linear_backend) and pack_linears(layer)
    rotary = RotaryEmbedding(model_args.head_dim, model_args.rope_theta, None, model_args.max_position)
    rotary.build_cache(torch.device("cpu"), torch.float32)
    backend = TorchAttentionBackend()
    print(f"threads {torch.get_num_threads()}, linear layers packed: {packed or 0}, context {args.ctx}")
    with torch.inference_mode():
        for rows in args.batch:
            x, positions, cache, meta = decode_step(rows, args.ctx, model_args)

            def step():
                meta.decode_groups = None  # a new step: the runner builds fresh metadata
                return layer(x, positions, rotary, cache, meta, backend)

            for _ in range(10):
                step()
            times, cpu_start = [], time.process_time()
            for _ in range(args.iters):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            cpu = (time.process_time() - cpu_start) / args.iters
            print(f"batch {rows:3d}: {statistics.median(times) * 1e6:8.1f} us/step (median wall), "
                  f"{cpu * 1e6:8.1f} CPU-us/step")


if __name__ == "__main__":
    main()
