"""The GPU check script runs end to end at a tiny shape on CPU, so the one bounded run on a lent GPU does not fail
on a typo."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check  # noqa: E402


def test_tiny_run_writes_results(tmp_path, capsys):
    assert gpu_check.main(["--tiny", "--skip-kernel-tests", "--batch-sizes", "1,2", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["offline"]["requests"] == 4 and results["offline"]["output_tok_s"] > 0
    assert [s["batch_size"] for s in results["decode_steps"]] == [1, 2]
    assert all(s["step_ms"] > 0 and s["roofline_ms"] > 0 for s in results["decode_steps"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("decode_step_vs_roofline_b2: ")


def test_refuses_the_full_shape_without_cuda():
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit):
        gpu_check.main([])
