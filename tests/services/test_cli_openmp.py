"""Every splitserve command starts with OpenMP's idle threads sleeping, unless the user chose otherwise: the
variable must be in the environment before torch loads its OpenMP runtime, and `splitserve up`'s children
inherit it."""

from __future__ import annotations

import os

import pytest

from splitserve.services import cli


def test_commands_default_openmp_to_passive_waiting(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_a_users_wait_policy_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
