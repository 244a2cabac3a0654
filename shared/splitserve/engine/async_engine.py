"""The engine behind a service: one thread runs the step loop, asyncio callers get per-request token streams.

The engine is single-threaded by design (the scheduler alone owns its queues), so every mutation and every
question about its state (adding, aborting, what the prefix cache holds) is a command the loop thread runs
between steps. Results go back to the event loop once per step, as one batch, so a busy engine costs the loop
one wake-up per step rather than per token. The end of each received KV load is posted back the same way
(what RequestStream.kv_loaded waits for).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, TypeVar

from splitserve.engine.kv_connector import KVLoad, ReceivedKV
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.outputs import KVExport
from splitserve.engine.sequence import Sequence
from splitserve.rate_meter import RateMeter
from splitserve.sampling_params import InvalidRequestError, SamplingParams

log = logging.getLogger(__name__)

_IDLE_RETRY_S = 0.05
_MIN_PREFILL_STEP_TOKENS = 64
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The step loop failed; the process should be restarted (health turns NOT_SERVING)."""


@dataclass
class TokenDelta:
    """What one step produced for one sequence (or the end of it)."""

    token_ids: list[int]
    # The text these tokens released (see engine.output_text): never part of a stop string, never half a character.
    text: str = ""
    # Parallel to token_ids when logprobs were asked: (logprob, [(alternative id, logprob), ...]).
    logprobs: Optional[list[tuple[float, list[tuple[int, float]]]]] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error"
    stop_reason: object = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    message: str = ""
    kv_export: Optional[KVExport] = None
    # The tail of `text` released only because the sequence ended here (held-back text, an incomplete character).
    # A prefill worker whose sequence goes on elsewhere leaves it out: the decode worker releases it in time.
    end_text: str = ""
    # On the first delta of a request for prompt_logprobs: one entry per prompt token after the first.
    prompt_logprobs: Optional[list[tuple[float, list[tuple[int, float]]]]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestStream:
    """One request's deltas, in order, until it finishes. Closing it before then (leaving `async with`, or
    close()) aborts the request, so its blocks are freed at once rather than when it would have finished."""

    def __init__(self, engine: "AsyncEngine", request_id: str, kv_rows: Optional[ReceivedKV] = None):
        self.request_id = request_id
        self._engine = engine
        self._queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._finished = False
        self._closed = False
        self._kv_settled = asyncio.Event()
        self._kv_error: Optional[str] = None
        # Event-loop time after which the received rows are no longer readable: waiting longer would be useless.
        self._kv_deadline = math.inf
        if kv_rows is None:
            self._kv_settled.set()
        else:
            self._kv_deadline = asyncio.get_running_loop().time() + kv_rows.seconds_left()

    def deliver(self, delta: TokenDelta) -> None:
        self._queue.put_nowait(delta)
        if delta.finished:
            self.kv_done(None)

    def kv_done(self, error: Optional[str]) -> None:
        if not self._kv_settled.is_set():
            self._kv_error = error
            self._kv_settled.set()

    async def kv_loaded(self) -> Optional[str]:
        """Waits until the engine no longer needs the request's received KV rows, so whatever keeps them readable
        (a kv-store's pin) may end: None when they are in the cache or the request ended first, else why the
        engine computes them instead, including that they stopped being readable before it got to them."""
        left = self._kv_deadline - asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(self._kv_settled.wait(), None if left == math.inf else max(left, 0.0))
        except asyncio.TimeoutError:
            return "the received rows stopped being readable before the request was admitted"
        return self._kv_error

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> TokenDelta:
        if self._finished:
            raise StopAsyncIteration
        delta = await self._queue.get()
        if delta.finished:
            self._finished = True
            self.close()
        return delta

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.kv_done(None)
        if not self._closed:
            self._closed = True
            self._engine._stream_closed(self.request_id, finished=self._finished)


def _engine_attribute(name: str) -> property:
    """A read-only attribute of the wrapped engine that is fixed once the model is loaded: safe from any thread."""
    return property(lambda self: getattr(self.engine, name), doc=f"The engine's {name} (read-only).")


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: deque[Callable[[], None]] = deque()
        self._wake = threading.Condition()
        self._streams: dict[str, RequestStream] = {}
        self._waiting_for_thread: set[asyncio.Future] = set()
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stopping = False
        self.dead: Optional[BaseException] = None
        # Written only by the loop thread, after each step: other threads read stats without racing the scheduler.
        self.stats_snapshot: dict[str, int] = engine.stats()
        # Prompt tokens per second of the steps that computed a real prefill (decode tokens batched with it
        # included: that is the rate a prompt sent here gets); announced to Redis for the gateway's choice of
        # prefill path. Smaller steps (the tail of a prompt whose blocks came from the store, a recomputed token)
        # are ignored: their time is the step's fixed cost, which would read as a rate ten times too low.
        self.prefill_rate = RateMeter(min_amount=_MIN_PREFILL_STEP_TOKENS)
        # Steps per second of the steps that only decoded: a prompt prefilled here joins a step of the running
        # batch, so one such step is the fixed part of its first token's time, which its tokens over the prefill
        # rate miss (the gateway predicted cache hits at 20 ms that took 35-100 ms). Announced as a step's time.
        self.decode_step_rate = RateMeter()
        self._kv_changes_sink: Optional[Callable[[list[tuple[bool, bytes]]], None]] = None
        # Called on the loop thread when the engine has run out of work and the loop is about to sleep (a serving
        # worker tells its neighbours that its cores may be borrowed).
        self.on_idle: Optional[Callable[[], None]] = None
        # Exports lend their blocks (no copy on this loop's thread); a release wakes the loop to take them back.
        engine.lend_exports(lambda: self._submit(engine.reclaim_lent_blocks, None))

    # ---- what callers may read (fixed once the model is loaded) ---------------------------------------------

    config = _engine_attribute("config")
    layout = _engine_attribute("layout")
    model_id = _engine_attribute("model_id")
    max_model_len = _engine_attribute("max_model_len")
    tokenizer = _engine_attribute("tokenizer")
    # Each token's text and real bytes, for logprob entries (a cache safe to read from any thread).
    token_pieces = _engine_attribute("token_pieces")

    def validate_prompt(self, prompt):
        """Raises InvalidRequestError for a prompt the engine would refuse (reads only fixed limits)."""
        return self.engine.validate_prompt(prompt)

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)
        self._fail_waiters(EngineDeadError("the engine stopped"))

    def on_kv_changes(self, sink: Callable[[list[tuple[bool, bytes]]], None]) -> None:
        """Hands `sink` the prefix cache's changes (stored?, hash) once per step, on the engine's thread: it
        must not block (a KV event publisher queues them). Call before start()."""
        self.engine.pool.changes.record()
        self._kv_changes_sink = sink

    @property
    def num_active(self) -> int:
        return len(self._streams)

    async def wait_idle(self) -> None:
        while self._streams:
            await asyncio.sleep(0.05)

    # ---- requests --------------------------------------------------------------------------------------------

    async def cached_prefix_blocks(self, hashes: list[bytes]) -> int:
        """How many leading blocks of `hashes` the prefix cache holds now (asked on the engine's thread)."""
        return await self._on_engine_thread(lambda: self.engine.num_cached_prefix_blocks(hashes))

    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                          produced_token_ids: Optional[list[int]] = None,
                          kv_blocks: Optional[tuple[list[bytes], object]] = None,
                          export_kv: bool = False) -> RequestStream:
        """Queues a request; returns its stream once the engine's thread has taken it.

        `kv_blocks` = (hashes, rows or a ReceivedKV): prompt blocks received from elsewhere, loaded into the cache
        when the request is admitted. Whatever keeps them readable must last until `stream.kv_loaded()` returns.
        Bad input raises InvalidRequestError before anything is queued; a request that fails to start ends its
        stream with finish_reason "error".
        """
        if self.dead is not None:
            raise EngineDeadError(f"engine loop failed: {self.dead}")
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already running", "request_id")
        self.engine.validate_prompt(prompt_token_ids)
        self.engine.validate_params(params, len(prompt_token_ids))
        self.engine.validate_produced(list(produced_token_ids or []), params)
        if params.n != 1:
            # One stream per sequence keeps cancellation and usage per stream; callers fan out n themselves.
            raise InvalidRequestError("the serving engine takes n = 1 per request (the gateway fans out n)", "n")
        if params.structured_output is not None:
            # Compiling takes milliseconds to seconds: off the step loop, which then finds it in the cache.
            await asyncio.to_thread(self.engine.grammars.compile, params.structured_output)
        load = None
        if kv_blocks is not None:
            loop = asyncio.get_running_loop()
            load = KVLoad(*kv_blocks, on_done=lambda error: loop.call_soon_threadsafe(stream.kv_done, error))
        stream = self._streams[request_id] = RequestStream(self, request_id, load.source if load else None)

        def add() -> None:
            self.engine.add_request(request_id, list(prompt_token_ids), params,
                                    produced_token_ids=produced_token_ids, kv_load=load, export_kv=export_kv)

        try:
            await self._on_engine_thread(add)
        except EngineDeadError:
            stream.close()
            raise
        except asyncio.CancelledError:
            stream.close()  # the add may still run: the abort queued behind it undoes it
            raise
        except Exception as exc:  # a bad command fails its request, never the loop
            log.warning("request %s failed to start: %s", request_id, exc)
            stream.deliver(TokenDelta([], finish_reason="error", message=str(exc)))
        return stream

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       **options) -> AsyncIterator[TokenDelta]:
        """add_request (same options) and its deltas until it finishes; leaving the iteration early aborts it."""
        async with await self.add_request(request_id, prompt_token_ids, params, **options) as stream:
            async for delta in stream:
                yield delta

    def abort(self, request_id: str) -> bool:
        """Aborts a running request; its stream ends with finish_reason "abort". False if unknown."""
        if request_id not in self._streams:
            return False
        self._submit(lambda: self._abort_now(request_id), None)
        return True

    def _abort_now(self, request_id: str) -> None:
        if request_id in self.engine.requests:
            self.engine.abort_request(request_id)
            self._post([(request_id, TokenDelta([], finish_reason="abort", message="cancelled"))])

    def _stream_closed(self, request_id: str, finished: bool) -> None:
        self._streams.pop(request_id, None)
        if not finished:
            self._submit(lambda: self.engine.abort_request(request_id), None)

    async def _on_engine_thread(self, fn: Callable[[], T]) -> T:
        """Runs `fn` between steps on the engine's thread and returns its result (or raises its exception)."""
        if self.dead is not None or self._stopping:
            raise EngineDeadError(f"engine loop failed: {self.dead}" if self.dead else "the engine stopped")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self._waiting_for_thread.add(done)

        def settle(outcome: Callable[[], None]) -> None:
            if not done.done():
                outcome()

        def command() -> None:
            try:
                result = fn()
            except Exception as exc:  # bound now: Python unbinds `exc` when the except block ends
                loop.call_soon_threadsafe(settle, lambda error=exc: done.set_exception(error))
                return
            loop.call_soon_threadsafe(settle, lambda: done.set_result(result))

        with self._wake:
            self._commands.append(command)
            self._wake.notify()
        try:
            return await done
        finally:
            self._waiting_for_thread.discard(done)

    def _fail_waiters(self, exc: BaseException) -> None:
        """Commands that will never run (the loop died or stopped) must not leave their callers waiting."""
        for waiter in list(self._waiting_for_thread):
            if not waiter.done():
                waiter.set_exception(exc)
        for stream in self._streams.values():
            stream.kv_done(None)  # nothing will load: whatever keeps the rows readable may end

    def _submit(self, command: Callable[[], None], request_id: Optional[str]) -> None:
        def guarded() -> None:
            try:
                command()
            except Exception as exc:  # a bad command fails its request, never the loop
                log.warning("request %s failed to start: %s", request_id, exc)
                if request_id is not None:
                    self._post([(request_id, TokenDelta([], finish_reason="error", message=str(exc)))])

        with self._wake:
            self._commands.append(guarded)
            self._wake.notify()

    # ---- the loop thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._wake:
                if self.on_idle is not None and not self._commands and not engine.has_unfinished_requests():
                    self.on_idle()
                while not self._commands and not engine.has_unfinished_requests() and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for command in commands:
                command()
            if not engine.has_unfinished_requests():
                self._step_done()
                continue
            steps_before = engine.num_steps
            computed_before = engine.num_prompt_tokens_computed
            started = time.perf_counter()
            try:
                finished = engine.step()
            except Exception as exc:
                log.exception("engine step failed; failing every request")
                self.dead = exc
                self._fail_all(f"engine failure: {exc}")
                if self._loop is not None:
                    self._loop.call_soon_threadsafe(self._fail_waiters, EngineDeadError(f"engine loop failed: {exc}"))
                return
            elapsed = time.perf_counter() - started
            prompt_tokens = engine.num_prompt_tokens_computed - computed_before
            self.prefill_rate.observe(prompt_tokens, elapsed)
            if prompt_tokens == 0 and engine.num_steps > steps_before:
                self.decode_step_rate.observe(1, elapsed)
            self._post(self._deltas(engine.last_step_sampled, finished))
            self._step_done()
            if engine.num_steps == steps_before:
                # Nothing could run (e.g. every free block is lent to a transfer): wait for a command such as a
                # block's return instead of spinning a core; the timeout retries in case memory frees otherwise.
                with self._wake:
                    if not self._commands and not self._stopping:
                        self._wake.wait(_IDLE_RETRY_S)

    def _step_done(self) -> None:
        self.stats_snapshot = self.engine.stats()
        if self._kv_changes_sink is not None:
            changes = self.engine.pool.changes.drain()
            if changes:
                self._kv_changes_sink(changes)

    def _deltas(self, sampled: list[Sequence], finished) -> list[tuple[str, TokenDelta]]:
        exports = {out.request_id: out for out in finished}
        items = []
        for seq in sampled:
            delta = TokenDelta([seq.output_token_ids[-1]], seq.new_text, num_prompt_tokens=seq.num_prompt_tokens,
                               num_output_tokens=len(seq.output_token_ids), num_cached_tokens=seq.num_cached_tokens)
            if seq.params.logprobs is not None:
                delta.logprobs = [(seq.logprobs[-1], list(seq.top_logprobs[-1] or []))]
            if seq.params.prompt_logprobs is not None and len(seq.output_token_ids) == 1:
                delta.prompt_logprobs = seq.prompt_logprobs
            if seq.is_finished:
                delta.finish_reason = seq.finish_reason
                delta.stop_reason = seq.stop_reason
                delta.text += seq.end_text
                delta.end_text = seq.end_text
                output = exports.get(seq.request_id)
                if output is not None:
                    delta.kv_export = output.kv_export
            items.append((seq.request_id, delta))
        return items

    def _fail_all(self, message: str) -> None:
        items = []
        for request_id in list(self.engine.requests):
            try:
                self.engine.abort_request(request_id)
            except Exception:
                pass
            items.append((request_id, TokenDelta([], finish_reason="error", message=message)))
        for request_id in list(self._streams):
            items.append((request_id, TokenDelta([], finish_reason="error", message=message)))
        self._post(items)

    def _post(self, items: list[tuple[str, TokenDelta]]) -> None:
        if items and self._loop is not None:
            self._loop.call_soon_threadsafe(self._dispatch, items)

    def _dispatch(self, items: list[tuple[str, TokenDelta]]) -> None:
        for request_id, delta in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.deliver(delta)
            elif delta.kv_export is not None:  # nobody will transfer these blocks: end their loan now
                delta.kv_export.release()
