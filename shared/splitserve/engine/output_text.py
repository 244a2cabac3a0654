"""One sequence's output text, made where its tokens are made: ids in, text deltas out, stop strings found.

The engine pushes each sampled token here (offline in LLM.generate and in the prefill/decode workers alike), so
text is made once, in one place, and travels with the tokens. A delta never splits a UTF-8 character (the
IncrementalDetokenizer holds incomplete ones back) and never shows any part of a stop string: text that could
be the start of one is held back until it cannot (StopStringMatcher). The text of a sequence ended by a stop
string stops just before it, as OpenAI's does.

A sequence continued on another worker (the first token came from a prefill worker, or a decode worker died
mid-stream) rebuilds this state by replaying the tokens already produced: pushes are deterministic, so the
replayed state equals the one the first worker had after streaming them, and the new deltas continue its text
exactly. The replayed text itself was already streamed and is dropped.
"""

from __future__ import annotations

from typing import Optional, Sequence

from splitserve.detokenizer import IncrementalDetokenizer
from splitserve.engine.stop_strings import StopStringMatcher
from splitserve.sampling_params import SamplingParams


class OutputText:
    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams):
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self._matcher = StopStringMatcher(params.stop)
        self._min_tokens = params.min_tokens
        self._num_tokens = 0
        self.text = ""           # everything released so far: a finished sequence's whole text
        self._finished = False

    @property
    def stop_string(self) -> Optional[str]:
        """The stop string that ended the sequence, once one did."""
        return self._matcher.matched

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text now safe to show (often ""). After a stop string matched, ""."""
        self._num_tokens += 1
        if self._matcher.matched is not None:
            return ""
        # The first min_tokens tokens end nothing: a stop string they complete is ordinary text (vLLM's rule).
        delta = self._matcher.feed(self._detokenizer.push([token_id]), can_stop=self._num_tokens > self._min_tokens)
        self.text += delta
        return delta

    def replay(self, token_ids: Sequence[int]) -> None:
        """Pushes tokens whose text another worker already streamed (see the module docstring)."""
        for token_id in token_ids:
            self.push(token_id)

    def finish(self) -> str:
        """The text released because the sequence ended: whatever was held back as a possible stop string's
        start, and an incomplete character as U+FFFD. Call once, when the sequence finishes."""
        if self._finished or self._matcher.matched is not None:
            self._finished = True
            return ""
        self._finished = True
        delta = self._matcher.feed(self._detokenizer.flush(), can_stop=self._num_tokens > self._min_tokens)
        delta += self._matcher.flush()
        self.text += delta
        return delta
