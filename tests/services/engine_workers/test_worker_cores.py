"""An engine worker runs on the cores it is given and one torch thread per core, unless told otherwise."""

import json
import os
import subprocess
import sys

import pytest

_PROBE = """
import json, os, sys, torch
from splitserve.serving.engine_worker import EngineWorkerSettings, use_cores
threads = use_cores(EngineWorkerSettings(**json.loads(sys.argv[1])))
a = torch.randn(256, 256)
for _ in range(20):
    a = torch.tanh(a @ a)  # a parallel op: torch's OpenMP threads exist from here on
tasks = []
for task in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{task}/status") as f:
        tasks += [line.split()[1] for line in f if line.startswith("Cpus_allowed_list")]
print(json.dumps({"threads": threads, "torch": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"),
                  "affinity": sorted(os.sched_getaffinity(0)), "task_cpus": sorted(set(tasks))}))
"""


def _probe(omp_num_threads=None, **settings) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = omp_num_threads
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(settings)], env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_a_worker_given_one_core_runs_every_thread_there_with_one_torch_thread():
    core = max(os.sched_getaffinity(0))
    seen = _probe(cpus=str(core))
    assert seen["affinity"] == [core] and seen["task_cpus"] == [str(core)]
    assert seen["threads"] == seen["torch"] == 1 and seen["omp"] == "1"


def test_by_default_threads_follow_the_cores_the_process_may_use():
    seen = _probe()
    assert seen["threads"] == seen["torch"] == len(os.sched_getaffinity(0)) == len(seen["affinity"])


def test_a_thread_count_given_wins_over_the_cores():
    seen = _probe(torch_threads=3)
    assert seen["threads"] == seen["torch"] == 3 and seen["omp"] == "3"
    seen = _probe(omp_num_threads="3")
    assert seen["threads"] == seen["torch"] == 3
