"""One engine of benchmarks/vs_vllm.py's offline comparison, in a process of its own (under that engine's venv).

    python benchmarks/offline_child.py splitserve|vllm JOB.json

Loads the engine once and warms it up on the whole workload, then writes one JSON line per line read on stdin:
the whole workload, greedy, timed (wall seconds, and CPU seconds of this process and every process under it,
since vLLM runs its engine core and CPU worker as processes of their own) with the token ids it produced. The
first line it writes is {"ready": ...}. Engines print freely, so results go to the original stdout and everything
else to stderr.
Standard library only at import time: vLLM's venv has no splitserve, the project's venv no vLLM.
"""

from __future__ import annotations

import json
import os
import sys
import time

from proc_tree import own_tree_cpu_seconds


def splitserve_runner(job):
    import torch

    torch.set_num_threads(job["threads"])
    from splitserve import LLM, SamplingParams

    llm = LLM(job["model"], dtype="float32", device="cpu", max_num_seqs=64, max_num_batched_tokens=2048,
              kv_cache_memory_bytes=job["kv_cache_memory_bytes"])

    def run(prompts, out_lens):
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in out_lens]
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]

    return run


def vllm_runner(job):
    # Thread count and binding come from VLLM_CPU_OMP_THREADS_BIND, the KV budget from VLLM_CPU_KVCACHE_SPACE: the
    # parent sets both.
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=job["model"], dtype="float32", max_num_seqs=64, max_num_batched_tokens=2048, seed=0)

    def run(prompts, out_lens):
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in out_lens]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    return run


RUNNERS = {"splitserve": splitserve_runner, "vllm": vllm_runner}


def main(engine: str, job_path: str) -> None:
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    with open(job_path) as f:
        job = json.load(f)
    start = time.perf_counter()
    run = RUNNERS[engine](job)
    # Warm-up: the whole workload once, untimed, so that no timed run is the first to meet a shape (both engines
    # compile kernels with Inductor, and a first sight of a batch or sequence size can mean a compile).
    run(job["prompts"], job["out_lens"])
    results.write(json.dumps({"ready": True, "load_s": time.perf_counter() - start}) + "\n")
    for _ in sys.stdin:
        wall, cpu = time.perf_counter(), own_tree_cpu_seconds()
        token_ids = run(job["prompts"], job["out_lens"])
        wall, cpu = time.perf_counter() - wall, own_tree_cpu_seconds() - cpu
        results.write(json.dumps({"wall_s": wall, "cpu_s": cpu, "token_ids": token_ids}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
