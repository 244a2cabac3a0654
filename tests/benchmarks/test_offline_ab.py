"""The part of benchmarks/offline_ab.py that runs without engines: a variant's name and environment."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import offline_ab  # noqa: E402


def test_a_variant_is_its_name_and_environment_over_the_current_one(monkeypatch):
    monkeypatch.setenv("KEEP", "1")
    name, env = offline_ab.variant_env("before=PYTHONPATH=/tmp/b/shared A='x y'", threads=2)
    assert name == "before"
    assert (env["PYTHONPATH"], env["A"], env["OMP_NUM_THREADS"], env["KEEP"]) == ("/tmp/b/shared", "x y", "2", "1")
    assert offline_ab.variant_env("now=", threads=1)[0] == "now"


def test_a_word_that_is_not_an_assignment_is_refused():
    with pytest.raises(SystemExit, match="not NAME=VALUE"):
        offline_ab.variant_env("now=--flag", threads=2)
