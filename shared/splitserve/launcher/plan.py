"""What `splitserve up` starts: each service's command line, ports, readiness probes and start order.

Pure: nothing here starts a process or touches the disk, so the command lines the stack will run can be checked
in tests. `Stack` (stack.py) carries the plan out.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

from splitserve.setting import setting
from splitserve.byte_size import ByteSize
from splitserve.config import EngineConfig
from splitserve.cpus import allowed_cpus, format_cpu_list, usable_cores
from splitserve.kv_transfer import KV_TRANSPORTS
from splitserve.launcher.envoy import EnvoyPorts, envoy_argv
from splitserve.launcher.redis_server import redis_server_argv, redis_url
from splitserve.serving import tracing
from splitserve.serving.addresses import WILDCARD_HOSTS, host_port

# Internal services listen on loopback only; --host chooses where the public API (Envoy, or the gateway) listens.
INTERNAL_HOST = "127.0.0.1"
# UCX's tcp transport listens on every network device it may use, whatever address its peers connect to; limited
# to loopback it listens there like every other internal service, and one host's KV moves by shared memory anyway.
LOOPBACK_DEVICE = "lo"
SERVICE_COMMAND = (sys.executable, "-m", "splitserve.services.cli")
ENGINE_ROLES = ("prefill", "decode")
# Stopped front to back so no new work arrives at a service that is already going away.
STOP_ORDER = (("gateway", "envoy"), ("prefill", "decode"), ("kv-store", "tokenizer"), ("redis",))


@dataclass
class StackConfig(EngineConfig):
    """Starts the whole splitserve stack on this machine (Redis, tokenizer, kv-store, prefill and decode workers,
    gateway, Envoy) and prints its URL once every part is ready."""

    # The engine settings (EngineConfig: model, dtype, device, num_kv_blocks, ...) go to every engine worker.
    host: str = setting("127.0.0.1", "address the public HTTP and gRPC APIs listen on")
    port: int = setting(8000, "public OpenAI HTTP API port (0: any free port)")
    grpc_port: int = setting(50051, "public gRPC API port (0: any free port)")
    prefill_workers: int = setting(1,
        "number of prefill worker processes (0: aggregated, the decode workers prefill every prompt themselves and get "
        "every engine core)")
    decode_workers: int = setting(1, "number of decode worker processes")
    # Two by default: a tokenizer costs one light process, and with a second one a crash costs no request (the
    # gateway retries on the other) instead of every request failing until the restart has loaded the tokenizer.
    tokenizer_replicas: int = setting(2,
        "number of tokenizer processes (the gateway spreads calls over them and retries on another)")
    redis_url: Optional[str] = setting(None,
        "use this Redis instead of starting redis-server (with its password in the URL: "
        "redis://USER:PASSWORD@HOST:PORT/DB; pass it by env)")
    cluster_token: Optional[str] = setting(None,
        "secret the workers prove they hold before the gateway routes to them (default: a new random one; pass it by "
        "env)")
    envoy: bool = setting(True, "run Envoy in front of the gateway")
    gateways: int = setting(1,
        "gateway replicas behind Envoy, which round-robins over them; they share the prefix index and the worker "
        "registry through Redis (more than one needs Envoy)")
    envoy_admin_port: Optional[int] = setting(None,
        "serve Envoy's admin interface on 127.0.0.1:PORT (default: none; it can dump the config and stop Envoy)")
    api_key: Optional[str] = setting(None, "require this API key at the gateway")
    served_model_name: list[str] = setting([],
        "names the API accepts for the model, comma-separated; responses carry the first (default: the hub id, or the "
        "checkpoint folder's name)")
    local_prefill_threshold: Optional[int] = setting(None,
        "prompts up to this many tokens are prefilled by the decode worker itself")
    tool_call_parser: Optional[str] = setting(None,
        "the gateway's tool-call parser for tool_choice auto, as vLLM's flag (hermes: Hermes / Qwen <tool_call> "
        "blocks); default none: tool_choice auto is refused")
    prefill_decider: Optional[str] = setting(None,
        "where longer prompts are prefilled: predicted (the gateway's default: on the decode worker or a prefill "
        "worker, whichever is predicted to add the least waiting, --prefill-hold-weight weighing the decode "
        "worker's streams) or threshold (always a prefill worker)")
    prefill_hold_weight: Optional[float] = setting(None,
        "what a second that decode streams wait during a local prefill counts for against a second of the prompt's "
        "first token (default: the gateway's)")
    borrow_idle_cores: bool = setting(True,
        "with --cpu-affinity, an engine worker runs its steps of 64 or more prompt tokens on the other engine "
        "workers' cores too while those are idle (a prompt at low load gets the whole machine)")
    torch_threads: Optional[int] = setting(None,
        "torch threads per engine worker (default: one per core the worker is given)")
    cpu_affinity: bool = setting(True,
        "pin each engine worker to cores of its own: the launcher's cores less one for the other services (when there "
        "are 4 or more), split evenly, the remainder to decode workers")
    kv_store_capacity_bytes: Optional[ByteSize] = setting(None,
        "kv-store block pool size, e.g. 4GiB (default: the kv-store's)")
    kv_transport: Optional[str] = setting(None, "KV data plane of prefill and decode: ucx (default) or tcp")
    kv_checksum: bool = setting(False, "crc32 every KV block: writers send, the kv-store and readers verify")
    log_dir: Optional[str] = setting(None, "folder for one log file per process (default: a new temporary folder)")
    startup_timeout_s: float = setting(300.0, "give up if not ready after this long")
    grace_s: float = setting(10.0, "each service's drain time on stop; the launcher kills what is left 5 s later")
    log_level: str = setting("INFO", "log level of the launcher and every service")
    max_restarts: int = setting(5,
        "a process that exits is restarted, at most this many times within --restart-window-s (0: never restart)")
    restart_window_s: float = setting(300.0, "the window --max-restarts counts in")
    ucx_net_devices: Optional[str] = setting(None,
        "network devices the KV data plane (UCX) may use and listen on (default: UCX_NET_DEVICES from the environment, "
        "else loopback only)")
    otlp_traces_endpoint: Optional[str] = tracing.endpoint_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_store_capacity_bytes is not None:
            self.kv_store_capacity_bytes = ByteSize(self.kv_store_capacity_bytes)
        for name in ("decode_workers", "tokenizer_replicas", "gateways"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gateways > 1 and not self.envoy:
            raise ValueError("several gateways need Envoy in front of them (one public port); drop --no-envoy")
        if self.prefill_workers < 0:
            raise ValueError(f"prefill_workers must be >= 0 (0: aggregated), got {self.prefill_workers}")
        for name in ("port", "grpc_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be a TCP port (0 for any free one), got {getattr(self, name)}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.restart_window_s <= 0:
            raise ValueError(f"restart_window_s must be > 0, got {self.restart_window_s}")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s}")
        if self.kv_transport is not None and self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport must be ucx or tcp (alias grpc), got {self.kv_transport!r}")


@dataclass
class ServiceSpec:
    """One process to start: `name` is unique (prefill-0), `role` is the service (prefill)."""
    name: str
    role: str
    argv: list[str]
    probes: list[tuple[str, str]]  # (kind, target) for splitserve.launcher.probe, all must pass
    env: dict[str, str] = field(default_factory=dict)
    address: Optional[str] = None  # gRPC address other services use
    metrics_port: Optional[int] = None


@dataclass
class StackPlan:
    tiers: list[list[ServiceSpec]]  # started in order; each tier is ready before the next starts
    base_url: str
    grpc_address: str
    redis_url: str                        # with the password: it goes to the services by env, not argv
    addresses: dict[str, list[str]]
    envoy_ports: Optional[EnvoyPorts]
    envoy_config_path: Optional[Path]
    redis_config_path: Optional[Path] = None
    gateway_urls: list[str] = field(default_factory=list)   # each replica's own OpenAI API root (behind Envoy)


# From this many cores on, one is kept for the gateway, tokenizer, kv-store, Redis and Envoy; below, it would be
# most of the machine, idle most of the time.
SPARE_CORE_FROM = 4


def engine_cpu_sets(cpus: Sequence[int], prefill_workers: int, decode_workers: int) -> list[list[int]]:
    """Each engine worker's cores, in start order (prefill workers, then decode workers): disjoint runs of
    `cpus`, the same size each, the remainder to decode workers first (they run every step of every stream).
    With fewer cores than workers, workers share them round robin."""
    workers = prefill_workers + decode_workers
    cpus = sorted(cpus)
    if len(cpus) >= SPARE_CORE_FROM:
        cpus = cpus[1:]
    if len(cpus) < workers:
        return [[cpus[i % len(cpus)]] for i in range(workers)]
    base, extra = divmod(len(cpus), workers)
    # Rank: decode workers first, so they take the remainder.
    ranks = [decode_workers + i for i in range(prefill_workers)] + list(range(decode_workers))
    sets, start = [], 0
    for rank in ranks:
        size = base + (rank < extra)
        sets.append(cpus[start:start + size])
        start += size
    return sets


def launcher_cpus() -> list[int]:
    """The cores the stack may use: the launcher's allowed cores, as many as a cgroup CPU limit pays for."""
    return allowed_cpus()[:usable_cores()]


