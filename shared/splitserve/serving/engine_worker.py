"""What the prefill and decode services share: their settings, building the engine, its stats and metrics.

The two services differ only in what they do with a request (prefill: first token + blocks out; decode: blocks
in + stream); everything about hosting an engine lives here once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from splitserve.setting import setting
from splitserve.config import EngineConfig
from splitserve.cpus import allowed_cpus, format_cpu_list, parse_cpu_list, pin_process, usable_cores
from splitserve.kv_transfer import KV_TRANSPORTS
from splitserve.membership import membership_mac
from splitserve.proto_convert import layout_to_proto
from splitserve.serving.addresses import AdvertiseAddressError, advertised_address
from splitserve.serving.core_borrowing import borrowing_for
from splitserve.serving import tracing
from splitserve.serving.logs import setup_logging
from splitserve.serving.settings import log_settings, parse_settings
from splitserve.v1 import common_pb2

log = logging.getLogger(__name__)


@dataclass
class EngineWorkerSettings(EngineConfig):
    """A prefill or decode worker: the engine's settings (EngineConfig) and how the worker serves and moves KV."""
    host: str = "127.0.0.1"
    port: int = 50061
    metrics_port: Optional[int] = None
    log_level: str = "INFO"
    grace_s: float = setting(30.0, "seconds to finish in-flight work on SIGTERM")
    advertise_address: Optional[str] = setting(None,
        "address announced to Redis and in KV handles (default host:port; with a wildcard host, this host's own "
        "IP:port)")
    health_port: int = setting(0,
        "port of a health-only gRPC server on its own thread, answered even while the event loop is busy; gateways "
        "learn it from the worker (0: any free port, -1: none)")
    kv_store_address: Optional[str] = setting(None, "kv-store gRPC address")
    kv_transport: str = setting("ucx",
        "KV data plane: ucx (UCX, gRPC for control) or tcp (gRPC streams only; alias grpc)")
    kv_checksum: bool = setting(False, "send a crc32 with every KV block written and verify every block read")
    kv_timeout_s: float = setting(30.0, "deadline of one KV transfer")
    redis_url: Optional[str] = setting(None,
        "announce this worker and its load to Redis (credentials in the URL: pass it by env)")
    cluster_token: Optional[str] = setting(None,
        "shared secret this worker proves it holds to gateways (the gateway's --cluster-token; pass it by env)")
    cpus: Optional[str] = setting(None, "cores this worker runs on, e.g. 0-3,8 (default: those it was started with)")
    borrow_cpus: Optional[str] = setting(None,
        "other workers' cores this one also runs steps of 64 or more prompt tokens on while those cores are idle "
        "(needs --cpus; the launcher gives each engine worker the others' cores)")
    core_activity_file: Optional[str] = setting(None,
        "with --borrow-cpus: a file the engine workers of this machine share, each saying whether its engine has work "
        "(cores are borrowed exactly while their worker has none; without it, a core's recent busy share decides)")
    torch_threads: Optional[int] = setting(None,
        "torch intra-op threads on CPU (default: OMP_NUM_THREADS if set, else one per core this worker may use: --cpus "
        "or its affinity, fewer under a cgroup CPU limit)")
    otlp_traces_endpoint: Optional[str] = tracing.endpoint_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cpus is not None:
            parse_cpu_list(self.cpus)  # a bad list fails here, with the flag's name, not at engine start
        if self.borrow_cpus is not None:
            if self.cpus is None:
                raise ValueError("borrow_cpus needs cpus (the worker's own cores)")
            if set(parse_cpu_list(self.borrow_cpus)) & set(parse_cpu_list(self.cpus)):
                raise ValueError(f"borrow_cpus {self.borrow_cpus} must not overlap cpus {self.cpus}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")

    @property
    def address(self) -> str:
        return advertised_address(self.advertise_address, self.host, self.port)


@dataclass(frozen=True)
class WorkerIdentity:
    """What this worker answers when a gateway challenges it (splitserve.membership)."""
    kind: str
    address: str
    model: str
    cluster_token: Optional[str] = None
    health_address: str = ""

    def answer(self, nonce: bytes) -> common_pb2.MembershipProof:
        proof = common_pb2.MembershipProof(address=self.address, health_address=self.health_address)
        if nonce and self.cluster_token:
            proof.mac = membership_mac(self.cluster_token, nonce, self.kind, self.address, self.model,
                                       self.health_address)
        return proof


