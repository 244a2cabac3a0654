"""A real `splitserve kv-store` process for tests, and the block data they put into it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import grpc
import torch
from prometheus_client.parser import text_string_to_metric_families

from splitserve.launcher.ports import free_ports
from splitserve.launcher.probe import is_ready
from splitserve.v1 import kv_store_pb2, kv_store_pb2_grpc


class StoreProcess:
    def __init__(self, log_dir: Path, *flags: str, port: Optional[int] = None, env: Optional[dict] = None):
        """`port`: listen there (a restart of an earlier store); `env`: extra environment variables."""
        self.port, self.metrics_port = free_ports(2)
        self.port = port or self.port
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_dir / f"kv-store-{self.port}-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "splitserve.services.cli", "kv-store", "--port", str(self.port),
                 "--metrics-port", str(self.metrics_port), *flags],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        deadline = time.monotonic() + 60
        while not is_ready("grpc", self.address, 0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kv-store did not start:\n{self.log()}")
            time.sleep(0.1)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = kv_store_pb2_grpc.KVStoreStub(self.channel)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stats(self) -> kv_store_pb2.KVStoreStatsResponse:
        return self.stub.Stats(kv_store_pb2.KVStoreStatsRequest(), timeout=5)

    def metrics(self) -> dict[tuple[str, str | None], float]:
        """Samples by (name, direction label or None)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return {(s.name, s.labels.get("direction")): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def kill(self) -> None:
        """SIGKILL: the store dies mid-whatever, as in a crash."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a test may have stopped it
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "channel"):
            self.channel.close()
        return self.proc.returncode


def chain(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i}".encode().ljust(16, b".")[:16] for i in range(n)]


def random_blocks(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
