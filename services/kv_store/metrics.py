"""Prometheus metrics of the kv-store: the pool's state read from the store at scrape time, transfers counted here.

Pool figures come from BlockStore.stats() through a collector rather than being copied into gauges after every
call, so /metrics and the Stats RPC can never disagree.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from splitserve.services.kv_store.block_store import BlockStore

TRANSFER_BYTES = Counter("splitserve_kv_store_transfer_bytes", "Block payload bytes moved over the gRPC data plane",
                         ["direction"])
TRANSFER_SECONDS = Counter("splitserve_kv_store_transfer_seconds", "Time spent in PutBlocks/GetBlocks streams",
                           ["direction"])
TRANSFER_FAILURES = Counter("splitserve_kv_store_transfer_failures",
                            "PutBlocks/GetBlocks streams that failed (refused, torn or cancelled)", ["direction"])
SLABS = Counter("splitserve_kv_store_slabs", "Slabs (one per block size) by memory: ucx (engines on this host "
                "map it) or private (registered for RMA only: UCX could not allocate it)", ["memory"])
UCX_BLOCKS = Counter("splitserve_kv_store_ucx_blocks", "Blocks engines wrote (committed, in) or read (released "
                     "pins, out) through the UCX data plane", ["direction"])
CHECKSUM_FAILURES = Counter("splitserve_kv_store_checksum_failures",
                            "Blocks refused on commit because their bytes did not match the writer's checksum")
DISCARDED_BLOCKS = Counter("splitserve_kv_store_discarded_blocks",
                           "Blocks dropped because a reader found their bytes did not match their checksum")
for _direction in ("in", "out"):  # export zeros from the start so rate() has a baseline
    for _counter in (TRANSFER_BYTES, TRANSFER_SECONDS, TRANSFER_FAILURES, UCX_BLOCKS):
        _counter.labels(direction=_direction)


# The pool figures of BlockStore.stats() exported: (family, metric name, help, field of KVStoreStatsResponse).
POOL_METRICS = (
    (GaugeMetricFamily, "splitserve_kv_store_blocks", "Block slots in use (stored plus reserved)", "blocks_used"),
    (GaugeMetricFamily, "splitserve_kv_store_bytes", "Bytes of block slots in use (stored plus reserved)",
     "bytes_used"),
    (GaugeMetricFamily, "splitserve_kv_store_capacity_bytes", "Configured capacity of the block pool",
     "bytes_capacity"),
    (GaugeMetricFamily, "splitserve_kv_store_pinned_blocks", "Blocks pinned by readers or reservations",
     "pinned_blocks"),
    (CounterMetricFamily, "splitserve_kv_store_hits", "Blocks found by Lookup/Pin/GetBlocks", "hits"),
    (CounterMetricFamily, "splitserve_kv_store_misses", "Blocks not found by Lookup/Pin/GetBlocks", "misses"),
    (CounterMetricFamily, "splitserve_kv_store_evictions", "Blocks evicted to make room (LRU)", "evictions"),
    (CounterMetricFamily, "splitserve_kv_store_expired_leases",
     "Pins and reservations dropped because their holder did not release them in time", "expired_leases"),
)


class BlockStoreCollector(Collector):
    def __init__(self, store: BlockStore):
        self.store = store

    def collect(self) -> Iterator[Metric]:
        stats = self.store.stats()
        for family, name, documentation, field in POOL_METRICS:
            yield family(name, documentation, value=getattr(stats, field))


def register_store_metrics(store: BlockStore) -> None:
    REGISTRY.register(BlockStoreCollector(store))
