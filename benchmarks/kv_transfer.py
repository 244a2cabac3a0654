"""KV block transfer throughput: the UCX path the services use, against raw UCX, the TCP fallback and memcpy.

For N blocks of a real model's size (16 tokens of Llama-3-8B = 2 MiB) and of a small one, in GB/s:
  (a)  UcxKVTransport.put_blocks / get_blocks through a real `splitserve kv-store --kv-transport ucx` process
       with rows in memory (get into a fresh tensor, and into a reused buffer `out=`); and from one paged KV
       cache to another for scattered block ids, as prefill and decode move a prompt: (a*) in place (lent
       cache blocks gathered straight into the store's slots, slots read where they lie into the cache), and
       (a~) through exported copies (export_blocks, put, get, import_blocks: the services before in place);
  (b)  raw UCX between two processes with one big buffer and no control plane: RMA into UCX-allocated memory
       (the mechanism (a) uses), and ucxx tag send/recv over a listener endpoint (the issue's baseline);
  (c)  the TCP fallback (GrpcKVTransport: PutBlocks/GetBlocks streams) through the same store;
  (d)  memcpy of the same bytes in one process (the ceiling).
A "move" is a put plus a get of the same blocks (prefill -> store -> decode): 2 x bytes / (put + get time).
Each figure is the median of timed repetitions after warm-ups (the store's slots and the buffers are then
resident, as in a running server). Then (unless --no-ttft) it starts the stack and reports TTFT disaggregated
minus TTFT aggregated for 512- and 2048-token prompts, as a fraction of the prefill time.
Last line: `ucx_path_vs_raw: X.XX` = move GB/s of (a) / move GB/s of the faster raw (b), 2 MiB blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the TTFT model is written with a progress bar

import torch  # noqa: E402

torch.set_num_threads(1)

from splitserve.v1 import common_pb2  # noqa: E402

MiB = 1 << 20


@dataclass(frozen=True)
class BlockShape:
    name: str
    layout: common_pb2.KVLayout
    count: int

    @property
    def size(self) -> int:
        from splitserve.kv_transfer.store_client import block_bytes

        return block_bytes("benchmark", self.layout)

    @property
    def total(self) -> int:
        return self.size * self.count


def shapes(quick: bool) -> list[BlockShape]:
    llama = common_pb2.KVLayout(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16",
                                model_fingerprint="bench-llama3-8b")
    small = common_pb2.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype="float32",
                                model_fingerprint="bench-small")
    return [BlockShape("2 MiB (16 tokens of Llama-3-8B)", llama, 50 if quick else 100),
            BlockShape("32 KiB (16 tokens, 2 layers x 2 KV heads x 64, fp32)", small, 1000 if quick else 2000)]


@dataclass
class Row:
    label: str
    put: Optional[float] = None  # GB/s
    get: Optional[float] = None
    note: str = ""

    @property
    def move(self) -> Optional[float]:
        if self.put is None or self.get is None:
            return None
        return 2 / (1 / self.put + 1 / self.get)


@dataclass
class Reps:
    warmup: int
    timed: int
    times: dict[str, list[float]] = field(default_factory=dict)


_HOST_MEMORY = None


def host_tensor(num_rows: int, row_bytes: int, fill: str) -> torch.Tensor:
    """Every buffer of every path comes from the same kind of memory (huge pages, faulted in), as the services'
    receive buffers do: otherwise a 4 KiB-page buffer's TLB misses (measured: 3-4 GB/s against 8-13 GB/s for a
    200 MiB copy here) would decide the comparison instead of the paths."""
    global _HOST_MEMORY
    from splitserve.kv_transfer.host_buffers import ReceiveBuffers

    if _HOST_MEMORY is None:
        _HOST_MEMORY = ReceiveBuffers(max_idle_bytes=0)
    tensor = _HOST_MEMORY.rows(num_rows, row_bytes)
    if fill == "random":
        tensor.copy_(torch.randint(0, 256, tensor.shape, dtype=torch.uint8))
    else:
        tensor.fill_(0)
    return tensor


def gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


async def timed_async(fn: Callable[[], Awaitable]) -> float:
    started = time.perf_counter()
    await fn()
    return time.perf_counter() - started


# ---- processes ---------------------------------------------------------------------------------------------

def start_store(capacity: int, log_dir: Path) -> tuple[subprocess.Popen, str]:
    from splitserve.launcher.ports import free_ports
    from splitserve.launcher.probe import is_ready

    [port] = free_ports(1)
    log = open(log_dir / f"kv-store-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "splitserve.services.cli", "kv-store", "--port", str(port),
                             "--kv-transport", "ucx", "--capacity-bytes", str(capacity), "--log-level", "WARNING"],
                            stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not is_ready("grpc", address, 0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"kv-store did not start; see {log.name}")
        time.sleep(0.1)
    return proc, address


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_helper(*args: str) -> tuple[subprocess.Popen, dict]:
    """This script in a helper role; it prints one JSON line when ready and exits when its stdin closes."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"helper {args} did not start")
    return proc, json.loads(line)


