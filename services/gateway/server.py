"""`splitserve gateway`: the OpenAI HTTP API and the public gRPC API, in one process and one event loop.

SIGTERM: gRPC health turns NOT_SERVING and /health 503 at once, new requests are refused (503 / UNAVAILABLE),
requests in flight get up to grace_s to finish, then both servers stop and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import Optional

import redis.asyncio as redis
import uvicorn

from splitserve.setting import setting
from splitserve.serving import tracing
from splitserve.serving.grpc_service import GrpcService
from splitserve.serving.logs import setup_logging
from splitserve.serving.settings import log_settings, parse_settings
from splitserve.services.gateway.admission import Admission
from splitserve.services.gateway import grpc_api
from splitserve.services.gateway.grpc_api import GatewayServicer
from splitserve.services.gateway.membership_check import MembershipCheck
from splitserve.services.gateway.openai_api import ApiState, build_app
from splitserve.services.gateway.pipeline import Pipeline
from splitserve.services.gateway.prefill_path import DECIDERS, DEFAULT_HOLD_WEIGHT, PrefillPathChooser
from splitserve.services.gateway.prefix_index import PrefixIndexReader
from splitserve.services.gateway.router import POLICIES, Router, RouterWeights
from splitserve.services.gateway.routing_accuracy import RoutingAccuracy
from splitserve.services.gateway.sequence import SequenceRunner
from splitserve.services.gateway.tokenizer_client import TokenizerClient
from splitserve.services.gateway.tool_parsers import TOOL_PARSERS
from splitserve.services.gateway.workers import WorkerPool

log = logging.getLogger(__name__)


@dataclass
class GatewaySettings:
    """The gateway: OpenAI-compatible HTTP API and public gRPC API in front of the tokenizer, prefill and decode
    workers."""
    host: str = setting("127.0.0.1", "address both servers listen on")
    port: int = setting(8080, "HTTP port (OpenAI API, /health, /metrics)")
    grpc_port: int = setting(50070, "port of the public gRPC Gateway service")
    metrics_port: Optional[int] = setting(None,
        "extra Prometheus port (metrics are also at GET /metrics on the HTTP port)")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    grace_s: float = setting(30.0, "on SIGTERM, how long requests in flight may finish")
    served_model_name: list[str] = setting([],
        "names clients use for the model, comma-separated; responses carry the first (default: the model's hub id, or "
        "its checkpoint folder's name)")
    tokenizer_addresses: list[str] = setting(["127.0.0.1:50051"],
        "tokenizer replicas host:port, comma-separated (a failed call is retried on another)")
    prefill_addresses: list[str] = setting([],
        "prefill workers host:port, comma-separated (more are discovered from Redis)")
    decode_addresses: list[str] = setting([],
        "decode workers host:port, comma-separated (more are discovered from Redis)")
    redis_url: Optional[str] = setting(None,
        "Redis for worker discovery and load, e.g. redis://splitserve:PASSWORD@127.0.0.1:6379/0 (pass it by env when "
        "it holds a password)")
    cluster_token: Optional[str] = setting(None,
        "shared secret workers must prove they hold before they get requests (pass it by env)")
    api_key: Optional[str] = setting(None, "when set, requests need `Authorization: Bearer <key>`")
    kv_store_address: Optional[str] = setting(None, "kv-store host:port that prefill workers write prompts' KV to")
    local_prefill_threshold: int = setting(0, "prompts with fewer tokens are prefilled by the decode worker itself")
    prefill_decider: str = setting("predicted",
        "where longer prompts are prefilled: predicted (on the decode worker or a prefill worker, whichever is "
        "predicted to add the least waiting: the first token's, and --prefill-hold-weight x the decode worker's "
        "streams' while it computes the prompt) or threshold (always a prefill worker)")
    prefill_hold_weight: float = setting(DEFAULT_HOLD_WEIGHT,
        "predicted decider: what a second that the decode worker's streams wait during a local prefill counts for "
        "against a second of the prompt's first token (0: the first token alone; higher: faster tokens for the "
        "streams, slower first tokens)")
    router_policy: str = setting("prefix",
        "how workers are picked: prefix (cached prefix, kv-store and load scored together; needs --redis-url, else "
        "load), load, round-robin or random")
    router_prefix_weight: float = setting(2.0, "weight of the share of the prompt a worker's own KV cache holds")
    router_store_weight: float = setting(0.5,
        "weight of the share of the prompt the kv-store holds beyond the worker's cache")
    router_load_weight: float = setting(1.0, "weight of 1 / (1 + sequences on the worker)")
    router_speculative_weight: float = setting(1.5,
        "weight of the share of the prompt a worker was just sent a request for, not yet confirmed by its KV events (a "
        "burst sharing a new prefix goes to one worker)")
    routing_accuracy_threshold: float = setting(0.5,
        "below this agreement of predicted and reported cached tokens, route by load until it recovers")
    routing_accuracy_window: int = setting(50,
        "requests with cache hits the agreement is measured over (the last N, judged once N are in)")
    routing_accuracy_probe_every: int = setting(10,
        "while routing by load for disagreement, every Nth request is routed by prefix to keep measuring")
    prefix_index_timeout_s: float = setting(0.1,
        "longest wait for one prefix index lookup in Redis; slower or failed lookups route by load")
    request_timeout_s: float = setting(600.0, "deadline of one request, end to end")
    health_check_interval_s: float = setting(1.0, "how often workers are health-checked")
    max_decode_migrations: int = setting(1,
        "how many times one stream may move to another decode worker after its worker failed mid-stream (0: the stream "
        "ends with an error instead)")
    max_in_flight: int = setting(256,
        "requests served at once; more wait in the queue (4 decode workers' default max_num_seqs)")
    max_queued: int = setting(256,
        "requests waiting for a slot; beyond, 429 with Retry-After (gRPC RESOURCE_EXHAUSTED)")
    max_body_bytes: int = setting(8 * 2**20,
        "largest HTTP request body and gRPC request message; larger ones get 413 (RESOURCE_EXHAUSTED)")
    max_prompt_bytes: Optional[int] = setting(None,
        "largest text prompt (chat: all contents) in UTF-8 bytes, refused with 413 before tokenizing (default: 16 "
        "bytes per token of the model's context window)")
    tool_call_parser: Optional[str] = setting(None,
        f"how tool calls are found in a chat's output for tool_choice auto, as vLLM's flag: "
        f"{', '.join(TOOL_PARSERS)} (default: none, and tool_choice auto is refused with 400)")
    otlp_traces_endpoint: Optional[str] = tracing.endpoint_field()

    def __post_init__(self) -> None:
        if not self.tokenizer_addresses:
            raise ValueError("tokenizer_addresses needs at least one host:port")
        if self.local_prefill_threshold < 0:
            raise ValueError("local_prefill_threshold must be >= 0")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
        if self.max_decode_migrations < 0:
            raise ValueError("max_decode_migrations must be >= 0")
        if self.max_in_flight < 1 or self.max_queued < 0:
            raise ValueError("max_in_flight must be >= 1 and max_queued >= 0")
        if self.prefill_decider not in DECIDERS:
            raise ValueError(f"prefill_decider must be one of {', '.join(DECIDERS)}")
        if not self.prefill_hold_weight >= 0:
            raise ValueError("prefill_hold_weight must be >= 0")
        if self.router_policy not in POLICIES:
            raise ValueError(f"router_policy must be one of {', '.join(POLICIES)}")
        if min(self.router_prefix_weight, self.router_store_weight, self.router_load_weight,
               self.router_speculative_weight) < 0:
            raise ValueError("router weights must be >= 0")
        if not 0 <= self.routing_accuracy_threshold <= 1:
            raise ValueError("routing_accuracy_threshold must be in [0, 1]")
        if self.routing_accuracy_window < 1 or self.routing_accuracy_probe_every < 1:
            raise ValueError("routing_accuracy_window and routing_accuracy_probe_every must be >= 1")
        if self.prefix_index_timeout_s <= 0:
            raise ValueError("prefix_index_timeout_s must be > 0")
        if self.max_body_bytes < 1 or (self.max_prompt_bytes is not None and self.max_prompt_bytes < 1):
            raise ValueError("max_body_bytes and max_prompt_bytes must be >= 1")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_PARSERS)}, got {self.tool_call_parser!r}")

    @property
    def grpc_server_options(self) -> list[tuple[str, int]]:
        """The public gRPC server's options: requests no larger than the HTTP API takes."""
        return [("grpc.max_receive_message_length", self.max_body_bytes)]


