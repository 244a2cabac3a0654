"""Which token ids end a sequence for a model: one answer for the engine's stop checks and the tokenizer service.

Torch-free on purpose: the tokenizer service imports it without loading model code.
"""

from __future__ import annotations

from typing import Any


def eos_token_ids(tokenizer, config: dict[str, Any], generation_config: dict[str, Any]) -> tuple[int, ...]:
    """The tokenizer's EOS plus every EOS id the model's configs list (Llama 3 lists several), sorted."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, config.get("eos_token_id"), generation_config.get("eos_token_id")):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(int(t) for t in source)
    return tuple(sorted(ids))
