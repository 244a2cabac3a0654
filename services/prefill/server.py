"""`splitserve prefill`: the prompt-processing worker (compute GPUs in production)."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.v1 import prefill_pb2_grpc
from splitserve.serving.engine_worker import EngineWorkerSettings, engine_worker_main
from splitserve.services.prefill.servicer import PrefillServicer


@dataclass
class PrefillSettings(EngineWorkerSettings):
    port: int = 50061


def _add_servicer(settings: PrefillSettings, service, engine, transport, identity) -> None:
    servicer = PrefillServicer(engine, transport, settings.kv_store_address, settings.kv_timeout_s,
                               identity, lambda: service.draining)
    prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, service.server)


def main(argv: list[str] | None = None) -> int:
    return engine_worker_main("prefill", PrefillSettings, "splitserve.v1.Prefill", _add_servicer, argv)