class Gateway:
    """The gateway's parts wired together: main() serves it; tests start it in-process."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.redis = (redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
                      if settings.redis_url else None)
        membership = MembershipCheck(settings.cluster_token, self._worker_model)
        self.pool = WorkerPool({"tokenizer": settings.tokenizer_addresses, "prefill": settings.prefill_addresses,
                                "decode": settings.decode_addresses}, redis_client=self.redis,
                               check_interval_s=settings.health_check_interval_s, membership=membership)
        # Its own client: lookups time out in milliseconds, discovery in seconds.
        self.index_redis = (redis.from_url(settings.redis_url, socket_timeout=settings.prefix_index_timeout_s,
                                           socket_connect_timeout=settings.prefix_index_timeout_s)
                            if settings.redis_url and settings.router_policy == "prefix" else None)
        self.prefix_index = (PrefixIndexReader(self.index_redis, timeout_s=settings.prefix_index_timeout_s)
                             if self.index_redis is not None else None)
        self.router = Router(self.pool, settings.router_policy,
                             RouterWeights(settings.router_prefix_weight, settings.router_store_weight,
                                           settings.router_load_weight, settings.router_speculative_weight),
                             self.prefix_index,
                             RoutingAccuracy(settings.routing_accuracy_threshold, settings.routing_accuracy_window,
                                             settings.routing_accuracy_probe_every))
        self.tokenizer = TokenizerClient(self.pool)
        path_chooser = PrefillPathChooser(settings.prefill_decider, hold_weight=settings.prefill_hold_weight)
        runner = SequenceRunner(self.router, self.pool, settings.kv_store_address, settings.local_prefill_threshold,
                                settings.max_decode_migrations, path_chooser)
        self.pipeline = Pipeline(self.tokenizer, runner, settings.served_model_name, settings.request_timeout_s,
                                 settings.max_prompt_bytes)
        self.admission = Admission(settings.max_in_flight, settings.max_queued)
        self.app = build_app(ApiState(self.pipeline, self.admission, settings.api_key, self.why_unhealthy,
                                      settings.max_body_bytes, settings.tool_call_parser))
        self.servicer = GatewayServicer(self.pipeline, self.admission, settings.api_key)

    async def _worker_model(self) -> str:
        """The model every worker must serve: the tokenizer's (every service of a stack gets the same --model)."""
        return (await self.tokenizer.info()).model

    def why_unhealthy(self, every_worker: bool = False) -> Optional[str]:
        """None when requests can be served: a tokenizer replica and a decode worker are healthy. With
        `every_worker`, None only once every worker the gateway knows is healthy (a launcher's readiness: the
        first requests are then spread over all of them)."""
        if every_worker:
            down = [f"{w.kind} {w.address}: {w.why_unhealthy}" for kind in ("tokenizer", "prefill", "decode")
                    for w in self.pool.workers(kind) if not w.healthy]
            if down:
                return "not every worker is healthy yet: " + "; ".join(down)
        if not self.pool.healthy("tokenizer"):
            reasons = "; ".join(f"{w.address}: {w.why_unhealthy}" for w in self.pool.workers("tokenizer"))
            return f"tokenizer unhealthy: {reasons}"
        if not self.pool.healthy("decode"):
            return "no healthy decode worker"
        return None

    async def start(self) -> None:
        if self.redis is not None and not self.settings.cluster_token:
            log.warning("no cluster token: a worker announced in Redis gets requests once it names the served "
                        "model, so anyone who can write to Redis can receive traffic; set --cluster-token "
                        "(SPLITSERVE_CLUSTER_TOKEN) on the gateway and every worker")
        await self.pool.start()
        if self.prefix_index is not None:
            await self.prefix_index.start()

    async def drain(self) -> None:
        """Refuses new requests and returns when the ones in flight are done. Cancelled (the grace ran out),
        it ends those still in flight with an error rather than cutting their connections."""
        self.admission.start_draining()
        log.info("draining: %d requests in flight", self.admission.in_flight)
        try:
            await self.admission.wait_idle()
        except asyncio.CancelledError:
            log.warning("ending %d requests still in flight", self.admission.in_flight)
            self.admission.abort_all()
            raise

    async def close(self) -> None:
        await self.pool.close()
        if self.prefix_index is not None:
            await self.prefix_index.close()
        for client in (self.redis, self.index_redis):
            if client is None:
                continue
            # Bounded: a Redis connection cut mid-command can make aclose wait on it; exiting matters more.
            try:
                await asyncio.wait_for(client.aclose(), timeout=5.0)
            except asyncio.TimeoutError:
                log.warning("closing a Redis client took over 5 s; left to the process exit")


