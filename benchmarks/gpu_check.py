"""The GPU checks of the speed issue, as one bounded run on a lent GPU (an H200 here); prints a table.

1. The Triton kernel tests on CUDA (not the interpreter).
2. A bf16 Llama-3-8B-shaped checkpoint with random weights (32 layers, 4096 hidden, 8 KV heads, 128k vocab), built
   on the GPU and saved through the real checkpoint path.
3. Offline throughput of `LLM.generate` on it (token-id prompts, greedy, ignore_eos).
4. Decode step time at several batch sizes against the HBM roofline: the bytes one step must read (all weights once,
   plus every running sequence's KV) divided by the memory bandwidth (4.8 TB/s on an H200).

What it cannot do there: that machine reaches no package index and takes at most 64 MiB of carried wheels, so vLLM's
CUDA build (hundreds of MB) cannot be installed beside it; the same-GPU vLLM comparison needs a machine with one.
The engine has no CUDA graphs yet, so decode steps are eager; the roofline ratio shows what that costs.

Run there (the image has torch, triton and transformers; nothing is installed):
    pip install -q --no-deps --no-build-isolation -e . && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT
Smoke-test here on CPU at a tiny shape: `python benchmarks/gpu_check.py --tiny`.
Last line: `decode_step_vs_roofline_b64: X.XX` (measured step time / roofline time; 1.00 is the memory bound).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
H200_HBM_BYTES_PER_S = 4.8e12

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024, rope_theta=10000.0)


@dataclass
class StepTiming:
    batch_size: int
    context_len: int
    step_ms: float
    roofline_ms: float

    @property
    def vs_roofline(self) -> float:
        return self.step_ms / self.roofline_ms


def run_kernel_tests(device: str) -> dict:
    """The kernel tests in a child process; on CUDA they run compiled (TRITON_INTERPRET unset)."""
    env = dict(os.environ)
    if device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()
    # --noconftest: the suite's conftest starts service helpers whose dependencies that image may lack.
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/kernels", "-q", "--noconftest", "-p",
                           "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"returncode": proc.returncode, "summary": summary, "seconds": round(time.perf_counter() - start, 1),
            "tail": proc.stdout[-3000:] + proc.stderr[-2000:] if proc.returncode else ""}


def build_checkpoint(out_dir: pathlib.Path, shape: dict, dtype: torch.dtype, device: str) -> int:
    """Random weights made on `device` (an 8B model in fp32 on a CPU would take minutes), saved as safetensors with
    the demo tokenizer; returns the weight bytes."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from splitserve.demo_model import EOS_TOKEN, build_tokenizer

    build_tokenizer(out_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = LlamaConfig(**shape, bos_token_id=None, eos_token_id=eos_id, pad_token_id=None, tie_word_embeddings=False,
                         head_dim=shape["hidden_size"] // shape["num_attention_heads"])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=eos_id)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(str(out_dir))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return weight_bytes


def offline_throughput(llm, num_requests: int, input_len: int, output_len: int, vocab: int) -> dict:
    from splitserve import SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(input_len)] for _ in range(num_requests)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    _synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    _synchronize()
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"requests": num_requests, "input_len": input_len, "output_len": output_len, "seconds": round(elapsed, 2),
            "output_tok_s": round(produced / elapsed, 1),
            "total_tok_s": round((produced + num_requests * input_len) / elapsed, 1)}