def ports_needed(config: StackConfig) -> int:
    """The free ports `plan_stack` may take (two per service, three per gateway, Redis, Envoy, the public ones), plus
    two spare so the caller can drop any that equal the public ports."""
    return 2 * (config.tokenizer_replicas + config.prefill_workers + config.decode_workers) + 3 * config.gateways + 8


def flags(**values: object) -> list[str]:
    """`--name value` for each value that is set; lists comma-separated, the way every service parses them."""
    out: list[str] = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):  # the services take booleans as --name / --no-name
            out.append(("--" if value else "--no-") + name.replace("_", "-"))
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out += ["--" + name.replace("_", "-"), str(value)]
    return out


# The engine workers' shared word on which of them has work (serving/core_activity.py), in the log folder.
CORE_ACTIVITY_FILE = "core-activity"


def plan_stack(config: StackConfig, model: str, log_dir: Path, ports: Iterator[int], *,
               redis_binary: Optional[str] = None, envoy_binary: Optional[str] = None,
               service_command: Sequence[str] = SERVICE_COMMAND,
               extra_args: Optional[Mapping[str, Sequence[str]]] = None, redis_password: Optional[str] = None,
               cluster_token: Optional[str] = None, cpus: Optional[Sequence[int]] = None) -> StackPlan:
    """`redis_password` protects the Redis this plan starts (needed unless config.redis_url is set);
    `cluster_token` is what workers prove to the gateway. Both reach the services by env, so `ps` shows
    neither. `cpus`: the cores to split among the engine workers (default: launcher_cpus())."""
    extra_args = extra_args or {}
    tiers: list[list[ServiceSpec]] = []
    public_http = config.port or next(ports)
    public_grpc = config.grpc_port or next(ports)
    cpu_sets = iter(engine_cpu_sets(launcher_cpus() if cpus is None else cpus, config.prefill_workers,
                                    config.decode_workers))

    def service(name: str, role: str, port: int, *specific: str, omp_threads: int = 1,
                env: Optional[dict[str, str]] = None, host: str = INTERNAL_HOST) -> ServiceSpec:
        metrics_port = next(ports)
        argv = [*service_command, role, *flags(host=host, port=port, metrics_port=metrics_port,
                                               log_level=config.log_level, grace_s=config.grace_s,
                                               otlp_traces_endpoint=config.otlp_traces_endpoint),
                *specific, *extra_args.get(role, ())]
        address = host_port(INTERNAL_HOST, port)
        env = {"OMP_NUM_THREADS": str(omp_threads), **(env or {})}
        return ServiceSpec(name, role, argv, [("grpc", address)], env, address, metrics_port)

    redis_config_path = None
    if config.redis_url is None:
        if redis_binary is None or redis_password is None:
            raise ValueError("plan_stack needs redis_binary and redis_password when no redis_url is configured")
        redis_port = next(ports)
        redis = redis_url(INTERNAL_HOST, redis_port, redis_password)
        redis_config_path = Path(log_dir) / "redis.conf"
        tiers.append([ServiceSpec("redis", "redis", redis_server_argv(redis_binary, INTERNAL_HOST, redis_port,
                                                                      redis_config_path),
                                  [("redis", redis)])])
    else:
        redis = config.redis_url
    cluster = {"SPLITSERVE_REDIS_URL": redis}
    if cluster_token:
        cluster["SPLITSERVE_CLUSTER_TOKEN"] = cluster_token

    tokenizers = [service(f"tokenizer-{index}", "tokenizer", next(ports), *flags(model=model))
                  for index in range(config.tokenizer_replicas)]
    ucx_env = {"UCX_NET_DEVICES": ucx_net_devices(config)}
    kv_store = service("kv-store", "kv-store", next(ports), *flags(capacity_bytes=config.kv_store_capacity_bytes,
                                                                  kv_checksum=config.kv_checksum or None),
                       env={**ucx_env, "SPLITSERVE_REDIS_URL": redis})
    workers = []
    roles = [(role, index) for role, count in (("prefill", config.prefill_workers), ("decode", config.decode_workers))
             for index in range(count)]
    worker_cpu_sets = [next(cpu_sets) for _ in roles]
    all_engine_cpus = {cpu for cpus in worker_cpu_sets for cpu in cpus}
    for (role, index), worker_cpus in zip(roles, worker_cpu_sets):
        threads = config.torch_threads or len(worker_cpus)
        borrowed = sorted(all_engine_cpus - set(worker_cpus))
        borrow = config.cpu_affinity and config.borrow_idle_cores and bool(borrowed)
        # A borrowed step's threads spin briefly at each op's barrier (sleeping ones wake too slowly for this
        # model's small ops: 441 prompt tokens on 2 threads, 137 ms passive vs 85-89 spinning, 152 on one). Only
        # for a worker of one core, whose other steps have no team to spin: a larger home team keeps sleeping
        # threads (spinning was measured to lose wherever another process takes one of the team's cores).
        spin = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000"} if borrow and threads == 1 else {}
        workers.append(service(
            f"{role}-{index}", role, next(ports),
            *flags(**{**config.changed_engine_values(), "model": model}, kv_store_address=kv_store.address,
                   cpus=format_cpu_list(worker_cpus) if config.cpu_affinity else None,
                   borrow_cpus=format_cpu_list(borrowed) if borrow else None,
                   core_activity_file=str(Path(log_dir) / CORE_ACTIVITY_FILE) if borrow else None,
                   torch_threads=threads, kv_transport=config.kv_transport,
                   kv_checksum=config.kv_checksum or None),
            omp_threads=threads, env={**ucx_env, **cluster, **spin}))
    tiers.append([*tokenizers, kv_store, *workers])

    addresses = {"tokenizer": [t.address for t in tokenizers], "kv-store": [kv_store.address],
                 **{role: [w.address for w in workers if w.role == role] for role in ENGINE_ROLES}}
    if config.envoy:
        gateway_host = INTERNAL_HOST
        gateway_ports = [(next(ports), next(ports)) for _ in range(config.gateways)]
    else:
        gateway_host, gateway_ports = config.host, [(public_http, public_grpc)]
    # Secrets go by env, not argv, so they do not show in `ps`.
    gateway_env = {**cluster, **({"SPLITSERVE_API_KEY": config.api_key} if config.api_key else {})}
    gateways, gateway_urls = [], []
    for index, (gateway_http, gateway_grpc) in enumerate(gateway_ports):
        gateway = service("gateway" if config.gateways == 1 else f"gateway-{index}", "gateway", gateway_http,
                          *flags(grpc_port=gateway_grpc, tokenizer_addresses=addresses["tokenizer"],
                                 prefill_addresses=addresses["prefill"], decode_addresses=addresses["decode"],
                                 kv_store_address=kv_store.address,
                                 served_model_name=config.served_model_name or None,
                                 local_prefill_threshold=config.local_prefill_threshold,
                                 prefill_decider=config.prefill_decider,
                                 prefill_hold_weight=config.prefill_hold_weight,
                                 tool_call_parser=config.tool_call_parser),
                          env=gateway_env, host=gateway_host)
        gateway.address = host_port(connect_host(gateway_host), gateway_grpc)
        http_root = f"http://{host_port(connect_host(gateway_host), gateway_http)}"
        gateway.probes = [("grpc", gateway.address),
                          # every worker routable, not only one of each: the first requests spread over all of them
                          ("http", f"{http_root}/health?all=true")]
        gateways.append(gateway)
        gateway_urls.append(f"{http_root}/v1")
    addresses["gateway"] = [gateway.address for gateway in gateways]
    tiers.append(gateways)

    envoy_ports = envoy_config_path = None
    public_host = connect_host(config.host)
    if config.envoy:
        if envoy_binary is None:
            raise ValueError("plan_stack needs envoy_binary when Envoy is enabled")
        (first_http, first_grpc), *more_gateways = gateway_ports
        envoy_ports = EnvoyPorts(config.host, public_http, public_grpc, next(ports), gateway_host, first_http,
                                 first_grpc, admin_port=config.envoy_admin_port, more_gateways=tuple(more_gateways))
        envoy_config_path = Path(log_dir) / "envoy.yaml"
        # Ready only when a request goes THROUGH Envoy on both public ports.
        tiers.append([ServiceSpec("envoy", "envoy", envoy_argv(envoy_binary, envoy_config_path, config.log_level),
                                  [("http", f"http://{host_port(public_host, public_http)}/health"),
                                   ("grpc", host_port(public_host, public_grpc))])])

    return StackPlan(tiers, base_url=f"http://{host_port(public_host, public_http)}/v1",
                     grpc_address=host_port(public_host, public_grpc), redis_url=redis, addresses=addresses,
                     envoy_ports=envoy_ports, envoy_config_path=envoy_config_path,
                     redis_config_path=redis_config_path, gateway_urls=gateway_urls)


def ucx_net_devices(config: StackConfig) -> str:
    """What the stack's UCX workers may use: the flag, else what the user's environment already says, else
    loopback, so that no internal socket listens beyond this host."""
    return config.ucx_net_devices or os.environ.get("UCX_NET_DEVICES") or LOOPBACK_DEVICE


def connect_host(host: str) -> str:
    """Where a local client connects to reach a server bound to `host` (a wildcard bind is reachable on loopback)."""
    return INTERNAL_HOST if host in WILDCARD_HOSTS else host