# ---- (a) and (c): the transports through a kv-store ---------------------------------------------------------

@dataclass
class StoreRates:
    put: float
    get: float  # into a new tensor per call, as the services do
    reused_get: Optional[float]  # into one staging buffer kept across calls


async def through_store(transport, address: str, shape: BlockShape, reps: Reps, reused_get: bool) -> StoreRates:
    blocks = host_tensor(shape.count, shape.size, "random")
    staging = host_tensor(shape.count, shape.size, "zero")  # resident, as a reused staging buffer would be
    put_s, get_s, reused_s = [], [], []
    for rep in range(reps.warmup + reps.timed):
        hashes = [random.randbytes(16) for _ in range(shape.count)]  # new blocks: a real write each time
        put = await timed_async(lambda: transport.put_blocks(address, shape.layout, hashes, blocks, timeout_s=120))
        got: list[torch.Tensor] = []

        async def get():
            got.append(await transport.get_blocks(address, shape.layout, hashes, timeout_s=120))

        fetch = await timed_async(get)
        if got[0].shape[0] != shape.count or not torch.equal(got[0][-1], blocks[-1]):
            raise RuntimeError(f"{transport.name}: the blocks did not come back intact")
        got.clear()
        if reused_get:
            reused = await timed_async(lambda: transport.get_blocks(address, shape.layout, hashes, timeout_s=120,
                                                                     out=staging))
        if rep >= reps.warmup:
            put_s.append(put)
            get_s.append(fetch)
            if reused_get:
                reused_s.append(reused)
    return StoreRates(gbps(shape.total, put_s), gbps(shape.total, get_s),
                      gbps(shape.total, reused_s) if reused_get else None)


