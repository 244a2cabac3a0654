"""`Stack`: the whole splitserve stack as local processes, the same code behind `splitserve up` and the end-to-end
tests.

    with Stack(prefill_workers=2, log_dir=tmp_path) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="unused")
        stack.process("decode", 0).kill()          # fault tests

Starting is tier by tier (Redis; tokenizers, kv-store and the workers together; gateway; Envoy), each tier ready
(health SERVING, /health 200) before the next. If a child exits or the timeout passes first, everything started
so far is stopped and StackStartError carries the child's name and the tail of its log. Once ready, a child that
exits is restarted on the same ports, bounded (supervisor.py; `max_restarts=0` turns that off).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence
from urllib.parse import urlsplit

from splitserve.launcher import probe
from splitserve.launcher.envoy import find_envoy, write_envoy_config
from splitserve.launcher.errors import StackStartError
from splitserve.launcher.plan import (SERVICE_COMMAND, STOP_ORDER, ServiceSpec, StackConfig, StackPlan,
                                      plan_stack, ports_needed)
from splitserve.launcher.ports import ensure_free, free_ports
from splitserve.launcher.processes import ChildProcess, stop_together
from splitserve.launcher.redis_server import find_redis_server, new_secret, write_redis_config
from splitserve.launcher.supervisor import RestartPolicy, Supervisor, describe_exit
from splitserve.serving.settings import redact_url

log = logging.getLogger(__name__)

POLL_S = 0.2
# The launcher waits this long past a child's own drain (--grace-s) before SIGKILL.
KILL_MARGIN_S = 5.0


def resolve_model(model: Optional[str]) -> tuple[str, bool]:
    """(model path or hub id, whether it is the demo model): the demo checkpoint is built once and cached."""
    if model is not None:
        return model, False
    from splitserve.demo_model import demo_checkpoint

    return str(demo_checkpoint()), True


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The launcher's environment without its own SPLITSERVE_* settings: each child gets its settings as flags, so
    a SPLITSERVE_PORT meant for `up` cannot leak into every service."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITSERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Stack:
    def __init__(self, config: Optional[StackConfig] = None, *, service_command: Sequence[str] = SERVICE_COMMAND,
                 extra_args: Optional[Mapping[str, Sequence[str]]] = None, **fields):
        """`Stack(config)` as `splitserve up` builds it, or `Stack(**StackConfig fields)` from Python, where the
        public ports default to free ones (0) so that tests never collide. `extra_args` appends flags to one
        role's command line (e.g. {"decode": ["--max-num-seqs", "4"]}); `service_command` replaces
        `python -m splitserve.services.cli` (tests use stand-in services)."""
        if config is None:
            fields.setdefault("port", 0)
            fields.setdefault("grpc_port", 0)
            config = StackConfig(**fields)
        elif fields:
            raise TypeError("pass either a StackConfig or its fields, not both")
        self.config = config
        self.service_command = list(service_command)
        self.extra_args = dict(extra_args or {})
        self.log_dir = Path(config.log_dir) if config.log_dir else Path(tempfile.mkdtemp(prefix="splitserve-up-"))
        self.model: Optional[str] = None
        self.model_is_demo = False
        self.plan: Optional[StackPlan] = None
        self._children: dict[str, list[ChildProcess]] = {}
        self.supervisor: Optional[Supervisor] = None
        self._started = False
        self._stopped = False

    # --- what callers read once started -------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """The OpenAI API root, e.g. http://127.0.0.1:8000/v1."""
        return self._plan.base_url

    @property
    def http_url(self) -> str:
        """The server root without /v1 (for /health and /metrics)."""
        return self._plan.base_url.removesuffix("/v1")

    @property
    def gateway_urls(self) -> list[str]:
        """Each gateway replica's own OpenAI API root (Envoy's base_url spreads requests over them)."""
        return self._plan.gateway_urls

    @property
    def grpc_address(self) -> str:
        """HOST:PORT of the public gRPC API (splitserve.v1.Gateway)."""
        return self._plan.grpc_address

    @property
    def redis_url(self) -> str:
        return self._plan.redis_url

    @property
    def addresses(self) -> dict[str, list[str]]:
        """gRPC addresses by role: tokenizer, kv-store, prefill, decode, gateway (its own port, behind Envoy)."""
        return self._plan.addresses

    @property
    def metrics_ports(self) -> dict[str, list[int]]:
        return {role: [spec.metrics_port for spec in self._specs() if spec.role == role]
                for role in {spec.role for spec in self._specs() if spec.metrics_port is not None}}

    @property
    def children(self) -> list[ChildProcess]:
        return [child for group in self._children.values() for child in group]

    @property
    def restarts(self) -> dict[str, int]:
        """How often each child has been restarted, by name (e.g. {"tokenizer-0": 1})."""
        return dict(self.supervisor.restarts) if self.supervisor is not None else {}

    def process(self, role: str, index: int = 0) -> ChildProcess:
        try:
            return self._children[role][index]
        except (KeyError, IndexError):
            raise KeyError(f"no {role} process #{index}; started: {sorted(self._children)}") from None

    @property
    def _plan(self) -> StackPlan:
        if self.plan is None:
            raise RuntimeError("the stack has not been started")
        return self.plan

    def _specs(self) -> list[ServiceSpec]:
        return [spec for tier in self._plan.tiers for spec in tier]

    # --- lifecycle ------------------------------------------------------------------------------------------------
    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> "Stack":
        if self._started:
            raise RuntimeError("a Stack starts once; make a new one")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        config = self.config
        for port, flag in ((config.port, "--port"), (config.grpc_port, "--grpc-port")):
            if port:
                ensure_free(config.host, port, flag)
        self.model, self.model_is_demo = resolve_model(config.model)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        public = {config.port, config.grpc_port}
        internal_ports = iter([p for p in free_ports(ports_needed(config)) if p not in public])
        redis_password = new_secret() if config.redis_url is None else None
        self.plan = plan_stack(
            config, self.model, self.log_dir, internal_ports,
            redis_binary=find_redis_server() if config.redis_url is None else None,
            envoy_binary=find_envoy() if config.envoy else None,
            service_command=self.service_command, extra_args=self.extra_args,
            redis_password=redis_password, cluster_token=config.cluster_token or new_secret())
        if self.plan.envoy_ports is not None:
            write_envoy_config(self.plan.envoy_config_path, self.plan.envoy_ports)
        if self.plan.redis_config_path is not None:
            write_redis_config(self.plan.redis_config_path, redis_password)
        deadline = time.monotonic() + config.startup_timeout_s
        for tier in self.plan.tiers:
            for spec in tier:
                child = ChildProcess(spec.name, spec.argv, self.log_dir / f"{spec.name}.log", child_env(spec.env))
                self._children.setdefault(spec.role, []).append(child)
                child.start()
            self._wait_ready(tier, deadline)
        if config.redis_url is not None and urlsplit(config.redis_url).password is None:
            log.warning("--redis-url has no password: whoever reaches that Redis can rewrite the worker registry "
                        "(workers must still prove the cluster token before they get requests)")
        if config.redis_url is not None and not probe.is_ready("redis", config.redis_url):
            log.warning("Redis at %s does not answer (or refuses the credentials); the gateway routes by load "
                        "alone until it does", redact_url(config.redis_url))
        self.supervisor = Supervisor(self.children, RestartPolicy(config.max_restarts, config.restart_window_s))
        self.supervisor.start()

    def _wait_ready(self, tier: list[ServiceSpec], deadline: float) -> None:
        pending = {spec.name: list(spec.probes) for spec in tier}
        by_name = {child.name: child for child in self.children}
        reasons: dict[str, str] = {}
        while True:
            for name in list(pending):
                child = by_name[name]
                if child.returncode is not None:
                    raise StackStartError(
                        f"{name} exited with {describe_exit(child.returncode)} while the stack was starting. "
                        f"Last lines of {child.log_path}:\n{child.log_tail()}")
                timeout_s = max(0.05, min(1.0, deadline - time.monotonic()))
                while pending[name]:
                    kind, target = pending[name][0]
                    try:
                        probe.CHECKS[kind](target, timeout_s)
                    except probe.NotReady as exc:
                        reasons[name] = str(exc)
                        break
                    pending[name].pop(0)
                if not pending[name]:
                    del pending[name]
                    log.info("%s is ready", name)
            if not pending:
                return
            if time.monotonic() >= deadline:
                name = sorted(pending)[0]
                child = by_name[name]
                raise StackStartError(
                    f"not ready after {self.config.startup_timeout_s:.0f} s: {', '.join(sorted(pending))} "
                    f"({reasons.get(name, 'no answer')}). Last lines of {child.log_path}:\n{child.log_tail()}")
            time.sleep(POLL_S)

    def stop(self) -> None:
        """Stops everything started, front to back (gateway and Envoy first, Redis last). Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self.supervisor is not None:
            self.supervisor.stop()  # before any child is stopped, so none is restarted
        grace_s = self.config.grace_s + KILL_MARGIN_S
        for roles in STOP_ORDER:
            stop_together([c for role in roles for c in self._children.get(role, [])], grace_s)
        log.info("stack stopped")
