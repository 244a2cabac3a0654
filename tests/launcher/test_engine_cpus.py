"""Which cores each engine worker gets and how many torch threads follow, checked on the plan (nothing starts)."""

import itertools

import pytest

from splitserve.launcher.plan import StackConfig, engine_cpu_sets, plan_stack
from splitserve.serving.settings import parse_settings


def _specs(cpus, **fields):
    config = StackConfig(**{"model": "/models/m", **fields})
    plan = plan_stack(config, config.model, "/tmp/unused", itertools.count(20000), redis_binary="redis-server",
                      envoy_binary="envoy", service_command=["python", "-m", "splitserve.services.cli"],
                      redis_password="p", cpus=cpus)
    return {spec.name: spec for tier in plan.tiers for spec in tier}


def _flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize("cpus, prefill, decode, expected", [
    # From 4 cores on, the first is kept for the other services; the rest split, the remainder to decode.
    (range(16), 1, 1, [list(range(1, 8)), list(range(8, 16))]),
    (range(8), 2, 3, [[1], [2], [3, 4], [5, 6], [7]]),
    (range(4), 0, 1, [[1, 2, 3]]),
    # Below 4 cores nothing is kept aside: aggregated gets every core, disaggregated one each.
    ([0, 1], 0, 1, [[0, 1]]),
    ([0, 1], 1, 1, [[0], [1]]),
    # Fewer cores than workers: shared round robin.
    ([0, 1], 2, 2, [[0], [1], [0], [1]]),
    ([4, 6, 5], 1, 1, [[4], [5, 6]]),
])
def test_engine_workers_get_disjoint_cores(cpus, prefill, decode, expected):
    assert engine_cpu_sets(cpus, prefill, decode) == expected


def test_each_worker_is_pinned_and_its_threads_follow_its_cores():
    specs = _specs(range(16))
    for name, cpus, threads in (("prefill-0", "1-7", "7"), ("decode-0", "8-15", "8")):
        argv = specs[name].argv
        assert _flag(argv, "--cpus") == cpus
        assert _flag(argv, "--torch-threads") == threads == specs[name].env["OMP_NUM_THREADS"]
    assert all("--cpus" not in spec.argv for name, spec in specs.items() if name[:-2] not in ("prefill", "decode"))


def test_aggregated_starts_no_prefill_worker_and_gives_decode_every_engine_core():
    specs = _specs(range(16), prefill_workers=0)
    assert not any(name.startswith("prefill") for name in specs)
    assert _flag(specs["decode-0"].argv, "--cpus") == "1-15"
    assert _flag(specs["decode-0"].argv, "--torch-threads") == "15"
    from splitserve.services.gateway.server import GatewaySettings

    gateway = specs["gateway"].argv
    parsed = parse_settings(GatewaySettings, gateway[gateway.index("gateway") + 1:])
    assert parsed.prefill_addresses == [] and parsed.decode_addresses == [specs["decode-0"].address]


def test_without_affinity_threads_still_follow_the_split_and_a_thread_count_given_wins():
    specs = _specs(range(16), cpu_affinity=False)
    assert "--cpus" not in specs["decode-0"].argv and _flag(specs["decode-0"].argv, "--torch-threads") == "8"
    specs = _specs(range(16), torch_threads=2)
    assert _flag(specs["decode-0"].argv, "--cpus") == "8-15"
    assert _flag(specs["decode-0"].argv, "--torch-threads") == "2" == specs["decode-0"].env["OMP_NUM_THREADS"]


def test_the_workers_parse_the_cores_they_are_given():
    from splitserve.services.decode.server import DecodeSettings

    argv = _specs(range(16))["decode-0"].argv
    assert parse_settings(DecodeSettings, argv[argv.index("decode") + 1:]).cpus == "8-15"
    with pytest.raises(ValueError, match="not a core list"):
        DecodeSettings(cpus="8-")


def test_on_two_cores_each_engine_worker_may_borrow_the_others_core_with_a_bounded_spin():
    specs = _specs([0, 1])
    for name, own, other in (("prefill-0", "0", "1"), ("decode-0", "1", "0")):
        argv, env = specs[name].argv, specs[name].env
        assert (_flag(argv, "--cpus"), _flag(argv, "--borrow-cpus")) == (own, other)
        assert (env["OMP_WAIT_POLICY"], env["GOMP_SPINCOUNT"]) == ("ACTIVE", "10000")
    # Both say on one shared board whether they have work.
    boards = {_flag(specs[name].argv, "--core-activity-file") for name in ("prefill-0", "decode-0")}
    assert len(boards) == 1 and boards.pop().endswith("/core-activity")
    # Turned off, without affinity, or with no other engine worker: nothing to borrow, no spin.
    for fields in ({"borrow_idle_cores": False}, {"cpu_affinity": False}, {"prefill_workers": 0}):
        decode = _specs([0, 1], **fields)["decode-0"]
        assert "--borrow-cpus" not in decode.argv and "OMP_WAIT_POLICY" not in decode.env
        assert "--core-activity-file" not in decode.argv


def test_a_worker_of_several_cores_borrows_with_sleeping_threads():
    decode = _specs(range(16))["decode-0"]
    assert _flag(decode.argv, "--borrow-cpus") == "1-7" and "OMP_WAIT_POLICY" not in decode.env


def test_borrowed_cores_need_the_workers_own_and_must_not_overlap_them():
    from splitserve.services.decode.server import DecodeSettings

    assert DecodeSettings(cpus="1", borrow_cpus="0").borrow_cpus == "0"
    with pytest.raises(ValueError, match="needs cpus"):
        DecodeSettings(borrow_cpus="0")
    with pytest.raises(ValueError, match="must not overlap"):
        DecodeSettings(cpus="0-1", borrow_cpus="1")
