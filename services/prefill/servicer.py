"""Prefill: run the prompt, sample the first token with the request's own params, hand the blocks to the kv-store.

The blocks are written before the response goes back, so a decode worker that pulls them right after finds
them. If the store cannot take them the request still succeeds — the decode side recomputes — and the failure
is counted and logged, never hidden.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import AsyncIterator, Optional

import grpc
import torch
from prometheus_client import Counter, Histogram

from splitserve.engine.async_engine import EngineDeadError
from splitserve.kv_blocks.hashing import chain_block_hashes
from splitserve.kv_transfer.metrics import KV_TRANSFER_FAILURES, record_transfer
from splitserve.kv_transfer.transport import KVTransferError, ReceivedBlocks
from splitserve.proto_convert import (finish_reason_to_proto, prompt_logprobs_to_proto, sampling_params_from_proto,
                                       stop_reason_to_proto, token_logprob_to_proto)
from splitserve.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from splitserve.sampling_params import InvalidRequestError
from splitserve.serving import tracing
from splitserve.serving.engine_servicer import EngineServicer, kv_attributes
from splitserve.serving.engine_worker import WorkerIdentity, engine_stats_proto, layout_proto
from splitserve.serving.errors import abort_engine_error

log = logging.getLogger(__name__)

PREFILL_REQUESTS = Counter("splitserve_prefill_requests_total", "Prefill requests by outcome", ["outcome"])
STORE_PREFIX_HITS = Counter("splitserve_prefill_store_prefix_hit_tokens_total",
                            "Prompt tokens whose KV was read from the kv-store instead of computed")
PREFILL_SECONDS = Histogram("splitserve_prefill_seconds", "Prompt in to first token out, KV handoff included",
                            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))


class PrefillServicer(EngineServicer, prefill_pb2_grpc.PrefillServicer):
    def __init__(self, engine, transport, kv_store_address: str | None, kv_timeout_s: float,
                 identity: WorkerIdentity, is_draining):
        super().__init__(engine, transport, kv_timeout_s, identity, is_draining)
        self.kv_store_address = kv_store_address

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        started = time.monotonic()
        if self.is_draining():
            PREFILL_REQUESTS.labels("draining").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker is shutting down")
        request_id = request.request_id or uuid.uuid4().hex
        prompt = list(request.prompt_token_ids)
        tracing.annotate({tracing.REQUEST_ID_ATTRIBUTE: request_id, "gen_ai.usage.input_tokens": len(prompt)})
        store = request.kv_target.store_address or self.kv_store_address
        last = stream = prompt_logprobs = None
        already_stored: set[bytes] = set()
        try:
            try:
                params = sampling_params_from_proto(request.sampling_params)
                self.engine.validate_prompt(prompt)
                # Only the first token is sampled here; with min_tokens >= 1 it must not be EOS or a stop id.
                first_only = params.replace(max_tokens=1, n=1, min_tokens=min(params.min_tokens, 1))
                # The pulled blocks are readable (pinned in the store) only while this body runs: until the engine
                # has loaded them at admission (a failed load is logged and counted by the engine).
                # Prompt logprobs need every position computed here: nothing is pulled for them.
                wants_stored = params.prompt_logprobs is None
                async with self._stored_prefix(store if wants_stored else None, prompt, request_id) as pulled:
                    stream = await self.engine.add_request(request_id, prompt, first_only, export_kv=True,
                                                           kv_blocks=pulled)
                    already_stored = set(pulled[0]) if pulled else set()
                    await stream.kv_loaded()
                async for delta in stream:
                    last = delta
                    if delta.prompt_logprobs is not None:
                        prompt_logprobs = delta.prompt_logprobs
            except (InvalidRequestError, EngineDeadError) as exc:
                await abort_engine_error(context, exc, PREFILL_REQUESTS)
            finally:
                if stream is not None:
                    stream.close()  # aborts the request if this handler was cancelled before it finished
            if last is None or last.finish_reason in ("abort", "error") or not last.token_ids:
                PREFILL_REQUESTS.labels("error").inc()
                await context.abort(grpc.StatusCode.INTERNAL,
                                    f"prefill failed: {last.message if last else 'no output'}")

            finish = self._finish_reason(last.finish_reason, params.max_tokens, len(prompt))
            tracing.annotate({"gen_ai.usage.cache_read.input_tokens": last.num_cached_tokens,
                              **({"gen_ai.response.finish_reasons": [finish]} if finish else {})})
            # The engine ended the sequence after one token, releasing held-back text; if decode goes on, that
            # text is not final yet (the next tokens may turn it into a stop string): decode releases it.
            text = last.text if finish is not None else last.text[:len(last.text) - len(last.end_text)]
            response = prefill_pb2.PrefillResponse(
                request_id=request_id, first_token_id=last.token_ids[0], cached_tokens=last.num_cached_tokens,
                finish_reason=finish_reason_to_proto(finish), first_text=text)
            stop_reason = stop_reason_to_proto(last.stop_reason) if finish == "stop" else None
            if stop_reason is not None:
                response.stop_reason.CopyFrom(stop_reason)
            if last.logprobs:
                logprob, top = last.logprobs[0]
                response.first_token_logprob.CopyFrom(token_logprob_to_proto(last.token_ids[0], logprob, top,
                                                                             self.engine.token_pieces))
            if prompt_logprobs is not None:
                response.prompt_logprobs.extend(prompt_logprobs_to_proto(prompt, prompt_logprobs,
                                                                          self.engine.token_pieces))
            # The first token leaves now; the blocks are stored after it (the handle follows in a second message).
            yield response
            if finish is None:
                handoff = prefill_pb2.PrefillResponse(request_id=request_id)
                if last.kv_export is not None and last.kv_export.block_hashes:
                    handle = await self._store_blocks(store, last.kv_export, request_id, already_stored)
                    if handle is not None:
                        handoff.kv_handle.CopyFrom(handle)
                yield handoff
        finally:
            if last is not None and last.kv_export is not None:
                last.kv_export.release()  # the engine lent the blocks for the handoff: it is over
        PREFILL_REQUESTS.labels("ok").inc()
        PREFILL_SECONDS.observe(time.monotonic() - started)

    def _finish_reason(self, engine_reason: str, max_tokens: int, prompt_len: int):
        if engine_reason == "stop":
            return "stop"
        if max_tokens == 1 or prompt_len + 1 >= self.engine.max_model_len:
            return "length"
        return None  # decode goes on

    @contextlib.asynccontextmanager
    async def _stored_prefix(self, store: str | None, prompt: list[int],
                             request_id: str) -> AsyncIterator[Optional[tuple[list[bytes], ReceivedBlocks]]]:
        """`async with`: cross-worker prefix reuse. The prompt's leading blocks that this worker lacks but the
        kv-store holds (another worker computed them), readable for the body, or None. A failed pull only costs
        the compute."""
        engine = self.engine
        block_size = engine.config.block_size
        usable = (len(prompt) - 1) // block_size  # the last token is always computed: its logits pick the next
        if not store or usable == 0 or not engine.config.enable_prefix_caching:
            yield None
            return
        hashes = chain_block_hashes(prompt[: usable * block_size], block_size, engine.model_id)
        async with self.stored_prefix(store, layout_proto(engine), hashes, request_id) as found:
            if found.error is not None:
                log.warning("request %s: reading cached prefix blocks from %s failed (%s); computing them",
                            request_id, store, found.error)
            STORE_PREFIX_HITS.inc(found.received_count * block_size)
            yield found.kv_blocks

    async def _store_blocks(self, store: str | None, export, request_id: str, already_stored: set = frozenset()):
        if not store:
            KV_TRANSFER_FAILURES.labels("put", "no_store").inc()
            log.warning("request %s: no kv-store configured; decode will recompute the prompt", request_id)
            return None
        layout = layout_proto(self.engine)
        # Blocks just read from the store are not sent back (the handle still names them: decode reads them there).
        fresh = [i for i, h in enumerate(export.block_hashes) if h not in already_stored]
        blocks = export.blocks if len(fresh) == len(export.block_hashes) else (
            export.blocks[fresh] if isinstance(export.blocks, torch.Tensor) else export.blocks.subset(fresh))
        started = time.monotonic()
        try:
            if fresh:
                with tracing.span("kv put", kv_attributes(store, len(fresh))):
                    await self.transport.put_blocks(store, layout, [export.block_hashes[i] for i in fresh], blocks,
                                                    request_id, timeout_s=self.kv_timeout_s)
        except KVTransferError as exc:
            KV_TRANSFER_FAILURES.labels("put", type(exc).__name__).inc()
            log.warning("request %s: writing %d KV blocks to %s failed (%s); decode will recompute", request_id,
                        len(export.block_hashes), store, exc)
            return None
        record_transfer("put", time.monotonic() - started, len(fresh) * blocks.shape[1], len(fresh))
        return common_pb2.KVHandle(store_address=store, block_hashes=common_pb2.BlockHashes(
            hashes=export.block_hashes), layout=layout)

    async def Stats(self, request, context):
        return common_pb2.WorkerStatsResponse(engine=engine_stats_proto(self.engine, self.identity.model),
                                                membership=self.identity.answer(request.nonce))
