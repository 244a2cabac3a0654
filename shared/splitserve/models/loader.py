"""From a hub id or a folder to a loaded model: resolve files, read the HF config, build our module, load weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from splitserve.models.llama import LlamaArgs, LlamaForCausalLM


class UnsupportedModelError(ValueError):
    pass


class ModelLoadError(RuntimeError):
    pass


# model_type -> switches on top of the plain Llama block
_LLAMA_FAMILY: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True, "o_bias": False},
    "qwen3": {"qk_norm": True},
    "granite": {},
}
SUPPORTED_ARCHITECTURES = sorted(_LLAMA_FAMILY)


@dataclass
class ModelFiles:
    path: Path
    config: dict[str, Any]
    generation_config: dict[str, Any]


def resolve_model(model: str, revision: Optional[str] = None) -> Path:
    """A local folder is used as is; anything else is a hub id, fetched (or found in the HF cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{model} is a file; pass the checkpoint's folder or a hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                model,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:  # hub errors come in many classes; the user needs the model name and the cause
        raise ModelLoadError(f"could not find model {model!r} as a local folder or on the hub: {exc}") from exc


def read_model_files(model: str) -> ModelFiles:
    path = resolve_model(model)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
    config = json.loads(config_path.read_text())
    gen_path = path / "generation_config.json"
    generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return ModelFiles(path=path, config=config, generation_config=generation_config)


def llama_args_from_config(config: dict[str, Any]) -> LlamaArgs:
    model_type = config.get("model_type")
    if model_type not in _LLAMA_FAMILY:
        arch = ", ".join(config.get("architectures") or []) or "unknown"
        raise UnsupportedModelError(
            f"unsupported architecture {arch} (model_type={model_type!r}); supported model types: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    switches = _LLAMA_FAMILY[model_type]
    if config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {config['hidden_act']!r} is not supported (silu is)")
    if config.get("sliding_window") and config.get("use_sliding_window", model_type == "mistral"):
        raise UnsupportedModelError("sliding-window attention is not supported yet")
    num_heads = config["num_attention_heads"]
    # transformers 5 moved rope settings into rope_parameters; 4.x checkpoints keep rope_theta/rope_scaling.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or None
    attention_bias = bool(config.get("attention_bias", False))
    return LlamaArgs(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position=config.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=switches.get("qkv_bias", attention_bias),
        o_bias=switches.get("o_bias", attention_bias),
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=switches.get("qk_norm", False),
        embedding_multiplier=float(config.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(config.get("residual_multiplier", 1.0)),
        attention_multiplier=config.get("attention_multiplier"),
        logits_scaling=float(config.get("logits_scaling", 1.0)),
    )


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no .safetensors weights (only safetensors checkpoints are supported)")
    return files


def load_model(files: ModelFiles, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    args = llama_args_from_config(files.config)
    # Built on the meta device so that no time or memory goes to random init of weights we overwrite anyway.
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    model = model.to(dtype).to_empty(device=device)
    params = dict(model.named_parameters())
    slices = model.checkpoint_slices()
    loaded: set[str] = set()
    for file in safetensors_files(files.path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in slices:
                    if "rotary_emb" in name:
                        continue
                    raise ModelLoadError(f"unexpected weight {name!r} in {file.name} for {files.config.get('model_type')}")
                tensor = f.get_tensor(name)
                param_name, rows = slices[name]
                target = params[param_name][rows]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ModelLoadError(f"weight {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(tensor.to(dtype))
                loaded.add(name)
    if args.tie_word_embeddings:
        loaded.add("lm_head.weight")
        model.tie_weights()
    missing = sorted(set(slices) - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint is missing weights: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
    model.rotary.build_cache(device, dtype)
    return model.eval()
