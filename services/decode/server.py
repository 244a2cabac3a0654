"""`splitserve decode`: the token-generation worker (continuous batching; cheaper GPUs in production)."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.v1 import decode_pb2_grpc
from splitserve.serving.engine_worker import EngineWorkerSettings, engine_worker_main
from splitserve.services.decode.servicer import DecodeServicer


@dataclass
class DecodeSettings(EngineWorkerSettings):
    port: int = 50062


def _add_servicer(settings: DecodeSettings, service, engine, transport, identity) -> None:
    servicer = DecodeServicer(engine, transport, settings.kv_timeout_s, identity,
                              lambda: service.draining)
    decode_pb2_grpc.add_DecodeServicer_to_server(servicer, service.server)


def main(argv: list[str] | None = None) -> int:
    return engine_worker_main("decode", DecodeSettings, "splitserve.v1.Decode", _add_servicer, argv)
