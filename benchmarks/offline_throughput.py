"""Offline throughput: splitserve LLM.generate vs transformers generate (static padded batches, and one at a time).

Same model, same prompts, one run. Output tokens/s counts only the tokens each request asked for: a static batch
that runs on to its longest member's length does that extra work for nothing, as a static server must.
Last line: `speedup_vs_hf_static: X.XX`.
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def workload(num_requests: int, in_range, out_range, vocab: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(*in_range))] for _ in range(num_requests)]
    outputs = [rng.randint(*out_range) for _ in range(num_requests)]
    return prompts, outputs


def benchmark_checkpoint() -> str:
    """The Llama-shaped random checkpoint these benchmarks run by default (built once, then cached)."""
    from splitserve.demo_model import cached_checkpoint

    return str(cached_checkpoint(
        "llama", hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        intermediate_size=1376, max_position_embeddings=2048))


def benchmark_workload(quick: bool, num_requests: int, seed: int):
    """Token-id prompts and output lengths. --quick is the same kind of workload at a smaller scale (ragged lengths,
    several static batches); one static batch alone would cap the ratio at what padding costs that batch."""
    n = 32 if quick else num_requests
    in_range, out_range = ((32, 384), (16, 160)) if quick else ((32, 512), (16, 256))
    return workload(n, in_range, out_range, 1000, seed)


def run_splitserve(path, prompts, out_lens, dtype, device, attention_backend="auto"):
    """Wall seconds and CPU seconds (this process, all threads) of one LLM.generate over the workload."""
    from splitserve import LLM, SamplingParams

    llm = LLM(path, dtype=dtype, device=device, max_num_seqs=64, max_num_batched_tokens=2048,
              attention_backend=attention_backend)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in out_lens]
    llm.generate([prompts[0]], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert [len(o.outputs[0].token_ids) for o in outs] == out_lens
    return elapsed, cpu


def run_hf(model, prompts, out_lens, batch_size, device):
    elapsed = 0.0
    order = list(range(len(prompts)))
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        longest = max(len(prompts[j]) for j in idx)
        ids = torch.zeros((len(idx), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, j in enumerate(idx):  # left padding, as decoder-only batching needs
            ids[row, longest - len(prompts[j]):] = torch.tensor(prompts[j])
            mask[row, longest - len(prompts[j]):] = 1
        new = max(out_lens[j] for j in idx)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        elapsed += time.perf_counter() - start
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="checkpoint folder/hub id (default: a Llama-shaped random model)")
    ap.add_argument("--quick", action="store_true", help="smaller workload, under 3 minutes on a 2-core CPU")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--hf-single-requests", type=int, default=8, help="requests timed one at a time (a subset)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attention-backend", default="auto", help="splitserve's attention backend (auto, torch, ...)")
    ap.add_argument("--splitserve-only", action="store_true", help="time splitserve alone (no transformers runs)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    path = args.model or benchmark_checkpoint()
    prompts, out_lens = benchmark_workload(args.quick, args.num_requests, args.seed)
    n = len(prompts)
    torch.manual_seed(args.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]

    rows = []
    t, cpu = run_splitserve(path, prompts, out_lens, args.dtype, args.device, args.attention_backend)
    rows.append(("splitserve LLM.generate", n, sum(out_lens), t))
    cpu_line = f"splitserve_cpu_s_per_1k_output_tokens: {cpu / sum(out_lens) * 1000:.2f}"
    if args.splitserve_only:
        print(f"splitserve_output_tok_s: {sum(out_lens) / t:.1f}")
        print(cpu_line)
        return
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    t = run_hf(hf, prompts, out_lens, args.hf_batch_size, args.device)
    rows.append((f"transformers static batch={args.hf_batch_size}", n, sum(out_lens), t))
    k = min(args.hf_single_requests, n)
    t = run_hf(hf, prompts[:k], out_lens[:k], 1, args.device)
    rows.append(("transformers one at a time", k, sum(out_lens[:k]), t))

    prompt_tokens = {name: sum(len(p) for p in prompts[:count]) for name, count, _, _ in rows}
    print(f"{'engine':34s} {'requests':>8s} {'prompt_tok':>10s} {'output_tok':>10s} {'seconds':>8s} {'out_tok/s':>10s}")
    for name, count, out_tok, secs in rows:
        print(f"{name:34s} {count:8d} {prompt_tokens[name]:10d} {out_tok:10d} {secs:8.2f} {out_tok / secs:10.1f}")
    speed = (rows[0][2] / rows[0][3]) / (rows[1][2] / rows[1][3])
    print(f"ratio splitserve / transformers-static (output tokens/s): {speed:.2f}")
    print(cpu_line)
    print(f"speedup_vs_hf_static: {speed:.2f}")


if __name__ == "__main__":
    main()
