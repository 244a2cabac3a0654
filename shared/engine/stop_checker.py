"""Decides after each new token whether a sequence is done, and why."""

from __future__ import annotations

from typing import Optional

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
        text = self.decode(seq.output_token_ids)
        found = [(text.find(s), s) for s in seq.params.stop if s in text]
        if not found:
            return None
        seq.stop_reason = min(found)[1]
        return seq.stop_reason

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def final_text(self, seq: Sequence) -> str:
        """The output text; a stop string and whatever followed it in the same token are cut off."""
        text = self.decode(seq.output_token_ids)
        if isinstance(seq.stop_reason, str):
            text = text[: text.find(seq.stop_reason)]
        return text
