"""Hugging Face transformers as the reference the engine is measured against (greedy tokens, logits)."""

from __future__ import annotations

import functools
import random
from typing import Optional

import torch
from transformers import AutoModelForCausalLM


@functools.lru_cache(maxsize=8)
def hf_model(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path: str, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False,
              eos_token_ids: Optional[list[int]] = None, min_new_tokens: int = 0) -> list[int]:
    """One prompt at a time, no padding: the cleanest reference there is. `eos_token_ids` replaces the model's
    EOS ids (every id that ends generation); transformers masks them for the first `min_new_tokens`."""
    model = hf_model(path)
    ids = torch.tensor([prompt_ids])
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
    if ignore_eos:
        kwargs.update(eos_token_id=None)
    elif eos_token_ids is not None:
        kwargs.update(eos_token_id=list(eos_token_ids))
    if min_new_tokens:
        kwargs.update(min_new_tokens=min_new_tokens)
    with torch.inference_mode():
        out = model.generate(ids, pad_token_id=model.generation_config.eos_token_id, **kwargs)
    return out[0, len(prompt_ids):].tolist()


def hf_logprobs(path: str, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at each position that produced an output token: [len(output), V]."""
    model = hf_model(path)
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.inference_mode():
        logits = model(ids).logits[0].float()
    start = len(prompt_ids) - 1
    return torch.log_softmax(logits[start : start + len(output_ids)], dim=-1)


def mixed_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Random token prompts; the second half share a long common prefix with the first so caches get hits."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]
    shared = prompts[-1][:40]
    for i in range(len(prompts) // 2, len(prompts)):
        if len(prompts[i]) > 50:
            prompts[i] = shared + prompts[i][40:]
    return prompts
