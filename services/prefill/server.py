"""`splitserve prefill`: the prompt-processing worker (compute GPUs in production)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from splitserve.v1 import prefill_pb2_grpc
from splitserve.serving.engine_worker import EngineWorkerSettings, run_engine_worker
from splitserve.serving.logs import setup_logging
from splitserve.serving.settings import log_settings, parse_settings
from splitserve.services.prefill.servicer import PrefillServicer


@dataclass
class PrefillSettings(EngineWorkerSettings):
    port: int = 50061


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(PrefillSettings, argv, prog="splitserve prefill")
    setup_logging("prefill", settings.log_level)
    log_settings("prefill", settings)

    def add_servicer(service, engine, transport, identity) -> None:
        servicer = PrefillServicer(engine, transport, settings.kv_store_address, settings.kv_timeout_s,
                                   identity, lambda: service.draining)
        prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, service.server)

    return asyncio.run(run_engine_worker(settings, "prefill", "splitserve.v1.Prefill", add_servicer))
