"""A kv-store outlives its workers: workers restarted on a changed checkpoint (same folder, same file size, same
first and last 64 KiB, other weights in the middle) must not be served the old model's blocks. Real processes;
greedy output after the restart equals the new checkpoint's offline output."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import struct

import grpc
import pytest
from prefill_reply import prefill_reply
from service_process import start_service

from splitserve import LLM, SamplingParams
from splitserve.demo_model import build_checkpoint
from splitserve.launcher.ports import free_ports
from splitserve.proto_convert import sampling_params_to_proto
from splitserve.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # ~65 s: two worker starts
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
EDGE = 64 << 10
# Layer 0's K and V projections lie in the middle of the tiny checkpoint's single file: new ones change the KV.
SWAPPED = ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight")


def _tensor_ranges(path) -> dict[str, tuple[int, int]]:
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    return {name: (8 + header_len + info["data_offsets"][0], 8 + header_len + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__"}


def _swap_middle_tensors(target, donor) -> None:
    """Writes the donor's SWAPPED tensors over the target's, in place: size, head and tail stay as they were."""
    ranges, donor_ranges = _tensor_ranges(target), _tensor_ranges(donor)
    size = target.stat().st_size
    donor_bytes = donor.read_bytes()
    with open(target, "r+b") as f:
        for name in SWAPPED:
            start, end = ranges[name]
            assert EDGE <= start and end <= size - EDGE and donor_ranges[name][1] - donor_ranges[name][0] == end - start
            f.seek(start)
            f.write(donor_bytes[donor_ranges[name][0]:donor_ranges[name][1]])
    assert target.stat().st_size == size


def _stop(children) -> None:
    for child in reversed(children):
        child.send_signal(signal.SIGTERM)
    for child in children:
        if child.wait(15) is None:
            child.kill()


def _generate(prefill: str, decode: str, prompt: list[int], request_id: str) -> list[int]:
    async def go():
        params = sampling_params_to_proto(GREEDY)
        async with grpc.aio.insecure_channel(prefill) as channel:
            first = await prefill_reply(prefill_pb2_grpc.PrefillStub(channel), prefill_pb2.PrefillRequest(
                request_id=request_id, prompt_token_ids=prompt, sampling_params=params), timeout=60)
        request = decode_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, sampling_params=params,
                                             produced_token_ids=[first.first_token_id])
        request.kv_handle.CopyFrom(first.kv_handle)
        async with grpc.aio.insecure_channel(decode) as channel:
            chunks = [c async for c in decode_pb2_grpc.DecodeStub(channel).Generate(request, timeout=60)]
        return [first.first_token_id] + [t for c in chunks for t in c.token_ids]

    return asyncio.run(go())


def test_workers_restarted_on_a_changed_checkpoint_get_no_stale_kv(tmp_path, llama_ckpt):
    model = tmp_path / "ckpt" / "model"
    shutil.copytree(llama_ckpt, model)
    donor = build_checkpoint(tmp_path / "donor", "llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1, seed=1)
    prompts = [list(range(20 + i, 20 + i + 16 * 4 + 3)) for i in range(6)]  # 4 full blocks each
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    store_port, prefill_port, decode_port = free_ports(3)
    store, prefill, decode = (f"127.0.0.1:{p}" for p in (store_port, prefill_port, decode_port))

    def workers():
        common = ["--model", str(model), "--torch-threads", "1", "--num-kv-blocks", "64", "--kv-store-address",
                  store, "--grace-s", "5"]
        return [start_service("prefill", ["prefill", "--port", str(prefill_port), *common], log_dir, prefill),
                start_service("decode", ["decode", "--port", str(decode_port), *common], log_dir, decode)]

    kv_store = start_service("kv-store", ["kv-store", "--port", str(store_port)], log_dir, store)
    try:
        running = workers()
        try:
            before = [_generate(prefill, decode, p, f"m1-{i}") for i, p in enumerate(prompts)]
        finally:
            _stop(running)
        _swap_middle_tensors(model / "model.safetensors", donor / "model.safetensors")
        running = workers()
        try:
            after = [_generate(prefill, decode, p, f"m2-{i}") for i, p in enumerate(prompts)]
        finally:
            _stop(running)
    finally:
        _stop([kv_store])

    reference = LLM(str(model), dtype="float32", device="cpu", num_kv_blocks=128)
    expected = [out.outputs[0].token_ids for out in reference.generate(prompts, GREEDY)]
    assert after == expected
    assert before != after  # the change is visible in the output, so stale KV would have been caught
