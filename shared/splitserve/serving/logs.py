"""One log format for every service, with the service name, so interleaved process logs stay readable."""

from __future__ import annotations

import logging


def setup_logging(service: str, level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(),
                        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s", force=True)
    # grpc and httpx log every call at INFO; keep service logs about the service.
    for noisy in ("httpx", "grpc._cython"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
