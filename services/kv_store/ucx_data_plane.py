"""The kv-store's UCX data plane: a worker engines connect to, and slabs they read and write directly.

The store is passive: engines Reserve/Pin over gRPC, get each slot's (address, rkey), move the bytes
themselves, then Commit/Release. So this module only (1) allocates every slab through UCX (ucp_mem_map with
ALLOCATE: System V shared memory first, per UCX_ALLOC_PRIO), which engines on the same host map and copy into
with plain memcpy (measured ~memcpy speed, docs/kv-transport.md), while remote engines use RMA put/get; and
(2) progresses the worker from the asyncio loop, woken by its event fd, because endpoint wire-up, keepalives
and put/get over tcp are served by the target's progress. One thread touches the worker: the loop's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from splitserve.kv_transfer import ucx_rma
from splitserve.v1 import kv_store_pb2
from splitserve.services.kv_store import metrics
from splitserve.services.kv_store.slot_pool import Slab, anonymous_slab

log = logging.getLogger(__name__)

IDLE_PROGRESS_S = 0.05  # bounds how late an event the event fd did not report (ucxx's BlockingMode does the same)


class UcxDataPlane:
    def __init__(self):
        self.context = ucx_rma.new_context()
        self.worker = ucx_rma.ucx_api.UCXWorker(self.context)
        self.worker.init_blocking_progress_mode()
        self.endpoint = kv_store_pb2.DataPlaneEndpoint(transport="ucx",
                                                       worker_address=self.worker.address.tobytes())
        self._registrations: list[ucx_rma.Registration] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ticker: Optional[asyncio.Task] = None

    def allocate_slab(self, nbytes: int) -> Slab:
        """A slab in registered memory (the BlockStore's slab allocator): UCX-allocated so that peers on this
        host can map it; if UCX cannot allocate it, a private mapping registered for RMA (counted, logged)."""
        private = None
        try:
            registration = ucx_rma.Registration(self.context, nbytes)
        except ucx_rma.UcxError as exc:
            log.warning("UCX could not allocate a %d-byte slab (%s): registering private memory instead; engines "
                        "will move its blocks by RMA, not by direct copy", nbytes, exc)
            private = anonymous_slab(nbytes)
            registration = ucx_rma.Registration(self.context, nbytes, private.address)
        memory = "private" if private else "ucx"
        metrics.SLABS.labels(memory).inc()
        self._registrations.append(registration)
        log.info("slab of %d bytes at %#x registered with UCX (%s memory, packed rkey %d bytes)",
                 registration.length, registration.address, memory, len(registration.packed_rkey))
        return Slab(registration.memoryview(), registration.address, registration.packed_rkey,
                    owner=(registration, private))

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.worker.epoll_file_descriptor, self._progress)
        self._ticker = self._loop.create_task(self._tick())
        self._progress()
        log.info("UCX data plane up: worker address %d bytes", len(self.endpoint.worker_address))

    async def stop(self) -> None:
        """Stops progressing; the slabs stay mapped until the process exits (blocks may still be read)."""
        if self._loop is not None:
            self._loop.remove_reader(self.worker.epoll_file_descriptor)
            self._loop = None
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def _progress(self) -> None:
        """Progress until idle, then arm the event fd; a busy arm means more work arrived, so go again."""
        while True:
            while ucx_rma.progress(self.worker):
                pass
            if self.worker.arm():
                return

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(IDLE_PROGRESS_S)
            self._progress()
