"""CPU linear layers whose weights are packed once, at load, into oneDNN's blocked layout.

Why: a decode step multiplies a few rows by every weight matrix, and torch's default CPU GEMM does that far below
what the cores can (measured on 2 AVX2 cores, float32, 512 -> 1376: 158 us at 4 rows against 49 us packed; 1.3-1.5x
at 64 rows). vLLM's CPU build packs its linear weights for oneDNN for the same reason. The packed copy replaces the
original, so weights take no more memory; a weight shared with another module (tied embeddings) stays as it is.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

LINEAR_BACKENDS = ("auto", "packed", "torch")


class PackedLinear(nn.Module):
    """y = x W^T + b, with W held in oneDNN's layout (not a Parameter: inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packing_applies(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> bool:
    """Whether to pack: `packed` insists (an error where it cannot run), `torch` never, `auto` on CPU in float32 when
    torch has oneDNN (anything else keeps torch's linear, which is what the GPU and half-precision paths want)."""
    if requested not in LINEAR_BACKENDS:
        raise ValueError(f"unknown linear backend {requested!r} ({', '.join(LINEAR_BACKENDS)})")
    if requested == "torch":
        return False
    possible = device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
    if requested == "packed" and not possible:
        raise ValueError(f"linear_backend=packed needs a CPU float32 engine and torch built with oneDNN "
                         f"(device {device}, dtype {dtype}, oneDNN {torch.backends.mkldnn.is_available()})")
    if requested == "auto" and device.type == "cpu" and dtype == torch.float32 and not possible:
        log.warning("torch has no oneDNN: CPU linear layers run unpacked (several times slower at decode batch sizes)")
    return possible


def pack_linears(model: nn.Module) -> int:
    """Replaces every nn.Linear of `model` whose weight no other module shares with a PackedLinear; returns how many."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and owners.get(id(child.weight)) == 1:
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    return replaced
