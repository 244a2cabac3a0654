"""The gRPC contracts: checked-in stubs match the .proto files, and every message survives the wire.

The staleness check regenerates the stubs with scripts/gen_protos.sh into a temp dir and compares bytes, so
editing a .proto without regenerating (or hand-editing a stub) fails here rather than between services.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest

grpc_tools = pytest.importorskip("grpc_tools")
grpc = pytest.importorskip("grpc")

from google.protobuf import descriptor as _descriptor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
STUB_ROOT = REPO / "shared"
GEN_SCRIPT = REPO / "scripts" / "gen_protos.sh"
PKG = "splitserve.v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")

PROTO_NAMES = sorted(p.stem for p in (PROTO_ROOT / "splitserve" / "v1").glob("*.proto"))


def _generated_files(root: Path) -> dict[str, bytes]:
    v1 = root / "splitserve" / "v1"
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(v1.iterdir())
        if p.name.endswith(GENERATED_SUFFIXES)
    }


def _generator_version(files: dict[str, bytes]) -> str | None:
    for text in files.values():
        m = re.search(rb"^GRPC_GENERATED_VERSION = '([^']+)'", text, re.M)
        if m:
            return m.group(1).decode()
    return None


# Lines that only record which grpcio-tools/protobuf generated a stub.
_VERSION_STAMPS = [
    (re.compile(rb"^# Protobuf Python Version: .*$", re.M), b"# Protobuf Python Version: X"),
    (re.compile(rb"(_runtime_version\.Domain\.PUBLIC,\s*)\d+,\s*\d+,\s*\d+,\s*'[^']*',"), rb"\1X,"),
    (re.compile(rb"^GRPC_GENERATED_VERSION = '[^']+'$", re.M), b"GRPC_GENERATED_VERSION = 'X'"),
]


def _strip_version_stamps(text: bytes) -> bytes:
    for pattern, repl in _VERSION_STAMPS:
        text = pattern.sub(repl, text)
    return text


def test_every_proto_is_in_package_splitserve_v1():
    assert PROTO_NAMES, "no .proto files found"
    for name in PROTO_NAMES:
        text = (PROTO_ROOT / "splitserve" / "v1" / f"{name}.proto").read_text()
        assert re.search(r"^package splitserve\.v1;$", text, re.M), name
        assert re.search(r'^syntax = "proto3";$', text, re.M), name


def test_checked_in_stubs_are_up_to_date(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "LC_ALL": "C"}
    result = subprocess.run(
        ["bash", str(GEN_SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"gen_protos.sh failed:\n{result.stdout}\n{result.stderr}"

    fresh = _generated_files(tmp_path)
    checked_in = _generated_files(STUB_ROOT)
    hint = "checked-in stubs are stale: run scripts/gen_protos.sh and commit shared/splitserve/v1/"
    assert sorted(fresh) == sorted(checked_in), hint
    assert len(fresh) == 3 * len(PROTO_NAMES)

    same_tools = _generator_version(fresh) == _generator_version(checked_in)
    for name in sorted(fresh):
        if same_tools:
            assert fresh[name] == checked_in[name], f"{name}: {hint}"
        else:
            # Another grpcio-tools release stamps other versions into the files; the contract must still match.
            assert _strip_version_stamps(fresh[name]) == _strip_version_stamps(checked_in[name]), (
                f"{name}: {hint} (checked in with grpcio-tools {_generator_version(checked_in)}, "
                f"this environment has {_generator_version(fresh)})"
            )


@pytest.mark.parametrize("name", PROTO_NAMES)
def test_modules_import_and_services_have_stubs(name):
    pb2 = importlib.import_module(f"{PKG}.{name}_pb2")
    pb2_grpc = importlib.import_module(f"{PKG}.{name}_pb2_grpc")
    assert pb2.DESCRIPTOR.package == "splitserve.v1"
    assert pb2.DESCRIPTOR.name == f"splitserve/v1/{name}.proto"
    for service in pb2.DESCRIPTOR.services_by_name.values():
        for attr in (f"{service.name}Stub", f"{service.name}Servicer", f"add_{service.name}Servicer_to_server"):
            assert hasattr(pb2_grpc, attr), f"{name}_pb2_grpc lacks {attr}"


def test_expected_services_and_methods():
    expected = {
        # No per-token method: generated text comes from the engines, with the tokens.
        "tokenizer": {"Tokenizer": {"Tokenize", "Detokenize", "GetInfo", "TokenPieces"}},
        "prefill": {"Prefill": {"Prefill", "Stats"}},
        "decode": {"Decode": {"Generate", "Stats"}},
        "kv_store": {
            "KVStore": {"Reserve", "Commit", "Lookup", "Pin", "Release", "Stats", "Discard", "PutBlocks",
                        "GetBlocks"}
        },
        "gateway": {"Gateway": {"Generate"}},
    }
    for name, services in expected.items():
        pb2 = importlib.import_module(f"{PKG}.{name}_pb2")
        got = {s.name: {m.name for m in s.methods} for s in pb2.DESCRIPTOR.services_by_name.values()}
        assert got == services, name
    kv = importlib.import_module(f"{PKG}.kv_store_pb2").DESCRIPTOR.services_by_name["KVStore"]
    assert kv.methods_by_name["PutBlocks"].client_streaming
    assert kv.methods_by_name["GetBlocks"].server_streaming
    for name, service in (("decode", "Decode"), ("gateway", "Gateway")):
        svc = importlib.import_module(f"{PKG}.{name}_pb2").DESCRIPTOR.services_by_name[service]
        assert svc.methods_by_name["Generate"].server_streaming


def test_sampling_params_covers_engine_fields():
    from splitserve.sampling_params import SamplingParams as EngineParams

    common = importlib.import_module(f"{PKG}.common_pb2")
    proto_fields = set(common.SamplingParams.DESCRIPTOR.fields_by_name)
    engine_fields = {f.name for f in dataclasses.fields(EngineParams) if not f.name.startswith("_")}
    assert engine_fields <= proto_fields, f"missing in common.proto: {sorted(engine_fields - proto_fields)}"


def test_optional_sampling_fields_keep_presence():
    """temperature=0 (greedy) must stay distinguishable from 'unset' (engine default 1.0) on the wire."""
    common = importlib.import_module(f"{PKG}.common_pb2")
    unset = common.SamplingParams.FromString(common.SamplingParams().SerializeToString())
    for field in ("max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "logprobs", "n"):
        assert not unset.HasField(field), field
    greedy = common.SamplingParams.FromString(common.SamplingParams(temperature=0.0, seed=0).SerializeToString())
    assert greedy.HasField("temperature") and greedy.temperature == 0.0
    assert greedy.HasField("seed") and greedy.seed == 0


_SCALARS = {
    _descriptor.FieldDescriptor.TYPE_DOUBLE: 0.5,
    _descriptor.FieldDescriptor.TYPE_FLOAT: 0.25,  # exact in float32, so equality after the round trip holds
    _descriptor.FieldDescriptor.TYPE_INT64: -7,
    _descriptor.FieldDescriptor.TYPE_UINT64: 7,
    _descriptor.FieldDescriptor.TYPE_INT32: -3,
    _descriptor.FieldDescriptor.TYPE_UINT32: 3,
    _descriptor.FieldDescriptor.TYPE_SINT32: -5,
    _descriptor.FieldDescriptor.TYPE_SINT64: -5,
    _descriptor.FieldDescriptor.TYPE_BOOL: True,
    _descriptor.FieldDescriptor.TYPE_STRING: "héllo ✓",
    _descriptor.FieldDescriptor.TYPE_BYTES: b"\x00\xff" * 8,
}


def _is_repeated(field) -> bool:
    # protobuf >= 6.32 has is_repeated and deprecates label; older releases only have label.
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == _descriptor.FieldDescriptor.LABEL_REPEATED


def _fill(msg, depth: int = 0):
    """Sets every field (one member per oneof) to a non-default value, recursing into sub-messages."""
    for field in msg.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        # A proto3 `optional` is a one-field synthetic oneof; only real oneofs are limited to one member.
        if oneof is not None and len(oneof.fields) > 1 and msg.WhichOneof(oneof.name) is not None:
            continue
        is_repeated = _is_repeated(field)
        if field.type == _descriptor.FieldDescriptor.TYPE_MESSAGE:
            if depth > 3:
                continue
            if field.message_type.GetOptions().map_entry:   # map<scalar, scalar>: one entry
                entry = field.message_type.fields_by_name
                getattr(msg, field.name)[_SCALARS[entry["key"].type]] = _SCALARS[entry["value"].type]
                continue
            if is_repeated:
                for _ in range(2):
                    _fill(getattr(msg, field.name).add(), depth + 1)
            else:
                _fill(getattr(msg, field.name), depth + 1)
                getattr(msg, field.name).SetInParent()
            continue
        if field.type == _descriptor.FieldDescriptor.TYPE_ENUM:
            value = field.enum_type.values[-1].number
        else:
            value = _SCALARS[field.type]
        if is_repeated:
            getattr(msg, field.name).extend([value, value])
        else:
            setattr(msg, field.name, value)
    return msg


def _all_messages():
    for name in PROTO_NAMES:
        pb2 = importlib.import_module(f"{PKG}.{name}_pb2")
        stack = list(pb2.DESCRIPTOR.message_types_by_name.values())
        while stack:
            desc = stack.pop()
            stack.extend(desc.nested_types)
            yield f"{name}.{desc.full_name}", desc


@pytest.mark.parametrize("desc", [d for _, d in _all_messages()], ids=[n for n, _ in _all_messages()])
def test_every_message_round_trips(desc):
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(desc)
    msg = _fill(cls())
    data = msg.SerializeToString()
    back = cls.FromString(data)
    assert back == msg
    assert back.SerializeToString() == data
    if desc.fields:
        assert data, f"{desc.full_name} serialized to nothing although every field was set"


def test_decode_stream_over_a_real_channel():
    """The generated stubs work end to end: a server-streaming Generate through an in-process server."""
    common = importlib.import_module(f"{PKG}.common_pb2")
    decode_pb2 = importlib.import_module(f"{PKG}.decode_pb2")
    decode_grpc = importlib.import_module(f"{PKG}.decode_pb2_grpc")

    class Echo(decode_grpc.DecodeServicer):
        def Generate(self, request, context):
            for tok in request.prompt_token_ids:
                yield decode_pb2.GenerateChunk(token_ids=[tok])
            yield decode_pb2.GenerateChunk(
                finish_reason=common.FINISH_REASON_LENGTH,
                usage=common.Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=3),
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    decode_grpc.add_DecodeServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = decode_grpc.DecodeStub(channel)
            request = decode_pb2.GenerateRequest(
                request_id="r1",
                prompt_token_ids=[5, 6, 7],
                sampling_params=common.SamplingParams(max_tokens=3, temperature=0.0),
            )
            chunks = list(stub.Generate(request, timeout=10))
    finally:
        server.stop(None)
    assert [list(c.token_ids) for c in chunks[:-1]] == [[5], [6], [7]]
    assert chunks[-1].finish_reason == common.FINISH_REASON_LENGTH
    assert chunks[-1].usage.prompt_tokens == 3
