"""The tokens and text of one sequence (n = 1): pick workers, prefill remotely or not, stream decode, retry once.

Prefill runs on a prefill worker unless the prompt is short (the decode worker prefilling it itself is
cheaper than moving its KV), the decode worker is predicted to give the first token sooner (prefill_path.py), or
no prefill worker is healthy; each choice is counted and logged. The first token comes from the prefill reply,
so the caller can show it before decode has even started (TTFT).

A decode worker that fails before it produced a token is replaced once by another one: the request can be
replayed without the user seeing anything twice (the prefill's first token and KV handle stay valid). One that
fails mid-stream is replaced too, up to `max_migrations` times: the new worker gets the prompt's KV handle and
every token produced so far, recomputes that tail, and the client's stream goes on where it was: the workers
make the text (each rebuilds its detokenizer from the tokens already produced), so it goes on exactly too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional, Union

import grpc

from splitserve.proto_convert import finish_reason_from_proto, sampling_params_to_proto, stop_reason_from_proto
from splitserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from splitserve.sampling_params import SamplingParams
from splitserve.serving import tracing
from splitserve.services.gateway import metrics, overhead
from splitserve.services.gateway.errors import NoHealthyWorkerError, UpstreamError
from splitserve.services.gateway.prefill_path import LOCAL, PathChoice, PrefillPathChooser, computed_tokens
from splitserve.services.gateway.prefix_index import PrefixHits
from splitserve.services.gateway.router import Router
from splitserve.services.gateway.rpc_errors import WORKER_DOWN_CODES, translate_rpc_error
from splitserve.services.gateway.workers import Worker, WorkerPool

log = logging.getLogger(__name__)

_WARN_EVERY_S = 30.0


@dataclass
class TokenBatch:
    """Ids a sequence produced since the previous batch, and their text; the last batch has finish_reason."""
    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    message: str = ""                              # why, for "error" and "abort"
    cached_tokens: Optional[int] = None            # prompt tokens reused, as the prefill or decode saw them
    text: str = ""                                 # made by the worker: stop strings cut, never half a character
    stop_reason: Union[str, int, None] = None      # the stop string or stop token id that ended the sequence
    # On the first batch, when sampling_params.prompt_logprobs is set: one per prompt token (the first's logprob NaN)
    prompt_logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)


class SequenceRunner:
    def __init__(self, router: Router, pool: WorkerPool, kv_store_address: Optional[str],
                 local_prefill_threshold: int, max_migrations: int = 1,
                 path_chooser: PrefillPathChooser = PrefillPathChooser()):
        self.router = router
        self.path_chooser = path_chooser
        self.max_migrations = max_migrations
        self.pool = pool
        self.kv_store_address = kv_store_address
        self.local_prefill_threshold = local_prefill_threshold
        self._last_no_prefill_warning = float("-inf")

    async def tokens(self, request_id: str, prompt: list[int], params: SamplingParams,
                     deadline: float) -> AsyncIterator[TokenBatch]:
        """Closing the iterator early (stop string, client gone) cancels the decode stream at once."""
        decode_load = len(prompt) + params.max_tokens
        with tracing.span("route decode") as route:
            hits = await self.router.prefix_hits(prompt)
            decode = self.router.pick("decode", len(prompt), hits=hits)
            _log_choice(request_id, decode, hits, route)
        with contextlib.ExitStack() as reservation:
            # The decode worker's load counts from the pick, not from after the prefill: otherwise every request
            # arriving during a prefill sees the same idle worker (one worker took 15 of 16 streams).
            reservation.enter_context(self.pool.track(decode, decode_load))
            prefilled, choice = await self._prefill(request_id, prompt, params, deadline, hits, decode)
            local_started = asyncio.get_running_loop().time() if prefilled is None else None
            # A local prefill is in the decode worker's queue until its first token (what the next choice weighs).
            queued_here = contextlib.ExitStack()
            if prefilled is None:
                queued_here.enter_context(self.pool.prefilling(decode, computed_tokens(len(prompt), decode, hits)))
            reservation.enter_context(queued_here)
            request = decode_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                                                 sampling_params=sampling_params_to_proto(params))
            produced: list[int] = []               # every token this sequence has yielded, the prefill's included
            if prefilled is not None:
                first = prefilled.first
                reservation.callback(prefilled.call.cancel)   # a client gone before the handoff ends it there
                finish = finish_reason_from_proto(first.finish_reason)
                logprobs = [first.first_token_logprob] if params.logprobs is not None else []
                yield TokenBatch([first.first_token_id], logprobs, finish, cached_tokens=first.cached_tokens,
                                 text=first.first_text, stop_reason=stop_reason_from_proto(first.stop_reason),
                                 prompt_logprobs=list(first.prompt_logprobs))
                if finish is not None:
                    return
                produced.append(first.first_token_id)
                handle = await prefilled.kv_handle(request_id)
                if handle is not None:
                    request.kv_handle.CopyFrom(handle)
            tried: list[Worker] = []
            migrations = 0
            while True:
                produced_here = False
                # Every attempt continues after what the sequence produced so far (the prefill's first token, a
                # failed worker's tokens): the new worker recomputes them and streams only what comes next.
                del request.produced_token_ids[:]
                request.produced_token_ids.extend(produced)
                try:
                    call = decode_pb2_grpc.DecodeStub(decode.channel).Generate(request, timeout=time_left(deadline))
                    try:
                        async for chunk in overhead.WaitedStream(call):
                            self.pool.note_progress(decode)
                            if local_started is not None and chunk.token_ids:
                                _check_prediction(request_id, choice, local_started)
                                local_started = None
                            queued_here.close()
                            produced_here = produced_here or bool(chunk.token_ids)
                            batch = _batch_from_chunk(chunk, first_from_prefill=prefilled is not None)
                            if batch.cached_tokens is not None and not tried:
                                self.router.feedback(decode, _measurable(hits, params), batch.cached_tokens)
                            produced += batch.token_ids
                            yield batch
                            if batch.finish_reason is not None:
                                return
                    finally:
                        call.cancel()
                    raise UpstreamError(f"decode worker {decode.address} ended the stream without a finish reason",
                                        retryable=False)
                except grpc.aio.AioRpcError as exc:
                    error = self._failed(decode, "decode", exc)
                    if not getattr(error, "retryable", False):
                        raise error from exc
                    if produced_here and migrations >= self.max_migrations:
                        metrics.DECODE_MIGRATIONS.labels("limit_reached").inc()
                        raise error from exc
                    if not produced_here and tried:
                        raise error from exc
                    tried.append(decode)
                    try:
                        decode = self.router.pick("decode", len(prompt), exclude=tried, hits=hits)
                    except NoHealthyWorkerError:
                        if produced_here:
                            metrics.DECODE_MIGRATIONS.labels("no_other_worker").inc()
                        raise error from exc
                    reservation.close()
                    reservation.enter_context(self.pool.track(decode, decode_load))
                    if produced_here:
                        # The stream goes on elsewhere: the prompt's KV from the store, the produced tail recomputed.
                        migrations += 1
                        reason = exc.code().name.lower()
                        metrics.DECODE_MIGRATIONS.labels(reason).inc()
                        log.warning("request %s: %s after %d tokens; resuming on decode worker %s",
                                    request_id, error, len(produced), decode.address)
                    else:
                        metrics.DECODE_RETRIES.inc()
                        log.warning("request %s: %s; retrying on decode worker %s", request_id, error,
                                    decode.address)

    async def _prefill(self, request_id: str, prompt: list[int], params: SamplingParams, deadline: float,
                       hits: Optional[PrefixHits], decode: Worker
                       ) -> tuple[Optional["RemotePrefill"], Optional[PathChoice]]:
        """The prefill worker's first token (its KV handle to follow), or None when the decode worker is to
        prefill the prompt itself; and the path choice, when one was made."""
        if len(prompt) < self.local_prefill_threshold:
            _count_path(LOCAL, "below_threshold")
            log.debug("request %s: %d prompt tokens < %d, prefilling on decode", request_id, len(prompt),
                      self.local_prefill_threshold)
            return None, None
        with tracing.span("route prefill") as route:
            # Proposed, not yet counted: the prefill worker gets the prompt only if the remote path wins.
            proposal = self.router.propose_optional("prefill", hits)
            if proposal is not None:
                _log_choice(request_id, proposal.worker, hits, route)
        if proposal is None:
            self._local_without_prefill_worker(request_id)
            return None, None
        worker = proposal.worker
        choice = self.path_chooser.choose(len(prompt), decode, worker, hits)
        _count_path(choice.path, choice.reason)
        # A probe takes the path predicted slower on purpose: logged where it is seen, with both predictions.
        log.log(logging.INFO if choice.reason == "probe" else logging.DEBUG, "request %s: %s", request_id,
                choice.describe())
        if choice.path == LOCAL:
            return None, choice
        self.router.commit(proposal)
        request = prefill_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt,
                                             sampling_params=sampling_params_to_proto(params))
        if self.kv_store_address:
            request.kv_target.store_address = self.kv_store_address
        started = asyncio.get_running_loop().time()
        call = prefill_pb2_grpc.PrefillStub(worker.channel).Prefill(request, timeout=time_left(deadline))
        try:
            with self.pool.track(worker, len(prompt)), \
                    self.pool.prefilling(worker, computed_tokens(len(prompt), worker, hits)), overhead.waiting():
                first = await call.read()
            if first is grpc.aio.EOF:
                call.cancel()
                raise UpstreamError(f"prefill worker {worker.address} ended its reply without a first token",
                                    retryable=False)
            self.pool.note_progress(worker)
            self.router.feedback(worker, _measurable(hits, params), first.cached_tokens)
            _check_prediction(request_id, choice, started)
            return RemotePrefill(first, call, lambda exc: self._failed(worker, "prefill", exc)), choice
        except grpc.aio.AioRpcError as exc:
            call.cancel()
            error = self._failed(worker, "prefill", exc)
            if not isinstance(error, UpstreamError):
                raise error from exc
            _count_path(LOCAL, "prefill_failed")
            log.warning("request %s: %s; prefilling on the decode worker instead", request_id, error)
            return None, None

    def _local_without_prefill_worker(self, request_id: str) -> None:
        _count_path(LOCAL, "no_prefill_worker")
        if not self.pool.workers("prefill"):
            return  # a decode-only deployment: local prefill is the plan, not a degradation
        now = time.monotonic()
        if now - self._last_no_prefill_warning >= _WARN_EVERY_S:
            self._last_no_prefill_warning = now
            log.warning("request %s: no healthy prefill worker; decode workers prefill prompts themselves",
                        request_id)

    def _failed(self, worker: Worker, kind: str, exc: grpc.aio.AioRpcError) -> Exception:
        """The typed error for a failed call; marks the worker unhealthy when the failure says it is down."""
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return translate_rpc_error(f"{kind} worker {worker.address}", exc)
        metrics.WORKER_FAILURES.labels(kind, code.name).inc()
        if code in WORKER_DOWN_CODES:
            self.pool.mark_failed(worker, f"{code.name}: {exc.details()}")
        return translate_rpc_error(f"{kind} worker {worker.address}", exc)


class RemotePrefill:
    """A prefill worker's streamed reply: the first token at once, the KV handle once the blocks are stored."""

    def __init__(self, first: prefill_pb2.PrefillResponse, call,
                 failed: Callable[[grpc.aio.AioRpcError], Exception]):
        self.first, self.call, self._failed = first, call, failed

    async def kv_handle(self, request_id: str) -> Optional[common_pb2.KVHandle]:
        """The handle, or None: the worker stored nothing (it counted and logged why) or failed after the first
        token (counted here as a prefill worker failure); either way the decode worker computes the prompt."""
        try:
            with overhead.waiting():
                handoff = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            error = self._failed(exc)
            log.warning("request %s: %s after the first token; the decode worker computes the prompt", request_id,
                        error)
            return None
        if handoff is grpc.aio.EOF or not handoff.HasField("kv_handle"):
            return None
        return handoff.kv_handle


