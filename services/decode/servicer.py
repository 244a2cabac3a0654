"""Decode: pull the prompt's blocks from the kv-store, join the continuous batch, stream tokens.

Whatever goes wrong with the blocks (no handle, another layout, a missing block, a failed pull) the request is
still served: the engine recomputes what it did not receive. Each such case is counted by reason and logged.
Leaving the stream (client cancel) aborts the request and frees its blocks at once. The engine makes the text:
each chunk carries its text delta (stop strings already cut) and logprob entries with each token's text and bytes.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import AsyncIterator, Optional

import grpc
from prometheus_client import Counter

from splitserve.engine.async_engine import EngineDeadError
from splitserve.engine.output_text import OutputText
from splitserve.kv_transfer.transport import ReceivedBlocks
from splitserve.proto_convert import (finish_reason_to_proto, layout_mismatch, prompt_logprobs_to_proto,
                                       sampling_params_from_proto, stop_reason_to_proto, token_logprob_to_proto)
from splitserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from splitserve.sampling_params import InvalidRequestError
from splitserve.serving import tracing
from splitserve.serving.engine_servicer import EngineServicer
from splitserve.serving.engine_worker import engine_stats_proto, layout_proto
from splitserve.serving.errors import abort_engine_error, abort_invalid

log = logging.getLogger(__name__)

DECODE_REQUESTS = Counter("splitserve_decode_requests_total", "Decode requests by how they ended", ["outcome"])
KV_RECOMPUTE = Counter("splitserve_decode_kv_recompute_total",
                       "Requests whose prompt KV was (partly) recomputed instead of transferred", ["reason"])
LOCAL_PREFILL = Counter("splitserve_decode_local_prefill_total", "Requests prefilled by this decode worker")


class DecodeServicer(EngineServicer, decode_pb2_grpc.DecodeServicer):
    async def Generate(self, request: decode_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        if self.is_draining():
            DECODE_REQUESTS.labels("draining").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker is shutting down")
        request_id = request.request_id or uuid.uuid4().hex
        prompt = list(request.prompt_token_ids)
        tracing.annotate({tracing.REQUEST_ID_ATTRIBUTE: request_id, "gen_ai.usage.input_tokens": len(prompt),
                          "splitserve.produced_tokens": len(request.produced_token_ids)})
        try:
            params = sampling_params_from_proto(request.sampling_params)
        except InvalidRequestError as exc:
            DECODE_REQUESTS.labels("invalid").inc()
            await abort_invalid(context, exc)
        # Tokens this sequence already produced elsewhere: the prefill worker's first token, or after a failover
        # everything the failed decode worker streamed. Either way the prompt's KV comes from the kv-store.
        produced = list(request.produced_token_ids)
        if produced and len(produced) >= params.max_tokens:
            yield self._ended_already(prompt, params, produced)
            return
        if not produced:
            LOCAL_PREFILL.inc()

        usage = common_pb2.Usage(prompt_tokens=len(prompt))
        pieces = self.engine.token_pieces
        stream = None
        try:
            async with self._prompt_blocks(request, request_id, pull=bool(produced)) as kv_blocks:
                stream = await self.engine.add_request(request_id, prompt, params, produced_token_ids=produced,
                                                       kv_blocks=kv_blocks)
                # The received blocks are readable (pinned in the store) only while this body runs: it ends once
                # the engine has loaded them at admission, or they ran out, or the request ended.
                error = await stream.kv_loaded()
                if error is not None:
                    self._recompute("load_failed", request_id, error)
            async for delta in stream:
                chunk = decode_pb2.GenerateChunk(token_ids=delta.token_ids, text=delta.text)
                if delta.logprobs:
                    for token, (logprob, top) in zip(delta.token_ids, delta.logprobs):
                        chunk.logprobs.append(token_logprob_to_proto(token, logprob, top, pieces))
                if delta.prompt_logprobs is not None:
                    chunk.prompt_logprobs.extend(prompt_logprobs_to_proto(prompt, delta.prompt_logprobs, pieces))
                if delta.num_output_tokens:
                    usage.completion_tokens = delta.num_output_tokens
                    usage.cached_tokens = delta.num_cached_tokens
                if delta.finished:
                    chunk.finish_reason = finish_reason_to_proto(delta.finish_reason)
                    chunk.usage.CopyFrom(usage)
                    chunk.message = delta.message
                    stop_reason = stop_reason_to_proto(delta.stop_reason)
                    if stop_reason is not None:
                        chunk.stop_reason.CopyFrom(stop_reason)
                    DECODE_REQUESTS.labels(delta.finish_reason).inc()
                    tracing.annotate({"gen_ai.usage.output_tokens": usage.completion_tokens,
                                      "gen_ai.usage.cache_read.input_tokens": usage.cached_tokens,
                                      "gen_ai.response.finish_reasons": [delta.finish_reason]})
                yield chunk
        except (InvalidRequestError, EngineDeadError) as exc:
            await abort_engine_error(context, exc, DECODE_REQUESTS)
        finally:
            # When gRPC closes this handler at a yield (client cancelled), this aborts the request and frees its
            # blocks now rather than at garbage collection.
            if stream is not None:
                stream.close()

    def _ended_already(self, prompt: list[int], params, produced: list[int]) -> decode_pb2.GenerateChunk:
        """The last chunk of a sequence whose tokens all came before this worker (max_tokens reached): only the
        text held back at the end of what was already streamed is left to send."""
        text = OutputText(self.engine.tokenizer, prompt, params)
        text.replay(produced)
        return decode_pb2.GenerateChunk(finish_reason=common_pb2.FINISH_REASON_LENGTH, text=text.finish(),
                                        usage=common_pb2.Usage(prompt_tokens=len(prompt),
                                                               completion_tokens=len(produced)))

    @contextlib.asynccontextmanager
    async def _prompt_blocks(self, request: decode_pb2.GenerateRequest, request_id: str,
                             pull: bool) -> AsyncIterator[Optional[tuple[list[bytes], ReceivedBlocks]]]:
        """`async with`: the prompt's blocks the kv-store holds (hashes, rows) beyond those this engine's prefix
        cache holds, readable for the body, or None (nothing to pull, or the pull failed: the engine computes
        them; each reason counted)."""
        if not pull:
            yield None
            return
        handle = request.kv_handle
        hashes = list(handle.block_hashes.hashes)
        num_full = len(request.prompt_token_ids) // self.engine.config.block_size
        if not request.HasField("kv_handle") or not hashes:
            if num_full:
                self._recompute("no_handle", request_id, "the prefill worker handed over no KV blocks")
            yield None
            return
        mismatch = layout_mismatch(layout_proto(self.engine), handle.layout)
        if mismatch:
            self._recompute("layout_mismatch", request_id, mismatch)
            yield None
            return
        async with self.stored_prefix(handle.store_address, handle.layout, hashes, request_id) as found:
            if found.error is not None:
                self._recompute("transfer_failed", request_id, str(found.error))
            elif found.missing:
                self._recompute("missing_blocks", request_id,
                                f"the store had {found.received_count} of the {len(hashes) - found.local} "
                                f"blocks not cached here")
            yield found.kv_blocks

    @staticmethod
    def _recompute(reason: str, request_id: str, detail: str) -> None:
        KV_RECOMPUTE.labels(reason).inc()
        log.warning("request %s: recomputing prompt KV locally (%s): %s", request_id, reason, detail)

    async def Stats(self, request, context):
        return common_pb2.WorkerStatsResponse(engine=engine_stats_proto(self.engine, self.identity.model),
                                              membership=self.identity.answer(request.nonce))
