"""The Llama family as plain torch modules over a flattened batch: Llama, Mistral, Qwen2, Qwen3, Granite.

Parameter names mirror Hugging Face's, so a checkpoint's state dict loads without renaming, except that q/k/v and
gate/up are fused into one projection each (`checkpoint_slices` says where each checkpoint weight goes): a decode
step then runs two GEMMs where it ran five (packed oneDNN, 4 rows: qkv 87 -> 51 us). The variants differ only
in a few switches (qkv bias, per-head q/k norm, Granite's multipliers), read from the HF config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.layers.attention import AttentionMetadata
from splitserve.layers.rotary import RotaryEmbedding


@dataclass
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict[str, Any]]
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    hidden_act: str = "silu"
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: Optional[float] = None
    logits_scaling: float = 1.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 then cast back, as transformers does, so low-precision runs agree with it.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.scale = args.attention_multiplier if args.attention_multiplier is not None else args.head_dim**-0.5
        self.q_size, self.kv_size = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, positions, rotary: RotaryEmbedding, kv_cache, meta: AttentionMetadata, backend):
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.residual_multiplier = args.residual_multiplier

    def forward(self, x, positions, rotary, kv_cache, meta, backend):
        h = self.self_attn(self.input_layernorm(x), positions, rotary, kv_cache, meta, backend)
        x = x + h * self.residual_multiplier if self.residual_multiplier != 1.0 else x + h
        h = self.mlp(self.post_attention_layernorm(x))
        return x + h * self.residual_multiplier if self.residual_multiplier != 1.0 else x + h


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.embedding_multiplier = args.embedding_multiplier


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling, args.max_position)

    def checkpoint_slices(self) -> dict[str, tuple[str, slice]]:
        """Each weight a Hugging Face checkpoint holds -> (our parameter, its rows that weight fills)."""
        a = self.args
        q, kv, inter = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.intermediate_size
        parts = {"qkv_proj": (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)),
                 "gate_up_proj": (("gate_proj", 0, inter), ("up_proj", inter, 2 * inter))}
        slices = {}
        for name, _ in self.named_parameters():
            module, _, kind = name.rpartition(".")
            owner, _, leaf = module.rpartition(".")
            if leaf in parts:
                for part, start, stop in parts[leaf]:
                    slices[f"{owner}.{part}.{kind}"] = (name, slice(start, stop))
            else:
                slices[name] = (name, slice(None))
        return slices

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, kv_caches: list[torch.Tensor], meta: AttentionMetadata, backend):
        x = self.model.embed_tokens(input_ids)
        if self.model.embedding_multiplier != 1.0:
            x = x * self.model.embedding_multiplier
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x = layer(x, positions, self.rotary, kv_cache, meta, backend)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.args.logits_scaling != 1.0:
            logits = logits / self.args.logits_scaling
        return logits
