"""What generation returns; field names follow vLLM's RequestOutput/CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]  # "stop" | "length" | "abort" | None while running
    stop_reason: Union[int, str, None] = None  # the stop token id or stop string that ended it
    cumulative_logprob: Optional[float] = None
    # One dict per generated token: the sampled token's logprob and the requested top alternatives.
    logprobs: Optional[list[dict[int, float]]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # Prefill handoff: the prompt's full blocks (hashes, uint8 [n, bytes_per_block]) when the request asked.
    kv_export: Optional["KVExport"] = None
    # SamplingParams.prompt_logprobs: None for the first prompt token, then one dict per token as in logprobs.
    prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = None


def logprob_entry(token_id: int, logprob: float, top: Optional[list[tuple[int, float]]]) -> dict[int, float]:
    """vLLM's per-token logprobs dict: the token's own logprob and its alternatives'."""
    entry = dict(top or [])
    entry[token_id] = logprob
    return entry


@dataclass
class KVExport:
    block_hashes: list[bytes]
    blocks: "object"  # torch.Tensor, or CacheBlocks lent by a serving engine; typed loosely to stay import-light
    num_tokens: int

    def release(self) -> None:
        """Ends the loan of lent cache blocks (copied rows need nothing); safe to call more than once."""
        release = getattr(self.blocks, "release", None)
        if release is not None:
            release()
