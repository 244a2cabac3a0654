"""`splitserve decode`: the token-generation worker (continuous batching; cheaper GPUs in production)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from splitserve.v1 import decode_pb2_grpc
from splitserve.serving.engine_worker import EngineWorkerSettings, run_engine_worker
from splitserve.serving.logs import setup_logging
from splitserve.serving.settings import log_settings, parse_settings
from splitserve.services.decode.servicer import DecodeServicer


@dataclass
class DecodeSettings(EngineWorkerSettings):
    port: int = 50062


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(DecodeSettings, argv, prog="splitserve decode")
    setup_logging("decode", settings.log_level)
    log_settings("decode", settings)

    def add_servicer(service, engine, transport, identity) -> None:
        servicer = DecodeServicer(engine, transport, settings.kv_timeout_s, identity,
                                  lambda: service.draining)
        decode_pb2_grpc.add_DecodeServicer_to_server(servicer, service.server)

    return asyncio.run(run_engine_worker(settings, "decode", "splitserve.v1.Decode", add_servicer))