def tcp_listener(host: str, port: int) -> socket.socket:
    """A listening socket that says it is TCP (proto IPPROTO_TCP). asyncio turns Nagle off (TCP_NODELAY) only on
    connections whose socket says so, and socket.create_server's say proto 0: on a kept-alive connection each
    response then waited for the client's delayed ACK, 40 ms per request and per streamed chunk."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """uvicorn as a task in the caller's event loop, without uvicorn's own signal handling (the gateway drains
    on SIGTERM itself)."""

    def __init__(self, app, host: str, port: int, log_level: str = "INFO"):
        self._socket = tcp_listener(host, port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level.lower(), access_log=False, timeout_graceful_shutdown=1,
                                lifespan="off")
        self._server = _UvicornWithoutSignals(config)
        self._task: Optional[asyncio.Task] = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="http")
        while not self._server.started:
            if self._task.done():
                await self._task  # raises why it could not start
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task


class _UvicornWithoutSignals(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def serve(settings: GatewaySettings) -> None:
    gateway = Gateway(settings)
    grpc_service = GrpcService("gateway", settings.host, settings.grpc_port, settings.metrics_port,
                               [grpc_api.SERVICE_NAME], settings.grace_s, options=settings.grpc_server_options,
                               starts_traces=True)
    grpc_api.add_to_server(gateway.servicer, grpc_service.server)
    http = HttpServer(gateway.app, settings.host, settings.port, settings.log_level)

    async def on_started() -> None:
        await gateway.start()
        await http.start()
        log.info("gateway: OpenAI API on http://%s:%d/v1, gRPC on %s:%d", settings.host, http.port,
                 settings.host, grpc_service.port)

    try:
        await grpc_service.run(drain=gateway.drain, on_started=on_started)
    finally:
        await http.stop()
        await gateway.close()


def main(argv: Optional[list[str]] = None) -> int:
    settings = parse_settings(GatewaySettings, argv, prog="splitserve gateway")
    setup_logging("gateway", settings.log_level)
    log_settings("gateway", settings)
    tracing.setup_service("gateway", settings)
    asyncio.run(serve(settings))
    return 0
