"""Rotary position embeddings, with the frequency scalings Llama-family checkpoints use."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn


class UnsupportedRopeScalingError(ValueError):
    pass


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict[str, Any]]) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise UnsupportedRopeScalingError(f"rope scaling type {rope_type!r} is not supported (default, linear, llama3 are)")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly.
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE at arbitrary per-token positions (the batch is flattened, positions are not contiguous)."""

    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict[str, Any]], max_position: int):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self.max_position = max_position
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def build_cache(self, device: torch.device, dtype: torch.dtype) -> None:
        """Computed in float32 like transformers, then cast: the same angles give the same logits."""
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(device)
        positions = torch.arange(self.max_position, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        half = emb.shape[-1] // 2
        sin = emb.sin()
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # see _rotate
        self.cos_sin = torch.stack((emb.cos(), signed_sin)).to(dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, Hq, D], k: [T, Hkv, D]
        cos = self.cos_sin[0, positions].unsqueeze(1)
        sin = self.cos_sin[1, positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' `x * cos + rotate_half(x) * sin` in fewer passes: rotate_half(x) * sin is the halves swapped
    times sin with its first half negated (exact: negation commutes with rounding), so the result is bit-identical."""
    out = x.roll(x.shape[-1] // 2, -1).mul_(signed_sin)
    return out.add_(x * cos)
