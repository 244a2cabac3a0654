"""KV transfer metrics of the engine workers (the kv-store counts its own side separately)."""

from prometheus_client import Counter

KV_TRANSFER_BYTES = Counter("splitserve_kv_transfer_bytes_total", "KV bytes moved to/from a kv-store",
                            ["direction"])
KV_TRANSFER_SECONDS = Counter("splitserve_kv_transfer_seconds_total", "Seconds spent moving KV blocks",
                              ["direction"])
KV_TRANSFER_BLOCKS = Counter("splitserve_kv_transfer_blocks_total", "KV blocks moved", ["direction"])
KV_TRANSFER_FAILURES = Counter("splitserve_kv_transfer_failures_total", "KV transfers that failed",
                               ["direction", "reason"])