def paged_cache(shape: BlockShape, num_blocks: int, fill: str) -> list[torch.Tensor]:
    """An engine's KV cache in the shape's layout: `[2, num_blocks, block_size, heads, head_dim]` per layer, the
    layers of one tensor (as ModelRunner allocates them)."""
    layout = shape.layout
    dtype = getattr(torch, layout.dtype)
    per_layer = 2 * num_blocks * layout.block_size * layout.num_kv_heads * layout.head_dim
    element = torch.empty((), dtype=dtype).element_size()
    memory = host_tensor(layout.num_layers, per_layer * element, fill)
    return [memory[i].view(dtype).view(2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
            for i in range(layout.num_layers)]


async def cache_to_cache(transport, address: str, shape: BlockShape, reps: Reps, in_place: bool) -> Row:
    """Prefill's cache -> store -> decode's cache for scattered block ids, as the services move a prompt:
    in place (lent blocks gathered into the slots; slots read where they lie) or through exported copies."""
    from splitserve.engine.block_io import CacheBlocks, export_blocks, import_blocks

    num_blocks = shape.count + 16
    source, target = paged_cache(shape, num_blocks, "random"), paged_cache(shape, num_blocks, "zero")
    rng = random.Random(shape.count)
    put_s, get_s = [], []
    for rep in range(reps.warmup + reps.timed):
        hashes = [random.randbytes(16) for _ in range(shape.count)]
        source_ids, target_ids = rng.sample(range(num_blocks), shape.count), rng.sample(range(num_blocks), shape.count)
        if in_place:
            put = await timed_async(lambda: transport.put_blocks(address, shape.layout, hashes,
                                                                 CacheBlocks(source, source_ids), timeout_s=120))

            async def get():
                def write(runs):
                    for first, view in runs:
                        import_blocks(target, target_ids[first:first + view.shape[0]], view, layout_of(shape))

                async with transport.pinned_blocks(address, shape.layout, hashes, timeout_s=120) as received:
                    received.read(write)
        else:
            async def put_copy():
                await transport.put_blocks(address, shape.layout, hashes, export_blocks(source, source_ids),
                                           timeout_s=120)

            put = await timed_async(put_copy)

            async def get():
                rows = await transport.get_blocks(address, shape.layout, hashes, timeout_s=120)
                import_blocks(target, target_ids, rows, layout_of(shape))

        fetch = await timed_async(get)
        if not torch.equal(export_blocks(target, target_ids[-1:]), export_blocks(source, source_ids[-1:])):
            raise RuntimeError("cache to cache: the blocks did not arrive intact")
        if rep >= reps.warmup:
            put_s.append(put)
            get_s.append(fetch)
    label = ("(a*) cache->store->cache in place (services now)" if in_place
             else "(a~) cache->store->cache via copies (services before)")
    return Row(label, gbps(shape.total, put_s), gbps(shape.total, get_s))


def layout_of(shape: BlockShape):
    from splitserve.proto_convert import layout_from_proto

    return layout_from_proto(shape.layout)


def run_transports(shape: BlockShape, reps: Reps, log_dir: Path, checksum_row: bool) -> list[Row]:
    from splitserve.kv_transfer.grpc_transport import GrpcKVTransport
    from splitserve.kv_transfer.ucx_transport import UcxKVTransport

    # Room for two rounds: once warm, each put evicts the oldest round and reuses its (resident) slots.
    proc, address = start_store(2 * shape.total + shape.size, log_dir)
    rows = []
    try:
        async def measure():
            ucx = UcxKVTransport(checksum=False)
            try:
                a = await through_store(ucx, address, shape, reps, reused_get=True)
                in_place = await cache_to_cache(ucx, address, shape, reps, in_place=True)
                copied = await cache_to_cache(ucx, address, shape, reps, in_place=False)
            finally:
                await ucx.close()
            rows.append(Row("(a)  UCX path, UcxKVTransport: get into a new tensor", a.put, a.get))
            rows.append(Row("(a') UCX path, get into a reused buffer (out=)", a.put, a.reused_get))
            rows.extend([in_place, copied])
            if checksum_row:
                ucx = UcxKVTransport(checksum=True)
                try:
                    ck = await through_store(ucx, address, shape, reps, reused_get=False)
                finally:
                    await ucx.close()
                rows.append(Row("(a)  UCX path with crc32 checksums", ck.put, ck.get))
            tcp = GrpcKVTransport(checksum=False)
            try:
                c = await through_store(tcp, address, shape, Reps(1, max(2, reps.timed // 2)), reused_get=False)
            finally:
                await tcp.close()
            rows.append(Row("(c)  TCP fallback, gRPC streams (--kv-transport tcp)", c.put, c.get))

        asyncio.run(measure())
    finally:
        stop(proc)
    return rows


# ---- (b) raw UCX ---------------------------------------------------------------------------------------------

def serve_raw_rma(nbytes: int) -> None:
    """Helper: one UCX-allocated buffer of `nbytes`, progressed until stdin closes."""
    import select as select_module

    from splitserve.kv_transfer import ucx_rma

    context = ucx_rma.new_context()
    worker = ucx_rma.ucx_api.UCXWorker(context)
    buffer = ucx_rma.Registration(context, nbytes)
    print(json.dumps({"worker": worker.address.tobytes().hex(), "address": buffer.address,
                      "rkey": buffer.packed_rkey.hex()}), flush=True)
    while not select_module.select([sys.stdin], [], [], 0)[0]:
        if not ucx_rma.progress(worker):
            time.sleep(0.0001)


def raw_rma(shape: BlockShape, reps: Reps) -> Row:
    from splitserve.kv_transfer import ucx_rma

    proc, info = start_helper("--serve-raw-rma", str(shape.total))
    try:
        context = ucx_rma.new_context()
        worker = ucx_rma.ucx_api.UCXWorker(context)
        worker.init_blocking_progress_mode()
        address = ucx_rma.ucx_api.UCXAddress.create_from_buffer(bytes.fromhex(info["worker"]))
        endpoint = ucx_rma.ucx_api.UCXEndpoint.create_from_worker_address(worker, address, True)
        rkey = ucx_rma.RemoteKey(endpoint, bytes.fromhex(info["rkey"]))
        mapped = rkey.local_pointer(info["address"])
        src = host_tensor(1, shape.total, "random")[0]
        dst = host_tensor(1, shape.total, "zero")[0]

        def move(to_remote: bool) -> float:
            started = time.perf_counter()
            if mapped is not None:
                ctypes.memmove(mapped, src.data_ptr(), shape.total) if to_remote else \
                    ctypes.memmove(dst.data_ptr(), mapped, shape.total)
            else:
                operations = ucx_rma.Operations(worker, endpoint)
                if to_remote:
                    operations.put(src.data_ptr(), shape.total, info["address"], rkey)
                    operations.flush()
                else:
                    operations.get(dst.data_ptr(), shape.total, info["address"], rkey)
                operations.wait(time.monotonic() + 120)
            return time.perf_counter() - started

        put_s, get_s = [], []
        for rep in range(reps.warmup + reps.timed):
            put, get = move(True), move(False)
            if rep >= reps.warmup:
                put_s.append(put)
                get_s.append(get)
        if not torch.equal(src, dst):
            raise RuntimeError("raw RMA: the buffer did not come back intact")
        rkey.destroy()
        endpoint.close_blocking()
        how = "mapped memcpy" if mapped is not None else "put/get"
        return Row(f"(b)  raw UCX RMA, one buffer ({how})", gbps(shape.total, put_s), gbps(shape.total, get_s))
    finally:
        proc.stdin.close()
        stop(proc)


def serve_raw_tag(nbytes: int) -> None:
    """Helper: a ucxx listener that receives `nbytes` messages and acknowledges each, until stdin closes."""
    import ucxx

    async def serve():
        buffer = torch.empty(nbytes, dtype=torch.uint8).numpy()
        ack = torch.ones(1, dtype=torch.uint8).numpy()

        async def handler(endpoint):
            try:
                while True:
                    await endpoint.recv(buffer)
                    await endpoint.send(ack)
            except Exception:  # the client closed its endpoint
                return

        listener = ucxx.create_listener(handler)
        print(json.dumps({"port": listener.port}), flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)
        listener.close()

    asyncio.run(serve())


def raw_tag(shape: BlockShape, reps: Reps) -> Row:
    import ucxx

    proc, info = start_helper("--serve-raw-tag", str(shape.total))
    try:
        async def measure():
            endpoint = await ucxx.create_endpoint("127.0.0.1", info["port"])
            src = torch.randint(0, 256, (shape.total,), dtype=torch.uint8).numpy()
            ack = torch.empty(1, dtype=torch.uint8).numpy()
            times = []
            for rep in range(reps.warmup + reps.timed):
                started = time.perf_counter()
                await endpoint.send(src)
                await endpoint.recv(ack)
                if rep >= reps.warmup:
                    times.append(time.perf_counter() - started)
            await endpoint.close()
            return times

        times = asyncio.run(measure())
        rate = gbps(shape.total, times)  # one direction measured; the other is the same mechanism
        return Row("(b2) raw ucxx tag send/recv, listener endpoint", rate, rate)
    finally:
        proc.stdin.close()
        stop(proc)


# ---- (d) memcpy ----------------------------------------------------------------------------------------------

def memcpy(shape: BlockShape, reps: Reps) -> Row:
    src = host_tensor(1, shape.total, "random")[0]
    dst = host_tensor(1, shape.total, "zero")[0]
    times = []
    for rep in range(reps.warmup + reps.timed):
        started = time.perf_counter()
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), shape.total)
        if rep >= reps.warmup:
            times.append(time.perf_counter() - started)
    rate = gbps(shape.total, times)
    return Row("(d)  memcpy, one process, warm buffers", rate, rate)


def checksum_rate(shape: BlockShape) -> float:
    from splitserve.kv_blocks.checksum import row_crc32s

    rows = torch.randint(0, 256, (min(shape.count, 64), shape.size), dtype=torch.uint8)
    started = time.perf_counter()
    row_crc32s(rows)
    return rows.numel() / (time.perf_counter() - started) / 1e9


# ---- TTFT on the running stack -------------------------------------------------------------------------------

def ttft_overhead(quick: bool, log_dir: Path) -> list[str]:
    """TTFT through a gateway that always disaggregates and one that never does, on the same workers."""
    import httpx

    from splitserve.demo_model import build_checkpoint
    from splitserve.launcher.ports import free_ports
    from splitserve.launcher.probe import is_ready
    from splitserve.launcher.stack import Stack, child_env

    model = build_checkpoint(log_dir / "ttft-model", "llama", hidden_size=256, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=688,
                             max_position_embeddings=4096)
    samples = 5 if quick else 9
    lines = []
    with Stack(model=str(model), envoy=False, torch_threads=1, local_prefill_threshold=0, num_kv_blocks=1024,
               max_num_batched_tokens=2048, prefill_decider="threshold", log_dir=str(log_dir / "ttft-stack"), log_level="WARNING") as stack:
        [spec] = [s for tier in stack.plan.tiers for s in tier if s.role == "gateway"]
        http_port, grpc_port, metrics_port = free_ports(3)
        aggregated = subprocess.Popen(
            [*spec.argv, "--port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port",
             str(metrics_port), "--local-prefill-threshold", str(1 << 30)],
            env=child_env(spec.env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            aggregated_url = f"http://127.0.0.1:{http_port}/v1"
            deadline = time.monotonic() + 60
            while not is_ready("http", f"http://127.0.0.1:{http_port}/health", 0.5):
                if time.monotonic() > deadline or aggregated.poll() is not None:
                    raise RuntimeError("the aggregated gateway did not start")
                time.sleep(0.2)
            rng = random.Random(0)
            with httpx.Client(timeout=120) as client:
                [served] = [m["id"] for m in client.get(f"{stack.base_url}/models").json()["data"]]

                def ttft(url: str, length: int) -> float:
                    prompt = [rng.randrange(3, 1000) for _ in range(length)]  # new each time: no prefix reuse
                    started = time.perf_counter()
                    with client.stream("POST", f"{url}/completions", json={
                            "model": served, "prompt": prompt, "max_tokens": 2, "stream": True,
                            "temperature": 0.0}) as response:
                        response.raise_for_status()
                        for line in response.iter_lines():
                            if line.startswith("data:") and '"text"' in line:
                                return time.perf_counter() - started
                    raise RuntimeError("no token streamed")

                for length in (512, 2048):
                    ttft(stack.base_url, length), ttft(aggregated_url, length)  # warm-up
                    pairs = [(ttft(stack.base_url, length), ttft(aggregated_url, length)) for _ in range(samples)]
                    disagg = statistics.median(d for d, _ in pairs)  # interleaved: drift hits both alike
                    agg = statistics.median(a for _, a in pairs)
                    lines.append(f"  {length:5d} tokens: TTFT aggregated {agg * 1000:7.1f} ms, disaggregated "
                                 f"{disagg * 1000:7.1f} ms, overhead {(disagg - agg) * 1000:+7.1f} ms = "
                                 f"{(disagg - agg) / agg:+.1%} of the prefill time")
        finally:
            stop(aggregated)
    return lines


# ---- main ----------------------------------------------------------------------------------------------------

def fmt(value: Optional[float]) -> str:
    return f"{value:8.2f}" if value is not None else "       -"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer blocks and repetitions: under 2 minutes")
    ap.add_argument("--ttft", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the TTFT overhead on a running stack (about 30 s)")
    ap.add_argument("--serve-raw-rma", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-raw-tag", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_raw_rma:
        return serve_raw_rma(args.serve_raw_rma)
    if args.serve_raw_tag:
        return serve_raw_tag(args.serve_raw_tag)

    import ucxx

    started = time.monotonic()
    reps = Reps(2, 5) if args.quick else Reps(3, 11)
    ucx_version = ".".join(map(str, ucxx.get_ucx_version()))
    print(f"KV transfer benchmark: {os.cpu_count()} CPUs, UCX {ucx_version}, ucxx {ucxx.__version__}, "
          f"UCX_TLS={os.environ.get('UCX_TLS', '(default)')}; store and client are separate processes on "
          f"127.0.0.1; medians of {reps.timed} runs after {reps.warmup} warm-ups")
    headline = None
    with tempfile.TemporaryDirectory(prefix="kv-transfer-bench-") as tmp:
        log_dir = Path(tmp)
        for shape in shapes(args.quick):
            rows = run_transports(shape, reps, log_dir, checksum_row=not args.quick)
            raws = [raw_rma(shape, reps), raw_tag(shape, reps)]
            ceiling = memcpy(shape, reps)
            rows = rows[:2] + raws + rows[2:] + [ceiling]
            print(f"\n{shape.count} blocks of {shape.name} = {shape.total / MiB:.0f} MiB per transfer")
            print(f"  {'path':56s} {'put GB/s':>8s} {'get GB/s':>8s} {'move GB/s':>9s}")
            for row in rows:
                print(f"  {row.label:56s} {fmt(row.put)} {fmt(row.get)} {fmt(row.move)}  {row.note}")
            a, a_reused, raw = rows[0], rows[1], max(raws, key=lambda r: r.move)
            print(f"  (a)/(b): put {a.put / raw.put:.2f}, get {a.get / raw.get:.2f}, move {a.move / raw.move:.2f} "
                  f"(get into a reused buffer: {a_reused.get / raw.get:.2f}, move {a_reused.move / raw.move:.2f});"
                  f" (a)/(d): put {a.put / ceiling.put:.2f}, get {a.get / ceiling.get:.2f}")
            [in_place] = [r for r in rows if r.label.startswith("(a*)")]
            [copied] = [r for r in rows if r.label.startswith("(a~)")]
            print(f"  cache to cache: in place / via copies: put {in_place.put / copied.put:.2f}, get "
                  f"{in_place.get / copied.get:.2f}, move {in_place.move / copied.move:.2f}; in place / (b) move "
                  f"{in_place.move / raw.move:.2f}")
            print(f"  crc32 checksum: {checksum_rate(shape):.2f} GB/s on one core (what each side pays when on)")
            if headline is None:
                headline = a.move / raw.move
        if args.ttft:
            print("\nTTFT overhead of disaggregation (same prefill and decode workers; demo-shaped Llama, 4 layers "
                  "x 256 hidden, CPU; aggregated = the decode worker prefills):")
            for line in ttft_overhead(args.quick, log_dir):
                print(line)
    print(f"\n(elapsed {time.monotonic() - started:.0f} s)")
    print(f"ucx_path_vs_raw: {headline:.2f}")


if __name__ == "__main__":
    main()
