"""HTTP responses that stop working for a client the moment it goes away.

A client that disconnects must cancel its decode stream at once (its KV blocks are freed then), not when the
next token fails to write; so each response races its work against the ASGI `http.disconnect` message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from splitserve.services.gateway.errors import ShutdownError
from splitserve.services.gateway.race import first_of

T = TypeVar("T")
log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    pass


def sse_event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _race(task: asyncio.Future, receive: Receive, abort: asyncio.Event) -> bool:
    """Waits until `task` ends, the client disconnects or `abort` is set (race.first_of: `task` is done however this
    returns). Returns whether the client went away."""
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    await first_of(task, watcher, asyncio.ensure_future(abort.wait()))
    return watcher.done() and not watcher.cancelled()


async def run_for_client(request: Request, work: Awaitable[T], abort: asyncio.Event) -> T:
    """Runs `work` (the request body already read). Cancels it and raises ClientDisconnected if the client
    goes away first, or ShutdownError if `abort` is set first (the gateway gave up waiting for it)."""
    task = asyncio.ensure_future(work)
    client_left = await _race(task, request.receive, abort)
    if not task.cancelled():
        return task.result()
    raise ClientDisconnected() if client_left else ShutdownError()


class EventStreamResponse(StreamingResponse):
    """Server-sent events from an async iterator of ready `data: ...` strings. The iterator is closed (and
    `on_close` called) whether it ran out, failed, or the client left. If `abort` is set first, the stream
    ends with `abort_text` (an error event) instead of just breaking off."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None], abort: asyncio.Event,
                 abort_text: str):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.on_close = on_close
        self.abort = abort
        self.abort_text = abort_text

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def start() -> None:
            nonlocal started
            started = True
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

        async def stream() -> None:
            await start()
            async for data in self.events:
                await send({"type": "http.response.body", "body": data.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        streamer = asyncio.ensure_future(stream())
        client_left = False
        try:
            client_left = await _race(streamer, receive, self.abort)
        finally:
            if streamer.done() and not streamer.cancelled() and streamer.exception() is not None:
                log.error("event stream failed", exc_info=streamer.exception())
            try:
                await self.events.aclose()
                if streamer.cancelled() and self.abort.is_set() and not client_left:
                    await self._end_with(self.abort_text, send, started, start)
            finally:
                self.on_close()

    @staticmethod
    async def _end_with(text: str, send: Send, started: bool, start: Callable[[], Awaitable[None]]) -> None:
        try:
            if not started:
                await start()
            await send({"type": "http.response.body", "body": text.encode("utf-8"), "more_body": False})
        except OSError:
            pass  # the client left meanwhile
