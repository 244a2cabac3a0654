"""Packed CPU linear layers give torch's linear results, replace only weights nobody else shares, and are chosen
only where they can run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splitserve.layers.packed_linear import PackedLinear, pack_linears, packing_applies

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (300, 64), (2, 3, 64)])
def test_packed_linear_equals_torch_linear(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias)
    x = torch.randn(*shape)
    expected = linear(x)
    got = PackedLinear(linear)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.inner = nn.Sequential(nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 16, bias=False))
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight


@needs_onednn
def test_every_unshared_linear_is_packed_and_a_tied_head_is_left_alone():
    model = _Tied()
    x = torch.randn(3, 16)
    before = model.head(model.inner(x))
    assert pack_linears(model) == 2
    assert isinstance(model.inner[0], PackedLinear) and isinstance(model.inner[2], PackedLinear)
    assert isinstance(model.head, nn.Linear) and model.head.weight is model.embed.weight
    torch.testing.assert_close(model.head(model.inner(x)), before, rtol=1e-5, atol=1e-5)


def test_packing_is_chosen_only_where_it_runs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    onednn = torch.backends.mkldnn.is_available()
    assert packing_applies(cpu, torch.float32) is onednn
    assert not packing_applies(cpu, torch.bfloat16)
    assert not packing_applies(cuda, torch.float32)
    assert not packing_applies(cpu, torch.float32, "torch")
    with pytest.raises(ValueError, match="CPU float32"):
        packing_applies(cuda, torch.float32, "packed")
    with pytest.raises(ValueError, match="unknown linear backend"):
        packing_applies(cpu, torch.float32, "fast")
