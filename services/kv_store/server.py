"""`splitserve kv-store`: the host-RAM KV block pool that prefill writes to and decode reads from.

Wires the BlockStore to gRPC (control plane, and the PutBlocks/GetBlocks data plane for tcp clients), to the UCX
data plane (slabs engines read and write directly), Prometheus and health checks. On SIGTERM it refuses new
puts and lets running transfers finish within the grace period.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Optional

from splitserve.setting import setting
from splitserve.byte_size import ByteSize
from splitserve.kv_transfer import KV_TRANSPORTS
from splitserve.v1 import kv_store_pb2, kv_store_pb2_grpc
from splitserve.serving import tracing
from splitserve.serving.grpc_service import GrpcService
from splitserve.serving.logs import setup_logging
from splitserve.serving.settings import log_settings, parse_settings
from splitserve.services.kv_store.block_store import BlockStore
from splitserve.services.kv_store.metrics import register_store_metrics
from splitserve.services.kv_store.servicer import GRPC_ENDPOINT, KVStoreServicer
from splitserve.services.kv_store.slot_pool import anonymous_slab

SERVICE_NAME = kv_store_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name
LEASE_SWEEP_S = 1.0  # expired leases are also dropped by every store call; the sweep covers an idle store
PUBLISH_INTERVAL_S = 0.05  # KV events: a batch per interval, like an engine's per step


@dataclass
class KVStoreSettings:
    """Host-RAM pool of KV blocks shared by prefill and decode workers."""

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(50060, "gRPC port")
    metrics_port: Optional[int] = setting(None, "Prometheus /metrics port (none if unset)")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    grace_s: float = setting(30.0, "seconds running transfers get to finish on SIGTERM")
    capacity_bytes: ByteSize = setting(ByteSize(1 << 30),
        "host RAM for KV blocks, e.g. 1GiB, 512MiB or bytes (pages are taken as blocks are first stored)")
    default_lease_ms: int = setting(30000, "lease of pins and reservations that ask for 0")
    kv_transport: str = setting("ucx", "data plane: ucx (also serves grpc) or grpc/tcp")
    kv_checksum: bool = setting(False,
        "verify each written block against its writer's crc32 (and compute missing ones); costs CPU")
    redis_url: Optional[str] = setting(None,
        "publish which blocks the store holds to the prefix index in this Redis (pass it by env)")
    advertise_address: Optional[str] = setting(None, "address the store's KV events name it by (default host:port)")
    otlp_traces_endpoint: Optional[str] = tracing.endpoint_field()

    def __post_init__(self):
        self.capacity_bytes = ByteSize(self.capacity_bytes)
        if self.capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be >= 1, got {self.capacity_bytes}")
        if self.default_lease_ms < 1:
            raise ValueError(f"default_lease_ms must be >= 1, got {self.default_lease_ms}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport {self.kv_transport!r} is not available; this build supports "
                             f"{', '.join(KV_TRANSPORTS)}")


async def _sweep_leases(store: BlockStore) -> None:
    while True:
        await asyncio.sleep(LEASE_SWEEP_S)
        store.expire()


def _kv_event_publisher(settings: KVStoreSettings, store: BlockStore):
    """Publishes the store's commits and evictions to the Redis prefix index (kv_events), so routers can count
    what a prefill worker would load from here instead of computing."""
    from splitserve.kv_events.events import MEDIUM_HOST_STORE
    from splitserve.kv_events.index import PublisherInfo
    from splitserve.kv_events.publisher import KVEventPublisher

    address = settings.advertise_address or f"{settings.host}:{settings.port}"
    publisher = KVEventPublisher(settings.redis_url, PublisherInfo("kv-store", address, MEDIUM_HOST_STORE, None, None))
    store.changes.record()
    publisher.start()
    return publisher


async def _publish_changes(store: BlockStore, publisher) -> None:
    """The store's changes in one batch per interval: the store runs on this loop, so draining here needs no lock."""
    from splitserve.kv_events.events import MEDIUM_HOST_STORE, events_from_pool

    while True:
        await asyncio.sleep(PUBLISH_INTERVAL_S)
        changes = store.changes.drain()
        if changes:
            publisher.publish(events_from_pool(changes, None, MEDIUM_HOST_STORE))


def _ucx_data_plane():
    """The UCX data plane, or a clear error saying why it cannot run here and what to run instead."""
    try:
        from splitserve.services.kv_store.ucx_data_plane import UcxDataPlane

        return UcxDataPlane()
    except Exception as exc:
        raise SystemExit(f"kv-store: the UCX data plane cannot start: {exc}") from exc


async def serve(settings: KVStoreSettings) -> None:
    data_plane = _ucx_data_plane() if settings.kv_transport == "ucx" else None
    store = BlockStore(settings.capacity_bytes, settings.default_lease_ms / 1000,
                       allocate_slab=data_plane.allocate_slab if data_plane else anonymous_slab)
    register_store_metrics(store)
    svc = GrpcService("kv-store", settings.host, settings.port, settings.metrics_port, [SERVICE_NAME],
                      settings.grace_s)
    servicer = KVStoreServicer(store, is_draining=lambda: svc.draining,
                               endpoint=data_plane.endpoint if data_plane else GRPC_ENDPOINT,
                               verify_checksums=settings.kv_checksum)
    kv_store_pb2_grpc.add_KVStoreServicer_to_server(servicer, svc.server)
    tasks = [asyncio.create_task(_sweep_leases(store))]
    publisher = _kv_event_publisher(settings, store) if settings.redis_url else None
    if publisher is not None:
        tasks.append(asyncio.create_task(_publish_changes(store, publisher)))
    if data_plane:
        data_plane.start()
    try:
        await svc.run(drain=servicer.drain)
    finally:
        for task in tasks:
            task.cancel()
        if publisher is not None:
            await asyncio.to_thread(publisher.stop)
        if data_plane:
            await data_plane.stop()


def main(argv: Optional[list[str]] = None) -> int:
    settings = parse_settings(KVStoreSettings, sys.argv[1:] if argv is None else argv, prog="splitserve kv-store")
    setup_logging("kv-store", settings.log_level)
    log_settings("kv-store", settings)
    tracing.setup_service("kv-store", settings)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