def _measurable(hits: Optional[PrefixHits], params: SamplingParams) -> Optional[PrefixHits]:
    """The prediction to check a worker's cached tokens against, or None: a request for prompt logprobs reuses no
    cached prefix by design (engine/prompt_logprobs.py), which is no sign of a wrong index."""
    return hits if params.prompt_logprobs is None else None


def _count_path(path: str, reason: str) -> None:
    metrics.PREFILL_PATH.labels(path, reason).inc()
    if path == LOCAL:
        metrics.LOCAL_PREFILL.labels(reason).inc()


def _check_prediction(request_id: str, choice: Optional[PathChoice], started: float) -> None:
    """The chosen path's first token is here: its measured time against the predicted one (metric and log), so
    estimates that mislead the choice show (e.g. a disaggregated stack slower than an aggregated one)."""
    predicted = choice.predicted_s if choice is not None else None
    if not predicted:
        return
    measured = asyncio.get_running_loop().time() - started
    metrics.PREFILL_PATH_TTFT_RATIO.labels(choice.path).observe(measured / predicted)
    log.debug("request %s: first token after %.0f ms on the %s path (predicted %.0f ms)", request_id,
              measured * 1000, choice.path, predicted * 1000)


def _log_choice(request_id: str, worker: Worker, hits: Optional[PrefixHits], route: tracing.Span) -> None:
    """Logs the pick, and records it on the route's span."""
    predicted = "unknown" if hits is None else hits.device_tokens(worker.kind, worker.address)
    route.set_attributes({"splitserve.worker.kind": worker.kind, "splitserve.worker.address": worker.address,
                          **({} if hits is None else {"splitserve.route.predicted_cached_tokens": predicted,
                                                      "splitserve.route.store_tokens": hits.store_tokens})})
    log.debug("request %s: %s worker %s, predicted cached tokens %s (kv-store %s)", request_id, worker.kind,
              worker.address, predicted, "unknown" if hits is None else hits.store_tokens)


def _batch_from_chunk(chunk: decode_pb2.GenerateChunk, first_from_prefill: bool) -> TokenBatch:
    finish = finish_reason_from_proto(chunk.finish_reason)
    cached = None
    if finish is not None and chunk.HasField("usage") and not first_from_prefill:
        cached = chunk.usage.cached_tokens   # with remote prefill, the prefill's count is the one that matters
    return TokenBatch(list(chunk.token_ids), list(chunk.logprobs), finish, chunk.message, cached, chunk.text,
                      stop_reason_from_proto(chunk.stop_reason), list(chunk.prompt_logprobs))


def time_left(deadline: float) -> float:
    """Seconds until `deadline` (event-loop time), for the timeout of the next backend call."""
    return max(deadline - asyncio.get_running_loop().time(), 0.001)
