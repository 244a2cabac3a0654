"""The KV cache's size: num_kv_blocks, else a memory budget (the setting in any unit, else the stated default),
never more than every sequence could fill; and on CPU its pages are taken only as blocks are written."""

import logging

import pytest

from splitserve import LLM
from splitserve.config import EngineConfig
from splitserve.engine.kv_budget import DEFAULT_CPU_KV_CACHE_BYTES, default_cpu_budget, size_kv_cache

PER_BLOCK = 2 * 2 * 16 * 2 * 16 * 4  # K and V x 2 layers x 16 tokens x 2 KV heads x head_dim 16 x float32 (llama_ckpt)


def _size(default=(10**12, "default"), max_model_len=1024, **fields):
    return size_kv_cache(EngineConfig(model="m", **fields), PER_BLOCK, max_model_len, lambda: default)


def test_num_kv_blocks_overrides_any_budget():
    size = _size(num_kv_blocks=7, kv_cache_memory_bytes="1GiB")
    assert (size.num_blocks, size.num_tokens, size.nbytes, size.source) == (7, 112, 7 * PER_BLOCK, "num_kv_blocks")


def test_a_budget_in_any_unit_gives_whole_blocks():
    assert _size(kv_cache_memory_bytes="320KiB").num_blocks == 40
    assert _size(kv_cache_memory_bytes=40 * PER_BLOCK + 100).num_blocks == 40
    assert _size(kv_cache_memory_bytes="1M").num_blocks == 2**20 // PER_BLOCK
    assert "kv_cache_memory_bytes 320.0 KiB" in _size(kv_cache_memory_bytes="320KiB").describe()


def test_the_default_budget_is_asked_only_when_none_is_set():
    def never():
        raise AssertionError("asked for the default")

    size_kv_cache(EngineConfig(model="m", kv_cache_memory_bytes="1MiB"), PER_BLOCK, 1024, never)
    assert _size(default=(80 * PER_BLOCK, "the CPU default")).num_blocks == 80


def test_the_cpu_default_is_two_gib_unless_a_quarter_of_memory_is_less():
    assert DEFAULT_CPU_KV_CACHE_BYTES == 2 * 2**30
    assert default_cpu_budget(64 * 2**30)[0] == 2 * 2**30
    budget, why = default_cpu_budget(4 * 2**30)
    assert budget == 2**30 and "a quarter of the 4.0 GiB available" in why


def test_a_budget_beyond_what_every_sequence_can_fill_is_cut():
    size = _size(kv_cache_memory_bytes="16GiB", max_num_seqs=2, max_model_len=64)
    assert size.num_blocks == 2 * (64 // 16) + 1 and "cut to what 2 sequences of 64 tokens fill" in size.source


def test_a_budget_without_room_for_one_block_is_an_error():
    with pytest.raises(RuntimeError, match="no memory left for the KV cache"):
        _size(kv_cache_memory_bytes=PER_BLOCK // 2)


@pytest.mark.parametrize("bad", ["2XB", "lots", 0])
def test_a_bad_budget_is_refused_when_the_config_is_made(bad):
    with pytest.raises(ValueError, match="kv_cache_memory_bytes|not a size"):
        EngineConfig(model="m", kv_cache_memory_bytes=bad)


def test_the_engine_cache_follows_the_budget_and_says_so(llama_ckpt, caplog):
    with caplog.at_level(logging.INFO, logger="splitserve.engine.llm_engine"):
        engine = LLM(str(llama_ckpt), dtype="float32", device="cpu", kv_cache_memory_bytes="320KiB").engine
    assert engine.layout.bytes_per_block == PER_BLOCK and engine.num_blocks == 40
    caches = engine.runner.kv_caches
    assert len(caches) == 2 and all(c.shape[1] == 40 and c.nbytes == 40 * PER_BLOCK // 2 for c in caches)
    assert "KV cache: 40 blocks of 16 tokens = 640 tokens, 320.0 KiB (kv_cache_memory_bytes 320.0 KiB)" in caplog.text


def _resident_bytes(address: int) -> tuple[int, int]:
    """(size, resident bytes) of this process's mapping that holds `address`, from /proc/self/smaps."""
    size = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(x, 16) for x in head.split("-"))
                size = end - start if start <= address < end else None
            elif size is not None and head == "Rss:":
                return size, int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def test_an_idle_engine_holds_no_ram_for_kv_blocks_it_has_not_written(llama_ckpt):
    """torch.zeros wrote every page of the cache at start, so an idle worker held its whole budget; the cache now
    reads as zeros but takes a page only once a block is written."""
    llm = LLM(str(llama_ckpt), dtype="float32", device="cpu", kv_cache_memory_bytes="512MiB", max_num_seqs=2048)
    caches = llm.engine.runner.kv_caches
    assert llm.engine.num_blocks == 512 * 2**20 // PER_BLOCK
    size, resident = _resident_bytes(caches[0].data_ptr())
    assert size >= 512 * 2**20 and resident < size // 16
    assert float(caches[0].abs().max()) == 0.0 == float(caches[-1][:, -1].abs().max())  # reads as zeros
    from splitserve import SamplingParams

    [out] = llm.generate(["hello there"], SamplingParams(max_tokens=8, temperature=0.0))
    assert len(out.outputs[0].token_ids) == 8
