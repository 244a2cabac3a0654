"""The loader fills our fused projections from a checkpoint's separate q/k/v and gate/up weights, once."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from splitserve.models.loader import ModelLoadError, load_model, read_model_files


def _checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def _load(path):
    return load_model(read_model_files(str(path)), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fused_projections_hold_the_checkpoint_weights_once(arch, tiny_ckpts):
    ckpt = _checkpoint_tensors(tiny_ckpts[arch])
    model = _load(tiny_ckpts[arch])
    params = dict(model.named_parameters())
    kinds = ["weight", "bias"] if arch == "qwen2" else ["weight"]  # qwen2's q/k/v have biases
    for layer in range(model.args.num_layers):
        prefix = f"model.layers.{layer}"
        for kind in kinds:
            expected = torch.cat([ckpt[f"{prefix}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
            assert torch.equal(params[f"{prefix}.self_attn.qkv_proj.{kind}"], expected)
        expected = torch.cat([ckpt[f"{prefix}.mlp.{p}_proj.weight"] for p in ("gate", "up")])
        assert torch.equal(params[f"{prefix}.mlp.gate_up_proj.weight"], expected)
    # No separate copy stays behind: the model holds as many numbers as the checkpoint.
    assert sum(p.numel() for p in params.values()) == sum(t.numel() for t in ckpt.values())
    assert not any(name.endswith(("q_proj.weight", "gate_proj.weight")) for name in params)


def _rewritten(src, dst, edit) -> str:
    shutil.copytree(src, dst)
    tensors = _checkpoint_tensors(dst)
    edit(tensors)
    for file in dst.glob("*.safetensors"):
        file.unlink()
    save_file(tensors, str(dst / "model.safetensors"))
    return str(dst)


def test_a_missing_part_of_a_fused_projection_is_named(llama_ckpt, tmp_path):
    path = _rewritten(llama_ckpt, tmp_path / "ckpt", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing weights: model\.layers\.1\.self_attn\.k_proj\.weight"):
        _load(path)


def test_a_part_of_the_wrong_shape_is_named(llama_ckpt, tmp_path):
    def widen(tensors):
        name = "model.layers.0.mlp.up_proj.weight"
        tensors[name] = torch.cat([tensors[name], tensors[name][:1]])

    path = _rewritten(llama_ckpt, tmp_path / "ckpt", widen)
    with pytest.raises(ModelLoadError, match=r"weight model\.layers\.0\.mlp\.up_proj\.weight has shape"):
        _load(path)
