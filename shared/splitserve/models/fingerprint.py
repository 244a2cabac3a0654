"""A checkpoint's KV identity: the name every block hash carries, so KV of one model is never served for another.

It covers everything that changes what a block's KV holds: the config (architecture, rope scaling, ...), the
full content of every weight file, the dtype the KV is kept in and the block size. A kv-store outlives its
workers, so a checkpoint replaced under the same folder name — even one that differs only in the middle of a
weight file — must get a new fingerprint, hence a digest of every byte rather than of sizes or a file's ends.

SHA-256 runs at ~1.8 GB/s on one core here, ~9 s for a 16 GB checkpoint, so each file's digest is cached under
the user's cache folder, keyed by what changes whenever the file's bytes change (device, inode, size, mtime and
ctime in ns: ctime cannot be set back by a user, so a rewrite that restores mtime still misses the cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from prometheus_client import Counter

from splitserve.models.loader import ModelFiles, safetensors_files

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "SPLITSERVE_CACHE_DIR"
_CACHE_FILE = "weight-digests.json"
_READ_BYTES = 16 << 20  # hashlib releases the GIL for updates this large: shards hash in parallel threads

DIGEST_CACHE_FAILURES = Counter("splitserve_weight_digest_cache_failures_total",
                                "Weight digest cache reads/writes that failed (start-up hashes every file)", ["op"])


def model_fingerprint(files: ModelFiles, dtype: str, block_size: int, cache_dir: Optional[Path] = None) -> str:
    """`<folder name>@<16 hex>` over the config, every weight file's content digest, the KV dtype (as
    "float32", "bfloat16", ...) and the block size."""
    digest = hashlib.sha256()
    digest.update(json.dumps(files.config, sort_keys=True).encode())
    digest.update(f"|dtype={dtype}|block_size={block_size}".encode())
    weights = safetensors_files(files.path)
    for file, content in zip(weights, WeightDigests(cache_dir).digests(weights)):
        digest.update(f"|{file.name}:{content}".encode())
    name = os.path.basename(str(files.path).rstrip("/")) or "model"
    return f"{name}@{digest.hexdigest()[:16]}"


def default_cache_dir() -> Path:
    """SPLITSERVE_CACHE_DIR, else $XDG_CACHE_HOME/splitserve, else ~/.cache/splitserve."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "splitserve"


def file_digest(path: Path) -> str:
    """SHA-256 of a file's whole content, hex."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class WeightDigests:
    """Content digests of weight files, from the cache where a file is unchanged, else by reading it."""

    def __init__(self, cache_dir: Optional[Path] = None):
        self.cache_file = (cache_dir or default_cache_dir()) / _CACHE_FILE
        self.hashed: list[Path] = []  # files read this time (cache misses), for logs and tests

    def digests(self, files: list[Path]) -> list[str]:
        cache = self._load()
        keys = [_stat_key(file) for file in files]
        missing = [(file, key) for file, key in zip(files, keys) if cache.get(key) is None]
        if missing:
            log.info("hashing %d weight files (%.1f GB) for the model fingerprint; cached for later starts",
                     len(missing), sum(file.stat().st_size for file, _ in missing) / 1e9)
            with ThreadPoolExecutor(max_workers=min(len(missing), os.cpu_count() or 1)) as pool:
                computed = list(pool.map(file_digest, [file for file, _ in missing]))
            self.hashed = [file for file, _ in missing]
            fresh = {key: value for (_, key), value in zip(missing, computed)}
            cache.update(fresh)
            self._store(fresh)
        return [cache[key] for key in keys]

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.cache_file.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            DIGEST_CACHE_FAILURES.labels("read").inc()
            log.warning("weight digest cache %s unreadable (%s): hashing every weight file", self.cache_file, exc)
            return {}

    def _store(self, fresh: dict[str, str]) -> None:
        """Merges into what is on disk now (another worker may have written meanwhile), replaced atomically;
        entries of the same files' earlier versions are dropped, so the file grows only with new paths."""
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            paths = {key.split("|", 1)[0] for key in fresh}
            merged = {key: value for key, value in self._load().items() if key.split("|", 1)[0] not in paths}
            merged.update(fresh)
            fd, tmp = tempfile.mkstemp(dir=self.cache_file.parent, prefix=".weight-digests-")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(merged, f)
                os.replace(tmp, self.cache_file)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            DIGEST_CACHE_FAILURES.labels("write").inc()
            log.warning("could not write weight digest cache %s (%s): the next start hashes again",
                        self.cache_file, exc)


def _stat_key(file: Path) -> str:
    st = os.stat(file)
    return f"{os.path.realpath(file)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
