"""One sequence's state as the engine sees it: tokens, how far its KV is computed, and its blocks."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from splitserve.kv_blocks.hashing import BlockHash
from splitserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from splitserve.engine.guided import SequenceGrammar
    from splitserve.engine.output_text import OutputText


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class Sequence:
    request_id: str
    index: int  # which of the request's n completions this is
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    # Tokens whose KV is in the cache (prefix-cache hits included); the rest must be computed.
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache at the last admission (reported as cached tokens).
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None
    generator: Optional[torch.Generator] = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # params.prompt_logprobs: one entry per prompt token after the first (engine/prompt_logprobs.py)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    num_preemptions: int = 0
    first_token_time: Optional[float] = None
    # The text made from output_token_ids (stop strings found there); set by the engine when the request is added.
    output_text: Optional["OutputText"] = None
    # Text the newest token released, and (on the step that finished the sequence) the text only its end
    # released: held-back text that can no longer start a stop string, an incomplete character as U+FFFD.
    new_text: str = ""
    end_text: str = ""
    # Guided decoding: the grammar's state after output_token_ids (None: unguided). Kept across preemption, since
    # the tokens are; advanced only by the engine's step.
    grammar: Optional["SequenceGrammar"] = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def in_prefill(self) -> bool:
        """True while more than the newest token lacks KV (a prompt, or a sequence restarted after preemption)."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: drop all KV; the tokens generated so far are kept and recomputed later."""
        self.num_computed_tokens = 0
        self.block_ids = []
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