def use_cores(settings: EngineWorkerSettings) -> int:
    """Pins this process to settings.cpus (if set) and runs one torch thread per core it may use, unless
    torch_threads (or else OMP_NUM_THREADS) says otherwise; returns the thread count. Called before the engine's
    first op, which starts torch's OpenMP threads."""
    import torch

    own_cores = usable_cores()
    if settings.cpus is not None:
        own = parse_cpu_list(settings.cpus)
        # The process may run on the borrowed cores too; the engine thread is pinned to its own when it starts.
        pin_process(own + (parse_cpu_list(settings.borrow_cpus) if settings.borrow_cpus is not None else []))
        own_cores = min(len(own), usable_cores())
    threads = settings.torch_threads or _omp_num_threads() or own_cores
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    log.info("torch threads: %d on cores %s", threads, format_cpu_list(allowed_cpus()))
    return threads


def _omp_num_threads() -> Optional[int]:
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return None


def build_engine(settings: EngineWorkerSettings):
    """Loads the model into an AsyncEngine (not yet started)."""
    from splitserve.engine.async_engine import AsyncEngine
    from splitserve.engine.llm_engine import LLMEngine

    use_cores(settings)
    model = settings.model
    if model is None:
        from splitserve.demo_model import demo_checkpoint

        model = str(demo_checkpoint())
        log.warning("no --model given: serving the tiny offline demo model (random weights, random text)")
    engine = LLMEngine(settings.engine_config(model=model))
    borrower = None
    if settings.borrow_cpus is not None and engine.device.type == "cpu":
        borrower = borrowing_for(parse_cpu_list(settings.cpus), parse_cpu_list(settings.borrow_cpus),
                                 settings.core_activity_file)
    async_engine = AsyncEngine(engine)
    if borrower is not None:
        engine.before_model_run = borrower
        async_engine.on_idle = borrower.idle
    return async_engine


def layout_proto(async_engine) -> common_pb2.KVLayout:
    return layout_to_proto(async_engine.layout, async_engine.model_id)


def engine_stats_proto(async_engine, model_name: str) -> common_pb2.EngineStats:
    s = async_engine.stats_snapshot
    return common_pb2.EngineStats(
        num_running=s["running"], num_waiting=s["waiting"], running_tokens=s["running_tokens"],
        waiting_tokens=s["waiting_tokens"], kv_blocks_total=s["num_blocks"], kv_blocks_free=s["free_blocks"],
        prefix_cache_queries=s["prefix_query_tokens"], prefix_cache_hits=s["prefix_hit_tokens"],
        layout=layout_proto(async_engine), model=model_name)


