"""StopStringMatcher: stop strings found across deltas, and nothing of one ever released."""

from __future__ import annotations

import pytest

from splitserve.engine.stop_strings import StopStringMatcher


def _run(stops, deltas):
    matcher = StopStringMatcher(stops)
    released = [matcher.feed(d) for d in deltas]
    return released, matcher.matched, matcher.flush()


def test_no_stop_strings_pass_text_through():
    assert _run([], ["a", "b"]) == (["a", "b"], None, "")


def test_stop_string_inside_one_delta_cuts_there():
    assert _run(["END"], ["abcENDxyz", "more"]) == (["abc", ""], "END", "")


def test_stop_string_across_deltas_is_never_released():
    released, matched, _ = _run(["STOP"], ["hello S", "T", "OP and more"])
    assert released == ["hello ", "", ""] and matched == "STOP"


def test_a_false_start_is_released_once_it_cannot_be_a_stop_string():
    assert _run(["STOP"], ["xS", "Tx", "y"]) == (["x", "STx", "y"], None, "")


def test_held_tail_is_flushed_at_the_end():
    assert _run(["STOP"], ["abcST"]) == (["abc"], None, "ST")


def test_earliest_stop_wins_and_the_longer_at_the_same_place():
    assert _run(["b", "ab", "c"], ["xxabc"])[1] == "ab"
    assert _run(["c", "bc"], ["abc"])[:2] == (["a"], "bc")


@pytest.mark.parametrize("split", range(1, 12))
def test_any_split_gives_the_same_text(split):
    text = "one two THREE four"
    released, matched, _ = _run(["THREE", "four"], [text[:split], text[split:]])
    assert "".join(released) == "one two " and matched == "THREE"


def test_stop_strings_before_min_tokens_end_nothing():
    # Deltas fed with can_stop=False are one of a request's first min_tokens tokens: their stop strings are text.
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("aENDb", can_stop=False) == "aENDb" and matcher.matched is None
    assert matcher.feed("c END tail") == "c " and matcher.matched == "END"


def test_a_stop_string_completed_after_min_tokens_may_start_before():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("x ST", can_stop=False) == "x "
    assert matcher.feed("OP y") == "" and matcher.matched == "STOP"


def test_a_stop_string_wholly_inside_held_back_text_does_not_match_later():
    # "y" completes while stopping is not allowed; it is also held back as the start of "yz". The next delta
    # may not end the sequence on that old "y", only on a match ending in the new text.
    matcher = StopStringMatcher(["yz", "y"])
    assert matcher.feed("xy", can_stop=False) == "x"
    assert matcher.feed("q") == "yq" and matcher.matched is None
    assert matcher.feed("ry") == "r" and matcher.matched == "y"
