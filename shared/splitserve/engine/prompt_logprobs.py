"""Prompt log-probabilities (vLLM's prompt_logprobs, OpenAI's echo with logprobs), computed during prefill.

Position p's hidden state predicts token p + 1, so a prefill chunk covering positions [start, end) gives the
entries of prompt tokens start + 1 .. min(end, P - 1); chunks extend a sequence's list in order. That needs every
prompt position computed in this engine: a cached position has KV but no logits, so a request that asks gets no
prefix-cache hit and no received blocks (as vLLM does; its own blocks are still registered for others to reuse).
Only the rows of requests that asked are projected onto the vocabulary: other requests pay nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from splitserve.engine.sequence import Sequence

# (the prompt token's logprob, [(alternative id, logprob), ...] most likely first)
PromptLogprob = tuple[float, list[tuple[int, float]]]
# Logits are [rows, vocab] float32 (150k-token vocabularies: 600 KB a row): a long prompt is projected in passes.
_ROWS_PER_PASS = 256


@dataclass
class PromptLogprobRows:
    """Which rows of one step's hidden states give prompt entries, and for which sequences."""
    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)        # the prompt token each row predicts
    ks: list[int] = field(default_factory=list)             # how many alternatives its sequence wants
    counts: list[tuple[Sequence, int]] = field(default_factory=list)

    def add(self, seq: Sequence, first_row: int, start: int, end: int) -> None:
        """A chunk of `seq` computes positions [start, end) in rows first_row.. of the step's hidden states."""
        k = seq.params.prompt_logprobs
        if k is None:
            return
        have = len(seq.prompt_logprobs)  # entries from earlier chunks (all of them again after a preemption)
        positions = range(max(start, have), min(end, seq.num_prompt_tokens - 1))
        if not positions:
            return
        assert have >= start, "a prompt position without logits: prefix hits must be off for prompt_logprobs"
        self.rows.extend(first_row + p - start for p in positions)
        self.targets.extend(seq.prompt_token_ids[p + 1] for p in positions)
        self.ks.extend([k] * len(positions))
        self.counts.append((seq, len(positions)))

    def compute(self, hidden: torch.Tensor,
                compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> list[tuple[Sequence, list[PromptLogprob]]]:
        """Each sequence's new entries, in order (log_softmax of the model's own logits, like sampled logprobs)."""
        if not self.rows:
            return []
        entries: list[PromptLogprob] = []
        kmax = max(self.ks)
        for lo in range(0, len(self.rows), _ROWS_PER_PASS):
            hi = lo + _ROWS_PER_PASS
            rows = torch.tensor(self.rows[lo:hi], dtype=torch.int64, device=hidden.device)
            targets = torch.tensor(self.targets[lo:hi], dtype=torch.int64, device=hidden.device)
            lp = compute_logits(hidden[rows]).float().log_softmax(dim=-1)
            chosen = lp.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
            top_v, top_i = [[] for _ in chosen], [[] for _ in chosen]
            if kmax > 0:
                vals, ids = lp.topk(min(kmax, lp.shape[-1]), dim=-1, sorted=True)
                top_v, top_i = vals.tolist(), ids.tolist()
            for j, k in enumerate(self.ks[lo:hi]):
                entries.append((chosen[j], list(zip(top_i[j][:k], top_v[j][:k]))))
        out, at = [], 0
        for seq, count in self.counts:
            out.append((seq, entries[at:at + count]))
            at += count
        return out