def load_report(async_engine) -> dict[str, int]:
    """The load numbers a worker announces to Redis for the router, and what the gateway predicts the time of a
    prefill here from (its queue, its measured rates; 0 while not measured)."""
    from splitserve.kv_transfer.metrics import KV_PUT_RATE

    s = async_engine.stats_snapshot
    layout = async_engine.layout
    decode_steps_per_s = async_engine.decode_step_rate.rate
    return {"num_running": s["running"], "num_waiting": s["waiting"], "running_tokens": s["running_tokens"],
            "waiting_tokens": s["waiting_tokens"], "kv_blocks_free": s["free_blocks"],
            "kv_blocks_total": s["num_blocks"], "queued_prompt_tokens": s["queued_prompt_tokens"],
            "prefill_tokens_per_s": round(async_engine.prefill_rate.rate or 0),
            "kv_put_bytes_per_s": round(KV_PUT_RATE.rate or 0),
            "decode_step_us": round(1e6 / decode_steps_per_s) if decode_steps_per_s else 0,
            "kv_bytes_per_token": layout.bytes_per_block // layout.block_size}


class EngineMetricsCollector(Collector):
    """Exposes the engine's own counters at scrape time, labelled by role, instead of mirroring them by hand."""

    def __init__(self, async_engine, role: str):
        self.engine = async_engine
        self.role = role

    def collect(self):
        s = self.engine.stats_snapshot
        labels = ["role"]
        value = [self.role]

        def gauge(name, doc, v):
            g = GaugeMetricFamily(f"splitserve_{name}", doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name, doc, v):
            c = CounterMetricFamily(f"splitserve_{name}", doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge("running_requests", "Sequences in the running batch", s["running"])
        yield gauge("waiting_requests", "Sequences waiting for admission", s["waiting"])
        # What a prefill autoscaler wants: queued work in tokens, not requests (one long prompt is many short ones).
        yield gauge("waiting_tokens", "Tokens of the sequences waiting for admission (prompts, and what preempted "
                    "ones had generated)", s["waiting_tokens"])
        yield gauge("kv_cache_usage_ratio", "Fraction of KV blocks in use", s["used_blocks"] / max(1, s["num_blocks"]))
        yield gauge("kv_cache_blocks", "KV blocks in the paged cache", s["num_blocks"])
        yield counter("prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache",
                      s["prefix_query_tokens"])
        yield counter("prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache", s["prefix_hit_tokens"])
        yield counter("preemptions", "Sequences preempted by recompute", s["preemptions"])
        yield counter("kv_load_failures", "Received KV loads the engine could not trust at admission (their source "
                      "was given back or ran out first): their tokens were computed instead", s["kv_load_failures"])
        yield counter("attention_compile_fallbacks", "Start-ups where compiling decode attention failed and it runs "
                      "eager instead (several times slower)", s["attention_compile_fallbacks"])
        yield counter("prompt_tokens_computed", "Prompt tokens run through the model", s["prompt_tokens_computed"])
        yield counter("generation_tokens", "Tokens generated", s["generation_tokens"])
        yield counter("engine_steps", "Engine steps run", s["steps"])
        yield counter("guided_sequences", "Sequences started under a grammar (response_format, structured_outputs)",
                      s["guided_sequences"])
        yield counter("guided_rejected_tokens", "Sampled tokens outside their sequence's grammar (a masking fault): "
                      "the sequence ended with finish_reason error", s["guided_rejected_tokens"])


def register_engine_metrics(async_engine, role: str) -> None:
    REGISTRY.register(EngineMetricsCollector(async_engine, role))


def make_transport(name: str, checksum: bool = False):
    """The KV transport by name; "ucx" raises UcxUnavailableError (with what to install) if UCX cannot load."""
    if name in ("grpc", "tcp"):
        from splitserve.kv_transfer.grpc_transport import GrpcKVTransport

        return GrpcKVTransport(checksum=checksum)
    if name == "ucx":
        from splitserve.kv_transfer.ucx_transport import UcxKVTransport

        return UcxKVTransport(checksum=checksum)
    raise ValueError(f"unknown KV transport {name!r} (available: {', '.join(KV_TRANSPORTS)})")


def engine_worker_main(role: str, settings_type: type[EngineWorkerSettings], service_name: str, add_servicer,
                       argv: Optional[list[str]] = None) -> int:
    """`splitserve <role>`: settings from flags and env, logging, then run_engine_worker."""
    settings = parse_settings(settings_type, argv, prog=f"splitserve {role}")
    setup_logging(role, settings.log_level)
    log_settings(role, settings)
    tracing.setup_service(role, settings)
    return asyncio.run(run_engine_worker(settings, role, service_name, add_servicer))


async def run_engine_worker(settings: EngineWorkerSettings, role: str, service_name: str, add_servicer) -> int:
    """Hosts an engine as a service: load, serve, announce to Redis, drain on SIGTERM, stop.

    `add_servicer(settings, service, async_engine, transport, identity)` registers the role's servicer.
    """
    from splitserve.serving.grpc_service import GrpcService

    try:
        address = settings.address  # before loading the model: a worker nobody can reach should fail at once
    except AdvertiseAddressError as exc:
        log.error("%s: %s", role, exc)
        return 2
    log.info("%s announces itself as %s", role, address)
    engine = build_engine(settings)
    publisher = kv_event_publisher(settings, role, engine) if settings.redis_url else None
    engine.start()
    register_engine_metrics(engine, role)
    transport = make_transport(settings.kv_transport, settings.kv_checksum)
    service = GrpcService(role, settings.host, settings.port, settings.metrics_port, [service_name],
                          settings.grace_s, health_port=settings.health_port if settings.health_port >= 0 else None)
    health_address = ""
    if service.health_thread is not None:
        health_address = f"{address.rsplit(':', 1)[0]}:{service.health_thread.port}"
    identity = WorkerIdentity(role, address, engine.config.model, settings.cluster_token,
                              health_address)
    add_servicer(settings, service, engine, transport, identity)
    announcer = None
    if settings.redis_url:
        from splitserve.worker_registry import WorkerAnnouncer

        announcer = WorkerAnnouncer(settings.redis_url, role, address, engine.config.model,
                                    lambda: load_report(engine))

    async def on_started() -> None:
        if announcer is not None:
            await announcer.start()

    async def drain() -> None:
        if announcer is not None:
            await announcer.stop()  # the router stops picking this worker before it goes
        await engine.wait_idle()

    try:
        await service.run(drain=drain, on_started=on_started)
    finally:
        await engine.stop()
        await transport.close()
        if publisher is not None:
            await asyncio.to_thread(publisher.stop)
    return 0


def kv_event_publisher(settings: EngineWorkerSettings, role: str, engine):
    """Publishes what the engine's prefix cache holds to the Redis prefix index, from a thread of its own (its
    steps hand over their changes without waiting). Made before the engine starts, so no change goes unseen."""
    from splitserve.kv_events.events import MEDIUM_DEVICE, events_from_pool
    from splitserve.kv_events.index import PublisherInfo
    from splitserve.kv_events.publisher import KVEventPublisher

    block_size = engine.config.block_size
    publisher = KVEventPublisher(settings.redis_url, PublisherInfo(role, settings.address, MEDIUM_DEVICE, block_size,
                                                                   engine.model_id))
    engine.on_kv_changes(lambda changes: publisher.publish(events_from_pool(changes, block_size)))
    publisher.start()
    return publisher
