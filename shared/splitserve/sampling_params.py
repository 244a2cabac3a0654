"""How one request wants its tokens chosen; names follow vLLM's so users' code carries over."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional

# Seeds travel as proto int64 and seed torch generators; vLLM accepts the same range.
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1
TOP_K_MAX = 2**31 - 1
LOGIT_BIAS_MAX = 100.0            # OpenAI's range
_FLOAT_PARAMS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
# These travel as proto float: a larger magnitude arrives at the worker as inf.
FLOAT32_MAX = 3.4028234663852886e38


class InvalidRequestError(ValueError):
    """A request the engine refuses; the message is meant for the user (services map it to HTTP 400)."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredOutput:
    """The grammar a guided sequence's output must follow (exactly one field set), as the proto's oneof and vLLM's
    `structured_outputs`. Frozen and hashable: the engine caches compiled grammars by it."""

    json_schema: Optional[str] = None           # a JSON Schema document, as JSON text
    json_object: bool = False                   # any JSON object
    regex: Optional[str] = None
    choice: Optional[tuple[str, ...]] = None    # the output is exactly one of these strings
    grammar: Optional[str] = None               # EBNF (GBNF dialect, as xgrammar reads it)

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        self.validate()

    @property
    def kind(self) -> str:
        return next(name for name in _STRUCTURED_KINDS if getattr(self, name) not in (None, False))

    def validate(self) -> None:
        given = [name for name in _STRUCTURED_KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(f"structured output takes exactly one constraint, got {len(given)}"
                                      + (f" ({', '.join(given)})" if given else ""), "structured_outputs")
        if self.choice is not None and (not self.choice or any(not isinstance(c, str) or not c for c in self.choice)):
            raise InvalidRequestError("choice must be a non-empty list of non-empty strings", "structured_outputs")
        for name in ("json_schema", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidRequestError(f"{name} must be a non-empty string", "structured_outputs")


_STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    # EOS and stop_token_ids cannot be sampled, and stop strings do not end the sequence, until this many
    # tokens were generated (vLLM's semantics).
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Optional[list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: Optional[int] = None
    # Each prompt token's logprob given the tokens before it (none for the first) plus this many most likely
    # tokens at its position (vLLM's prompt_logprobs; OpenAI's echo with logprobs). Computed during prefill.
    prompt_logprobs: Optional[int] = None
    # token id -> added to its logit before sampling (OpenAI's logit_bias)
    logit_bias: Optional[dict[int, float]] = None
    n: int = 1
    # Leave special tokens out of the text (not out of the token ids), as tokenizer.decode does.
    skip_special_tokens: bool = True
    # Guided decoding: every token is masked to what this grammar allows (engine/guided.py).
    structured_output: Optional[StructuredOutput] = None
    # Extra EOS-like ids from the model's generation_config; filled by the engine, not by users.
    _eos_token_ids: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        self.validate()

    def validate(self) -> None:
        def bad(param: str, message: str) -> None:
            raise InvalidRequestError(message, param)

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if (not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool)
                or not 0 <= self.min_tokens <= self.max_tokens):
            bad("min_tokens", f"min_tokens must be an integer between 0 and max_tokens ({self.max_tokens}), "
                f"got {self.min_tokens!r}")
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"n must be an integer >= 1, got {self.n!r}")
        for name in _FLOAT_PARAMS:   # NaN passes every range check below
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or abs(value) > FLOAT32_MAX:
                bad(name, f"{name} must be a finite number of at most 3.4e38 in magnitude, got {value!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            bad("seed", f"seed must be an integer in [-2**63, 2**63 - 1], got {self.seed!r}")
        if self.temperature < 0.0:
            bad("temperature", f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        # At most int32's max: top_k's wire type (any value over the vocabulary size keeps every token anyway).
        if (not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k not in (-1, 0))
                or self.top_k > TOP_K_MAX):
            bad("top_k", f"top_k must be -1 (disabled) or an integer in [1, 2**31 - 1], got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0.0:
            bad("repetition_penalty", f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            bad("logprobs", f"logprobs must be a non-negative integer, got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or isinstance(self.prompt_logprobs, bool) or self.prompt_logprobs < 0):
            bad("prompt_logprobs", f"prompt_logprobs must be a non-negative integer, got {self.prompt_logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "stop must be a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "stop_token_ids must be non-negative integers")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                bad("logit_bias", f"logit_bias keys must be token ids (non-negative integers), got {token!r}")
            if (not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(bias)
                    or not -LOGIT_BIAS_MAX <= bias <= LOGIT_BIAS_MAX):
                bad("logit_bias", f"logit_bias values must be numbers in [-100, 100], got {bias!r} for {token}")
        if self.structured_output is not None:
            if not isinstance(self.structured_output, StructuredOutput):
                bad("structured_outputs", f"structured_output must be a StructuredOutput, got "
                    f"{type(self.structured_output).__name__}")
            # The grammar decides where a guided output ends; min_tokens could forbid its only way out (EOS).
            if self.min_tokens:
                bad("min_tokens", "min_tokens cannot be combined with structured output: the grammar decides "
                    "where the output ends")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def min_tokens_blocked_ids(self) -> list[int]:
        """The ids the sampler masks while fewer than min_tokens were generated: every id that would end the
        sequence. EOS is masked even with ignore_eos, as vLLM does."""
        return sorted(set(self.stop_token_ids) | set(self._eos_token_ids))

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def replace(self, **changes) -> "SamplingParams":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingParams(**values)
