"""RateMeter: the rate workers announce (prefill tokens/s, KV write bytes/s) for the gateway's prefill choice."""

import pytest

from splitserve.rate_meter import RateMeter


def test_no_rate_before_an_observation_and_nothing_observed_is_ignored():
    meter = RateMeter(min_amount=10)
    for amount, seconds in ((0, 1.0), (5, 1.0), (100, 0.0)):   # nothing, below min_amount, no time
        meter.observe(amount, seconds)
    assert meter.rate is None
    meter.observe(100, 0.5)
    assert meter.rate == pytest.approx(200)


def test_a_big_observation_weighs_by_its_size_and_recent_ones_most():
    meter = RateMeter(weight=0.5)
    meter.observe(2000, 1.0)                 # 2000/s
    meter.observe(20, 0.1)                   # 200/s, but a tenth of the time: the ratio of sums stays high
    assert meter.rate == pytest.approx((0.5 * 2000 + 0.5 * 20) / (0.5 * 1.0 + 0.5 * 0.1))
    for _ in range(20):                      # the worker slowed down to 100/s: the rate follows
        meter.observe(100, 1.0)
    assert meter.rate == pytest.approx(100, rel=0.01)


def test_weight_must_be_a_fraction():
    with pytest.raises(ValueError):
        RateMeter(weight=0)