def decode_step_time(llm, batch_size: int, context_len: int, steps: int, kv_bytes_per_token: int,
                     weight_bytes: int, bandwidth: float, vocab: int) -> StepTiming:
    """Prefills `batch_size` sequences, then times `steps` decode steps of the whole batch (engine.step, so
    scheduling and sampling are included, as they are in serving)."""
    from splitserve import SamplingParams

    engine = llm.engine
    rng = random.Random(batch_size)
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch_size):
        engine.add_request(f"step-{batch_size}-{i}", [rng.randrange(3, vocab) for _ in range(context_len)], params)
    # Run until every sequence has its first token (all prefills done), then two warm steps.
    for _ in range(64):
        engine.step()
        if len(engine.last_step_sampled) == batch_size:
            break
    for _ in range(2):
        engine.step()
    _synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _synchronize()
    step_s = (time.perf_counter() - start) / steps
    while engine.has_unfinished_requests():
        engine.step()
    mean_ctx = context_len + 3 + steps / 2
    roofline_s = (weight_bytes + batch_size * mean_ctx * kv_bytes_per_token) / bandwidth
    return StepTiming(batch_size, context_len, step_s * 1e3, roofline_s * 1e3)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on whatever device is here (smoke test)")
    parser.add_argument("--out", default=None, help="folder for results.json (default: print only)")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--input-len", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--context-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--skip-kernel-tests", action="store_true")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.tiny and device != "cuda":
        parser.error("no CUDA device here: run with --tiny for a CPU smoke test")
    shape = TINY if args.tiny else LLAMA3_8B
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    num_requests = args.num_requests or (4 if args.tiny else 256)
    input_len = args.input_len or (32 if args.tiny else 512)
    output_len = args.output_len or (8 if args.tiny else 256)
    context_len = args.context_len or (32 if args.tiny else 1024)
    steps = args.steps or (4 if args.tiny else 32)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.tiny:
        batch_sizes = [b for b in batch_sizes if b <= 8] or [1]
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "torch": torch.__version__, "cuda_graphs": "not implemented (eager decode steps)"}

    if not args.skip_kernel_tests:
        results["kernel_tests"] = run_kernel_tests(device)
        print(f"kernel tests ({device}): {results['kernel_tests']['summary']}", flush=True)

    from splitserve import LLM

    with tempfile.TemporaryDirectory(prefix="splitserve-gpu-") as tmp:
        start = time.perf_counter()
        weight_bytes = build_checkpoint(pathlib.Path(tmp), shape, dtype, device)
        results["checkpoint"] = {"weight_gb": round(weight_bytes / 1e9, 2), "seconds": round(time.perf_counter() - start, 1)}
        print(f"checkpoint: {results['checkpoint']}", flush=True)
        start = time.perf_counter()
        llm = LLM(tmp, dtype="bfloat16" if dtype == torch.bfloat16 else "float32", device=device,
                  max_num_seqs=max(max(batch_sizes), num_requests if args.tiny else 256),
                  max_num_batched_tokens=8192 if not args.tiny else 512)
        results["load_seconds"] = round(time.perf_counter() - start, 1)

        results["offline"] = offline_throughput(llm, num_requests, input_len, output_len, shape["vocab_size"])
        print(f"offline: {results['offline']}", flush=True)

        head_dim = shape["hidden_size"] // shape["num_attention_heads"]
        kv_bytes_per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * (
            torch.tensor([], dtype=dtype).element_size())
        bandwidth = H200_HBM_BYTES_PER_S
        timings = [decode_step_time(llm, b, context_len, steps, kv_bytes_per_token, weight_bytes, bandwidth,
                                    shape["vocab_size"]) for b in batch_sizes]
        results["decode_steps"] = [dict(asdict(t), vs_roofline=t.vs_roofline) for t in timings]

    print()
    print(f"{'batch':>5} {'context':>7} {'step ms':>9} {'roofline ms':>11} {'ratio':>6}")
    for t in timings:
        print(f"{t.batch_size:>5} {t.context_len:>7} {t.step_ms:>9.2f} {t.roofline_ms:>11.4f} {t.vs_roofline:>6.1f}")
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    last = timings[-1]
    print(f"decode_step_vs_roofline_b{last.batch_size}: {last.vs_roofline:.2f}")
    kernel_ok = args.skip_kernel_tests or results["kernel_tests"]["returncode"] == 0
    return 0 if kernel_ok else 1


if __name__ == "__main__":
    sys.exit(main())
