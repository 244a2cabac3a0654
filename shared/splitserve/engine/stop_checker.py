"""Decides after each new token whether a sequence is done, and why."""

from __future__ import annotations

from typing import Optional

from splitserve.engine.sequence import Sequence


class StopChecker:
    def __init__(self, eos_token_ids: set[int], max_model_len: int):
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def check(self, seq: Sequence) -> Optional[str]:
        """Returns the finish reason, setting seq.stop_reason, or None to go on.

        Stop strings are found by the sequence's OutputText as it makes the text (it already holds the
        min_tokens rule: a stop string completed by one of the first min_tokens tokens is text)."""
        params = seq.params
        token = seq.output_token_ids[-1]
        # The first min_tokens tokens end nothing (the sampler keeps EOS and stop ids out of them), as in vLLM.
        if len(seq.output_token_ids) > params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                return "stop"
            if token in params.stop_token_ids:
                seq.stop_reason = token
                return "stop"
        if seq.output_text is not None and seq.output_text.stop_string is not None:
            seq.stop_reason = seq.output_text.stop_string
            return "stop"
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None
