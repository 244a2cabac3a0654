"""Shared pytest fixtures."""

import os

import pytest
import torch

# Triton kernels run under the interpreter where there is no GPU. Set before any test module is imported: triton
# reads it when it is first imported, and collecting a module that compiles with torch (Inductor) can import
# triton long before tests/kernels is collected (its standard library is then compiled-only, and every
# interpreted kernel fails with "Cannot call @triton.jit'd outside of the scope of a kernel").
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from splitserve.demo_model import build_checkpoint  # noqa: E402
from store_process import StoreProcess

# Larger init than HF's 0.02 so greedy tokens from two implementations are not
# decided by float noise between near-equal logits.
_INIT_RANGE = 0.1

# Tiny checkpoints by architecture: build_checkpoint's settings for each (the rest are its defaults).
_TINY = {
    "llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, tie_word_embeddings=False),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                  tie_word_embeddings=False),
}


def _tiny(tmp_path_factory, folder: str, arch: str, **extra):
    return build_checkpoint(tmp_path_factory.mktemp(folder), arch, initializer_range=_INIT_RANGE, **_TINY[arch],
                            **extra)


@pytest.fixture(scope="session", autouse=True)
def weight_digest_cache(tmp_path_factory):
    """Model fingerprints cache weight digests under the user's cache folder: not the tests' temporary models
    (set in os.environ so the stack's processes use the same folder)."""
    old = os.environ.get("SPLITSERVE_CACHE_DIR")
    os.environ["SPLITSERVE_CACHE_DIR"] = str(tmp_path_factory.mktemp("splitserve-cache"))
    yield
    if old is None:
        os.environ.pop("SPLITSERVE_CACHE_DIR", None)
    else:
        os.environ["SPLITSERVE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory):
    """Llama with GQA (4 heads / 2 kv heads) and an untied lm_head."""
    return _tiny(tmp_path_factory, "llama", "llama")


@pytest.fixture(scope="session")
def sharded_llama_ckpt(tmp_path_factory):
    """Same weights as ``llama_ckpt``, split over several safetensors shards."""
    return _tiny(tmp_path_factory, "llama-sharded", "llama", max_shard_size="200KB")


@pytest.fixture(scope="session")
def qwen2_ckpt(tmp_path_factory):
    """Qwen2: qkv biases, tied embeddings, GQA."""
    return _tiny(tmp_path_factory, "qwen2", "qwen2")


@pytest.fixture(scope="session")
def qwen3_ckpt(tmp_path_factory):
    """Qwen3: q/k norms, one kv head, head_dim (32) decoupled from hidden/heads (16)."""
    return _tiny(tmp_path_factory, "qwen3", "qwen3")


@pytest.fixture(scope="session")
def tiny_ckpts(llama_ckpt, qwen2_ckpt, qwen3_ckpt):
    return {"llama": llama_ckpt, "qwen2": qwen2_ckpt, "qwen3": qwen3_ckpt}


@pytest.fixture
def start_store(tmp_path):
    """Starts a store of its own for tests that fill it, measure it or stop it."""
    started: list[StoreProcess] = []

    def start(*flags: str, **kwargs) -> StoreProcess:
        started.append(StoreProcess(tmp_path, *flags, **kwargs))
        return started[-1]

    try:
        yield start
    finally:
        for process in started:
            process.stop()
