"""How many KV blocks an engine gets: from num_kv_blocks, else from a memory budget (the setting, else a default),
never more than every running sequence could fill.

Pure arithmetic (the engine measures free memory and passes it in), so the sizing is tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from splitserve.byte_size import format_bytes
from splitserve.config import EngineConfig

# 2 GiB holds ~32k tokens of a 1B Llama in float32 (64 KiB per token): the default 64 running sequences at 512
# tokens each. The two engines of a default stack then hold at most 4 GiB together, vLLM's CPU default for its one
# engine; and since pages are taken only as blocks are first written, an idle engine holds almost none of it.
DEFAULT_CPU_KV_CACHE_BYTES = 2 * 2**30


@dataclass(frozen=True)
class KVCacheSize:
    num_blocks: int
    block_size: int
    bytes_per_block: int
    source: str  # where the size came from, for the start-up log

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def describe(self) -> str:
        return (f"{self.num_blocks} blocks of {self.block_size} tokens = {self.num_tokens} tokens, "
                f"{format_bytes(self.nbytes)} ({self.source})")


def default_cpu_budget(available_bytes: int) -> tuple[int, str]:
    """The CPU default: DEFAULT_CPU_KV_CACHE_BYTES, or a quarter of available memory on a small machine."""
    if available_bytes // 4 < DEFAULT_CPU_KV_CACHE_BYTES:
        return available_bytes // 4, f"a quarter of the {format_bytes(available_bytes)} available"
    return DEFAULT_CPU_KV_CACHE_BYTES, f"the CPU default {format_bytes(DEFAULT_CPU_KV_CACHE_BYTES)}"


def size_kv_cache(config: EngineConfig, bytes_per_block: int, max_model_len: int,
                  default_budget: Callable[[], tuple[int, str]]) -> KVCacheSize:
    """`default_budget()` -> (bytes, why) is asked only when neither num_kv_blocks nor kv_cache_memory_bytes is
    set. RuntimeError when the budget holds no block at all."""
    if config.num_kv_blocks is not None:
        return KVCacheSize(config.num_kv_blocks, config.block_size, bytes_per_block, "num_kv_blocks")
    budget: Optional[int] = config.kv_cache_memory_bytes
    if budget is not None:
        why = f"kv_cache_memory_bytes {format_bytes(budget)}"
    else:
        budget, why = default_budget()
    blocks = budget // bytes_per_block
    if blocks < 1:
        raise RuntimeError(f"no memory left for the KV cache (budget {budget} bytes, {bytes_per_block} per block)")
    # More blocks than every sequence could ever fill would only waste memory.
    useful = config.max_num_seqs * -(-max_model_len // config.block_size) + 1
    if blocks > useful:
        blocks, why = useful, f"{why}, cut to what {config.max_num_seqs} sequences of {max_model_len} tokens fill"
    return KVCacheSize(int(blocks), config.block_size, bytes_per_block, why)
