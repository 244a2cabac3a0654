"""The engine's settings, declared once: the offline LLM takes them as keyword arguments, and the prefill/decode
workers' settings and the launcher's extend this dataclass, so each setting has one name, default, check and help.

Torch-free: the launcher reads it without loading torch; the engine resolves "auto" device and dtype itself.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from splitserve.setting import setting
from splitserve.byte_size import ByteSize

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class EngineConfig:
    model: Optional[str] = setting(None,
        "hub id or checkpoint folder (the services default to the tiny offline demo model)")
    tokenizer: Optional[str] = setting(None, "tokenizer folder (default: the model's)")
    dtype: str = setting("auto", "engine dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, float16, bfloat16")
    device: str = setting("auto", "engine device: auto, cpu, cuda, cuda:1 ...")
    block_size: int = setting(16, "tokens per KV block (a power of two)")
    num_kv_blocks: Optional[int] = setting(None, "KV cache blocks (default: from the memory budget)")
    kv_cache_memory_bytes: Optional[ByteSize] = setting(None,
        "KV cache budget per engine, e.g. 2GiB, 512MiB, 1.5GB or bytes (default on CPU: 2 GiB, ~32k tokens of a 1B "
        "Llama in float32, or a quarter of available memory if less; on GPU: what gpu_memory_utilization leaves). "
        "Pages are taken as blocks are first written, so an idle engine holds little of it")
    gpu_memory_utilization: float = setting(0.9, "share of GPU memory the engine may use")
    max_num_seqs: int = setting(64, "max running sequences")
    max_num_batched_tokens: int = setting(2048, "token budget per engine step")
    max_model_len: Optional[int] = setting(None, "context length (default: the model's)")
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    attention_backend: str = setting("auto",
        "attention kernels: auto, torch, torch-compile (CPU decode compiled by Inductor), triton")
    linear_backend: str = setting("auto",
        "linear layers: auto (weights packed for oneDNN on a float32 CPU engine), packed, torch")
    seed: int = setting(0, "seed of the engine's default random generator")

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None:
            self.kv_cache_memory_bytes = ByteSize(self.kv_cache_memory_bytes)
            if self.kv_cache_memory_bytes < 1:
                raise ValueError(f"kv_cache_memory_bytes must be >= 1 byte, got {self.kv_cache_memory_bytes}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")

    def engine_config(self, **changes) -> "EngineConfig":
        """The engine's part of settings that extend this class (a worker's, the launcher's), with `changes`."""
        values = {f.name: getattr(self, f.name) for f in fields(EngineConfig)}
        return EngineConfig(**{**values, **changes})

    def changed_engine_values(self) -> dict:
        """The engine settings that differ from their defaults: what a launcher passes on to a worker."""
        return {f.name: getattr(self, f.name) for f in fields(EngineConfig)
                if getattr(self, f.name) != f.default}
