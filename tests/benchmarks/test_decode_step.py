"""benchmarks/decode_step.py runs on a real checkpoint and prints one row per batch size."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import decode_step  # noqa: E402
import pytest  # noqa: E402


def test_prints_a_step_time_per_batch_size(llama_ckpt, capsys):
    decode_step.main(["--model", str(llama_ckpt), "--batches", "1,3", "--steps", "4", "--prompt-len", "20"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["1", "3"]
    for batch, step_ms, cpu_ms, per_token in rows:
        assert float(step_ms) > 0 and float(cpu_ms) >= 0
        assert float(per_token) == pytest.approx(float(step_ms) / int(batch), abs=0.01)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        decode_step.main(["--batches", "0"])
