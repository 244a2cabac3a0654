"""benchmarks/one_row_decode.py runs its three reads of one row and prints one row of figures per length."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import one_row_decode  # noqa: E402


def test_prints_each_read_per_round_and_restores_the_split_rules(capsys):
    from splitserve.layers import attention

    rules = attention._SPLIT_ONE_ROW_BLOCKS, attention._SPLIT_ONE_RUN_BLOCKS
    one_row_decode.main(["--ctx", "40,16", "--layers", "2", "--rounds", "2", "--iters", "2", "--cache-blocks", "8"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["ctx", "split", "in", "place", "gathered"]
    rows = {int(line.split()[0]): [float(x) for x in line.split()[1:]] for line in lines[2:]}
    assert set(rows) == {40, 16} and all(len(v) == 6 for v in rows.values())
    assert all(x > 0 for x in rows[40]) and math.isnan(rows[16][0])   # one block: nothing to split
    assert (attention._SPLIT_ONE_ROW_BLOCKS, attention._SPLIT_ONE_RUN_BLOCKS) == rules
