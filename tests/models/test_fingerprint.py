"""The model fingerprint names every KV block: it must change whenever the KV would, and stay put otherwise."""

from __future__ import annotations

import json
import os

import pytest

from splitserve.models import fingerprint as fp
from splitserve.models.loader import read_model_files

SIZE = 512 << 10  # well over the 2 x 64 KiB a head-and-tail fingerprint would read


@pytest.fixture
def ckpt(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    config = {"model_type": "llama", "hidden_size": 64, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(os.urandom(SIZE))
    return folder


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


def _fingerprint(folder, cache_dir, dtype="float32", block_size=16):
    return fp.model_fingerprint(read_model_files(str(folder)), dtype, block_size, cache_dir=cache_dir)


def test_stable_across_calls_and_named_after_the_folder(ckpt, cache_dir):
    first = _fingerprint(ckpt, cache_dir)
    assert first == _fingerprint(ckpt, cache_dir) == _fingerprint(ckpt, cache_dir / "elsewhere")
    assert first.startswith("model@")


def test_middle_bytes_change_with_same_size_head_tail_and_mtime(ckpt, cache_dir):
    before = _fingerprint(ckpt, cache_dir)
    weights = ckpt / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(SIZE // 2)
        middle = f.read(8)
        f.seek(SIZE // 2)
        f.write(bytes(b ^ 0xFF for b in middle))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even a rewrite that restores the mtime
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert _fingerprint(ckpt, cache_dir) != before


def test_same_folder_name_other_checkpoint(tmp_path, ckpt, cache_dir):
    other = tmp_path / "other" / "model"
    other.mkdir(parents=True)
    (other / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[SIZE // 2] ^= 1
    (other / "model.safetensors").write_bytes(bytes(data))
    assert _fingerprint(other, cache_dir) != _fingerprint(ckpt, cache_dir)


def test_everything_that_changes_the_kv_changes_it(ckpt, cache_dir):
    base = _fingerprint(ckpt, cache_dir)
    assert _fingerprint(ckpt, cache_dir, dtype="bfloat16") != base
    assert _fingerprint(ckpt, cache_dir, block_size=32) != base
    config = json.loads((ckpt / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (ckpt / "config.json").write_text(json.dumps(config))
    assert _fingerprint(ckpt, cache_dir) != base


def test_unchanged_files_are_not_read_again(ckpt, cache_dir, monkeypatch):
    reads = []
    real = fp.file_digest
    monkeypatch.setattr(fp, "file_digest", lambda path: reads.append(path) or real(path))
    first = _fingerprint(ckpt, cache_dir)
    assert len(reads) == 1 and (cache_dir / "weight-digests.json").is_file()
    assert _fingerprint(ckpt, cache_dir) == first
    assert len(reads) == 1  # the second start took the digest from the cache
    (ckpt / "model.safetensors").write_bytes(os.urandom(SIZE))
    assert _fingerprint(ckpt, cache_dir) != first
    assert len(reads) == 2
    entries = json.loads((cache_dir / "weight-digests.json").read_text())
    assert len(entries) == 1  # the file's earlier version was dropped from the cache


def test_unwritable_cache_still_fingerprints(ckpt, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    assert _fingerprint(ckpt, blocker) == _fingerprint(ckpt, tmp_path / "cache")


def test_sharded_checkpoint_hashes_every_shard(sharded_llama_ckpt, llama_ckpt, cache_dir):
    shards = sorted(sharded_llama_ckpt.glob("*.safetensors"))
    assert len(shards) > 1
    assert _fingerprint(sharded_llama_ckpt, cache_dir) != _fingerprint(llama_ckpt, cache_dir)


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.delenv(fp.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fp.default_cache_dir() == tmp_path / "splitserve"
    monkeypatch.setenv(fp.CACHE_DIR_ENV, str(tmp_path / "x"))
    assert fp.default_cache_dir() == tmp_path / "x"
