"""KV transfer metrics of the engine workers (the kv-store counts its own side separately)."""

from prometheus_client import Counter

from splitserve.rate_meter import RateMeter

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


# Bytes/s of this process's block writes to a kv-store, announced to Redis: a prefill's write is on its request's
# path to the first token, which the gateway weighs against prefilling on the decode worker. Writes only: a
# mapped read is timed in two parts (its RPCs here, its copy in transport.py), so its rate here would be too high.
# Writes of fewer blocks than a long prompt's are not observed: their time is the write's fixed cost (RPCs, a first
# write's connection setup), and a prefill worker's announced rate measured from warm-up writes of 4 blocks read
# 9 MB/s, which kept every prompt off it and so was never corrected.
MIN_MEASURED_PUT_BLOCKS = 16
KV_PUT_RATE = RateMeter()


def record_transfer(direction: str, seconds: float, nbytes: int, nblocks: int) -> None:
    if direction == "put" and nblocks >= MIN_MEASURED_PUT_BLOCKS:
        KV_PUT_RATE.observe(nbytes, seconds)
    KV_TRANSFER_SECONDS.labels(direction).inc(seconds)
    KV_TRANSFER_BYTES.labels(direction).inc(nbytes)
    KV_TRANSFER_BLOCKS.labels(direction).inc(nblocks)
