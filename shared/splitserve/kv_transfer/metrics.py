"""KV transfer metrics of the engine workers (the kv-store counts its own side separately)."""

from prometheus_client import Counter

KV_TRANSFER_BYTES = Counter("splitserve_kv_transfer_bytes_total", "KV bytes moved to/from a kv-store",
                            ["direction"])
KV_TRANSFER_SECONDS = Counter("splitserve_kv_transfer_seconds_total", "Seconds spent moving KV blocks",
                              ["direction"])
KV_TRANSFER_BLOCKS = Counter("splitserve_kv_transfer_blocks_total", "KV blocks moved", ["direction"])
KV_TRANSFER_FAILURES = Counter("splitserve_kv_transfer_failures_total", "KV transfers that failed",
                               ["direction", "reason"])
KV_UCX_BLOCKS = Counter("splitserve_kv_transfer_ucx_blocks_total",
                        "KV blocks moved over UCX, by path: mapped (copied through UCX-mapped shared memory) or "
                        "rma (UCX put/get, e.g. over tcp between hosts)", ["direction", "path"])
KV_TRANSPORT_FALLBACKS = Counter("splitserve_kv_transfer_fallbacks_total",
                                 "Transfers a UCX transport sent over gRPC streams instead, by reason", ["reason"])


def record_transfer(direction: str, seconds: float, nbytes: int, nblocks: int) -> None:
    KV_TRANSFER_SECONDS.labels(direction).inc(seconds)
    KV_TRANSFER_BYTES.labels(direction).inc(nbytes)
    KV_TRANSFER_BLOCKS.labels(direction).inc(nblocks)
