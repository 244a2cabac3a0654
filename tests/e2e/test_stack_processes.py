"""The stack's processes as an operator sees them: every internal socket listens on loopback only, and a process
that dies is restarted on its own address while the rest keep serving (two tokenizer replicas: losing one costs
no request)."""

from __future__ import annotations

import ipaddress
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from splitserve.launcher.probe import is_ready
from splitserve.launcher.stack import Stack

pytestmark = pytest.mark.timeout(300)

LOOPBACK = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}


@pytest.fixture(scope="module")
def supervised_stack(llama_ckpt, tmp_path_factory):
    with Stack(model=str(llama_ckpt), tokenizer_replicas=2, prefill_workers=1, decode_workers=1, torch_threads=1,
               num_kv_blocks=256, grace_s=3, log_dir=str(tmp_path_factory.mktemp("supervised-logs"))) as running:
        yield running


def _complete(stack, prompt, max_tokens=4, stream=False):
    model = httpx.get(f"{stack.base_url}/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream}
    return httpx.post(f"{stack.base_url}/completions", json=body, timeout=60)


def _wait(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
        time.sleep(0.2)


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.getpgid(int(entry)) == pgid:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _address(hex_address: str) -> tuple[ipaddress._BaseAddress, int]:
    """/proc/net/tcp{,6} local_address: the address in host byte order per 32-bit word, then the port."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:  # gRPC binds IPv4 on a dual socket
        address = address.ipv4_mapped
    return address, int(port, 16)


def listening_sockets(pid: int) -> list[tuple[ipaddress._BaseAddress, int]]:
    """(address, port) of every TCP socket in LISTEN state that process `pid` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # st 0A: LISTEN
                found.append(_address(fields[1]))
    return found


def test_every_internal_socket_listens_on_loopback(supervised_stack):
    stack = supervised_stack
    # A prompt of several blocks, so prefill and decode have opened their UCX workers too.
    assert _complete(stack, list(range(5, 5 + 16 * 4 + 3))).status_code == 200
    listeners = {}
    for child in stack.children:
        for pid in _group_pids(child.pid):
            listeners.setdefault(child.name, []).extend(listening_sockets(pid))
    exposed = {name: [f"{a}:{p}" for a, p in sockets if a not in LOOPBACK] for name, sockets in listeners.items()}
    assert not any(exposed.values()), f"listening beyond loopback: {exposed}"
    # The check saw UCX's own listener: the kv-store listens on more than its gRPC and metrics ports.
    store_ports = {int(stack.addresses["kv-store"][0].rsplit(":", 1)[1]), stack.metrics_ports["kv-store"][0]}
    assert {p for _, p in listeners["kv-store"]} - store_ports, listeners["kv-store"]


def test_a_killed_tokenizer_costs_no_request_and_comes_back(supervised_stack):
    stack = supervised_stack
    victim = stack.process("tokenizer", 0)
    old_pid = victim.pid
    victim.kill()
    # At once and together, before the gateway's next health check: some calls find the dead replica first.
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda i: _complete(stack, f"after the tokenizer died {i}", stream=bool(i % 2)),
                                  range(6)))
    for response in responses:
        assert response.status_code == 200, response.text
        assert "error" not in response.text
    _wait(lambda: victim.alive and victim.pid != old_pid, 30, "the tokenizer's restart")
    _wait(lambda: is_ready("grpc", stack.addresses["tokenizer"][0], 1.0), 60, "the restarted tokenizer's health")
    assert stack.restarts["tokenizer-0"] == 1
    assert _complete(stack, "served again").status_code == 200


def test_the_only_decode_worker_is_restarted_and_serves_again(supervised_stack):
    stack = supervised_stack
    victim = stack.process("decode", 0)
    old_pid = victim.pid
    victim.kill()
    _wait(lambda: victim.alive and victim.pid != old_pid, 30, "the decode worker's restart")
    _wait(lambda: is_ready("grpc", stack.addresses["decode"][0], 1.0), 120, "the restarted decode worker's health")
    # The gateway notices it on its next health check; until then it answers 503.
    _wait(lambda: httpx.get(f"{stack.http_url}/health", timeout=5).status_code == 200, 30, "the gateway's health")
    for prompt in ("after the restart", list(range(7, 7 + 16 * 3))):
        response = _complete(stack, prompt)
        assert response.status_code == 200, response.text
    assert stack.restarts["decode-0"] == 1
