"""Decides after each new token whether a sequence is done, and why."""

from __future__ import annotations

from typing import Optional

from splitserve.detokenizer import REPLACEMENT_CHAR
from splitserve.engine.sequence import Sequence


class StopChecker:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def check(self, seq: Sequence) -> Optional[str]:
        """Returns the finish reason, setting seq.stop_reason, or None to go on."""
        params = seq.params
        token = seq.output_token_ids[-1]
        # The first min_tokens tokens end nothing (the sampler keeps EOS and stop ids out of them; stop strings
        # are not looked for), as in vLLM.
        if len(seq.output_token_ids) > params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                return "stop"
            if token in params.stop_token_ids:
                seq.stop_reason = token
                return "stop"
            if params.stop and self._find_stop_string(seq) is not None:
                return "stop"
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _find_stop_string(self, seq: Sequence) -> Optional[str]:
        # A new match must end in the newest tokens: a string of L characters is at most 4L UTF-8 bytes, so at
        # most 4L byte-level tokens. Decoding only that tail keeps each step O(window), not O(output).
        window = 4 * max(len(s) for s in seq.params.stop) + 4
        tail = self.decode(seq.output_token_ids[-window:])
        if not any(s in tail for s in seq.params.stop):
            return None
        found = self._stop_string_at(seq, self.decode(seq.output_token_ids))
        if found is None:
            return None
        seq.stop_reason = found[1]
        return seq.stop_reason

    def _stop_string_at(self, seq: Sequence, text: str) -> Optional[tuple[int, str]]:
        """(start, stop string) of the earliest match that ends after the first min_tokens tokens' text; a match
        inside that text ended nothing when it appeared, and does not later either."""
        floor = 0
        if seq.params.min_tokens:
            # An incomplete character at the boundary is not text yet: the token that completes it adds it.
            floor = len(self.decode(seq.output_token_ids[: seq.params.min_tokens]).rstrip(REPLACEMENT_CHAR))
        found = [(text.find(s, max(0, floor - len(s) + 1)), s) for s in seq.params.stop]
        found = [(start, s) for start, s in found if start >= 0]
        return min(found) if found else None

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def final_text(self, seq: Sequence) -> str:
        """The output text; a stop string and whatever followed it in the same token are cut off."""
        text = self.decode(seq.output_token_ids)
        if isinstance(seq.stop_reason, str):
            found = self._stop_string_at(seq, text)
            if found is not None:
                text = text[: found[0]]
        return text
