"""Guided decoding: the output follows a grammar (JSON schema, any JSON object, regex, choice, EBNF).

As in vLLM and SGLang, xgrammar compiles the grammar against the model's vocabulary once (cached), and one
GrammarMatcher per sequence says which token ids may come next: a bitmask, one bit per id, applied to that
row's logits before the sampler, so greedy and sampled decoding alike pick only allowed tokens, and the logprobs
reported are those of the masked distribution (vLLM's too). The sampled token then advances the matcher. When
the grammar is complete only the model's EOS ids are allowed; the matcher accepting one ends the sequence.

Three owners: the engine's `Grammars` (the compiler and its cache), each sequence's `SequenceGrammar` (its
matcher, advanced only by the engine's step), the runner's `GrammarMasks` (the bitmask buffer). A sequence that
continues elsewhere (decode after prefill, recompute after preemption or a decode worker's failure) rebuilds its
matcher from the params and replays the tokens already produced: the state is a function of those tokens.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import threading
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from splitserve.sampling_params import InvalidRequestError, StructuredOutput

if TYPE_CHECKING:
    import xgrammar as xgr


def _xgrammar():
    """xgrammar, imported at the first guided request: engines that never see one neither load it nor build its
    tokenizer tables (a second or more for a 128k vocabulary at every start)."""
    return importlib.import_module("xgrammar")

# A compiled JSON schema over a 128k vocabulary is a few MiB; this keeps the few hundred most recent ones.
_CACHE_LIMIT_BYTES = 256 * 2**20
# Compact JSON: with free whitespace a weak model can spend its whole budget on blanks between tokens.
_ANY_WHITESPACE = False
# xgrammar's messages start with "[hh:mm:ss] /path/file.cc:123: " and sometimes "Check failed: (...) is false: ".
_NATIVE_PREFIX = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*(Check failed: .*? is false:\s*)?")


class Grammars:
    """One per engine: the compiler for this model's vocabulary (the logits' width) and its cache of compiled
    grammars. compile() is safe from any thread: the serving engine compiles off its step loop."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._built = threading.Lock()
        self._compiler: Optional["xgr.GrammarCompiler"] = None
        self._json_tokens: Optional[torch.Tensor] = None

    def _ready(self) -> "xgr.GrammarCompiler":
        """The compiler, built on first use (by whichever thread compiles first)."""
        with self._built:
            if self._compiler is None:
                xgr = _xgrammar()
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop_token_ids)
                threads = max(1, min(8, len(os.sched_getaffinity(0))))
                self._json_tokens = _json_tokens(info, self.vocab_size, self._stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=True,
                                                     cache_limit_bytes=_CACHE_LIMIT_BYTES)
            return self._compiler

    def compile(self, spec: StructuredOutput) -> "xgr.CompiledGrammar":
        """Raises InvalidRequestError (the user's grammar) with xgrammar's reason."""
        compiler = self._ready()
        try:
            if spec.json_schema is not None:
                json.loads(spec.json_schema)   # a clear message for text that is not JSON at all
                return compiler.compile_json_schema(spec.json_schema, any_whitespace=_ANY_WHITESPACE)
            if spec.json_object:
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=_ANY_WHITESPACE)
            if spec.regex is not None:
                return compiler.compile_regex(spec.regex)
            if spec.choice is not None:
                return compiler.compile_grammar(choice_grammar(spec.choice))
            return compiler.compile_grammar(spec.grammar)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}", "structured_outputs") from None
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = _NATIVE_PREFIX.sub("", str(exc).strip()).splitlines()[0] if str(exc).strip() else repr(exc)
            raise InvalidRequestError(f"invalid {spec.kind.replace('_', ' ')}: {reason}",
                                      "structured_outputs") from None

    def start(self, spec: StructuredOutput, produced: Sequence[int] = ()) -> "SequenceGrammar":
        """A new sequence's matcher, advanced over the tokens it already produced elsewhere."""
        # xgrammar 0.2.9 lets a JSON string with minLength/maxLength hold raw control characters, which JSON
        # forbids (mlc-ai/xgrammar#800): JSON outputs are also kept to the tokens without one.
        compiled = self.compile(spec)
        also = self._json_tokens if spec.json_schema is not None or spec.json_object else None
        grammar = SequenceGrammar(_xgrammar().GrammarMatcher(compiled), also)
        for i, token in enumerate(produced):
            if grammar.terminated or not grammar.accept(token):
                raise InvalidRequestError(f"produced token {i} ({token}) does not follow the request's grammar",
                                          "produced_token_ids")
        return grammar


def _json_tokens(info: "xgr.TokenizerInfo", vocab_size: int, stop_token_ids: Sequence[int]) -> torch.Tensor:
    """A bitmask row (xgrammar's layout: bit j of word w is id 32w + j) of the ids that compact JSON text can hold:
    none with a raw control byte (U+0000-U+001F; with no free whitespace, JSON never has one), and the end ids."""
    ok = torch.zeros(_xgrammar().get_bitmask_shape(1, vocab_size)[1] * 32, dtype=torch.bool)
    for token, data in enumerate(info.decoded_vocab[:vocab_size]):
        ok[token] = not any(byte < 0x20 for byte in data)
    ok[list(stop_token_ids)] = True
    words = (ok.view(-1, 32).long() << torch.arange(32)).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF whose only sentences are the choices. JSON string escapes are also EBNF's (\\", \\\\, \\n, \\uXXXX)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class SequenceGrammar:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: "xgr.GrammarMatcher", also: Optional[torch.Tensor] = None):
        self._matcher = matcher
        self._also = also      # a bitmask row the tokens must also be in, or None

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if self._also is not None:
            bitmask[row].bitwise_and_(self._also)

    def accept(self, token_id: int) -> bool:
        """Advances over a sampled token; False (state unchanged) when the grammar does not allow it."""
        return self._matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and an end token was accepted: the sequence is over."""
        return self._matcher.is_terminated()


class GrammarMasks:
    """The runner's bitmask buffer: grows to the largest batch seen, filled each step only for guided rows."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._bitmask: Optional[torch.Tensor] = None   # allocated at the first guided batch

    def apply(self, logits: torch.Tensor, grammars: Sequence[Optional[SequenceGrammar]]) -> None:
        """In place on logits [B, V]: each guided row's disallowed tokens to -inf. Unguided batches cost one scan."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return
        xgr = _xgrammar()
        if self._bitmask is None or self._bitmask.shape[0] < len(grammars):
            self._bitmask = xgr.allocate_token_bitmask(len(grammars), self.vocab_size)
        for i in rows:
            grammars[i].fill(self._bitmask, i)
        bitmask = self._bitmask[: len(grammars)]
        if logits.device != bitmask.device:
            bitmask = bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)
