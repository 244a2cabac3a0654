"""Finds stop strings in streamed text without ever releasing text that turns out to be part of one.

Text arrives in deltas; a stop string can span several. While streaming, the longest tail of the text that is
the beginning of some stop string is held back: releasing it could show the user the first half of a stop
string that the next delta completes. When a stop string is found, the text is cut where it starts.

A delta fed with can_stop=False (one of the first min_tokens tokens) ends nothing: a stop string it completes
is released as text, as vLLM does. A later match must end in a later delta, though it may start earlier.
"""

from __future__ import annotations

from typing import Optional, Sequence


class StopStringMatcher:
    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.matched: Optional[str] = None
        self._held = ""

    def feed(self, delta: str, can_stop: bool = True) -> str:
        """The text that is safe to release now. Once a stop string matched, the text before it, then ""."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return delta
        text = self._held + delta
        # Only matches that end in this delta: the held text may hold a whole stop string fed with can_stop=False.
        starts = [(text.find(stop, max(0, len(self._held) - len(stop) + 1)), stop) for stop in self.stops]
        hits = [(start, -len(stop), stop) for start, stop in starts if start >= 0] if can_stop else []
        if hits:
            # Earliest start wins; at the same start the longer stop string (it is what the user wrote).
            start, _, self.matched = min(hits)
            self._held = ""
            return text[:start]
        keep = self._held_tail_len(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The held-back tail, at the end of a sequence that ended without a stop string."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _held_tail_len(self, text: str) -> int:
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
