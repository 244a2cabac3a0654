"""The tokenizer service as deployed: a `splitserve tokenizer` process spoken to over gRPC and HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoTokenizer

from splitserve.demo_model import build_tokenizer, demo_checkpoint
from splitserve.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from splitserve.serving.errors import param_from_error
from splitserve.serving.grpc_service import CHANNEL_OPTIONS, insecure_channel
from splitserve.services.tokenizer.servicer import TokenizerServicer
from splitserve.services.tokenizer.tokenizer_model import TokenizerModel

SERVICE = "splitserve.v1.Tokenizer"
MULTI_BYTE_TEXT = ("Grüße aus Kraków! 日本語のテキスト、東京と大阪。中文：你好，世界！한국어 안녕하세요. "
                   "Emoji 🙂🚀🎉 family 👩‍👩‍👧 flag 🇯🇵 math ∑∫√∞≈ ") * 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, metrics_port: int, log_path):
        self.proc = proc
        self.address = f"127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text()


def _health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    demo_checkpoint()  # build it here, once, so the server's start is not a race with the build
    port, metrics_port = _free_port(), _free_port()
    log_path = tmp_path_factory.mktemp("tokenizer-service") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve.services.cli", "tokenizer", "--port", str(port),
             "--metrics-port", str(metrics_port), "--grace-s", "10"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, port, metrics_port, log_path)
    try:
        with grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, f"tokenizer exited with {proc.returncode}:\n{server.log()}"
                assert time.monotonic() < deadline, f"tokenizer not SERVING after 90 s:\n{server.log()}"
                try:
                    if _health(channel) == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return tokenizer_pb2_grpc.TokenizerStub(channel)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_checkpoint())


def _chat(*turns: tuple[str, str]) -> common_pb2.ChatMessages:
    return common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in turns])


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_health_is_serving_for_the_server_and_the_service(channel):
    assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert _health(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING


def test_the_service_runs_without_torch(server, channel):
    """Tokenizing needs no torch; with it loaded (transformers imports it) each replica held ~250 MiB more."""
    assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    with open(f"/proc/{server.proc.pid}/maps") as f:
        assert "libtorch" not in f.read()


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_tokenize_text_gives_the_tokenizers_ids(stub, tokenizer, add_special_tokens):
    response = stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=MULTI_BYTE_TEXT,
                                                           add_special_tokens=add_special_tokens))
    assert list(response.token_ids) == tokenizer.encode(MULTI_BYTE_TEXT, add_special_tokens=add_special_tokens)
    assert response.rendered_prompt == ""


def test_a_long_text_does_not_stall_other_calls(stub, tokenizer):
    text = MULTI_BYTE_TEXT * 600  # ~0.5 s of tokenization, done off the event loop
    start = time.monotonic()
    big = stub.Tokenize.future(tokenizer_pb2.TokenizeRequest(text=text))
    time.sleep(0.2)
    before = time.monotonic()
    stub.GetInfo(tokenizer_pb2.GetInfoRequest())
    info_seconds = time.monotonic() - before
    assert list(big.result(timeout=60).token_ids) == tokenizer.encode(text, add_special_tokens=False)
    big_seconds = time.monotonic() - start
    assert info_seconds < big_seconds / 3, (info_seconds, big_seconds)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tokenize_chat_renders_the_template(stub, tokenizer, add_generation_prompt):
    turns = [("system", "Answer in one word."), ("user", "Wie heißt die Hauptstadt? 🙂")]
    response = stub.Tokenize(tokenizer_pb2.TokenizeRequest(chat=_chat(*turns),
                                                           add_generation_prompt=add_generation_prompt))
    expected = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    assert response.rendered_prompt == expected
    assert list(response.token_ids) == tokenizer.encode(expected, add_special_tokens=False)
    assert response.rendered_prompt.endswith("<|im_start|>assistant\n") is add_generation_prompt


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_detokenize(stub, tokenizer, skip_special_tokens):
    ids = tokenizer.encode(MULTI_BYTE_TEXT) + [tokenizer.eos_token_id]
    response = stub.Detokenize(tokenizer_pb2.DetokenizeRequest(token_ids=ids,
                                                               skip_special_tokens=skip_special_tokens))
    assert response.text == MULTI_BYTE_TEXT + ("" if skip_special_tokens else "<|endoftext|>")


def test_token_pieces_give_each_tokens_text_and_real_bytes(stub, tokenizer):
    ids = tokenizer.encode(MULTI_BYTE_TEXT) + [tokenizer.eos_token_id]
    pieces = stub.TokenPieces(tokenizer_pb2.TokenPiecesRequest(token_ids=ids)).pieces
    assert [p.text for p in pieces] == [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert b"".join(p.token_bytes for p in pieces) == (MULTI_BYTE_TEXT + "<|endoftext|>").encode()
    assert any(p.text == "\ufffd" for p in pieces)  # parts of characters: their bytes are not U+FFFD's
    error = _error(lambda: stub.TokenPieces(tokenizer_pb2.TokenPiecesRequest(token_ids=[5, 100000])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and param_from_error(error) == "token_ids"


def test_get_info(stub):
    info = stub.GetInfo(tokenizer_pb2.GetInfoRequest())
    assert info.model == str(demo_checkpoint())
    assert info.vocab_size == 1000
    assert list(info.eos_token_ids) == [0]
    assert not info.HasField("bos_token_id")
    assert info.max_context_length == 2048
    assert info.has_chat_template


@pytest.mark.parametrize("request_, param, words", [
    (tokenizer_pb2.TokenizeRequest(text=""), "prompt", "empty"),
    (tokenizer_pb2.TokenizeRequest(), "prompt", "empty"),
    (tokenizer_pb2.TokenizeRequest(chat=_chat()), "messages", "empty"),
    (tokenizer_pb2.TokenizeRequest(chat=_chat(("user", "hi"), ("robot", "beep"))), "messages", "'robot'"),
], ids=["empty-text", "no-input", "no-messages", "unknown-role"])
def test_tokenize_errors_are_invalid_argument_with_the_param(stub, request_, param, words):
    error = _error(lambda: stub.Tokenize(request_))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert param_from_error(error) == param
    assert words in error.details()


def test_unknown_ids_are_invalid_argument_naming_the_id(stub):
    error = _error(lambda: stub.Detokenize(tokenizer_pb2.DetokenizeRequest(token_ids=[5, 1234])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1234" in error.details() and param_from_error(error) == "token_ids"


def test_chat_without_a_template_is_failed_precondition(tmp_path):
    # The same servicer in this process, over a real channel, on a base model's tokenizer.
    build_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    model = TokenizerModel.load(str(tmp_path))

    async def call() -> grpc.aio.AioRpcError:
        server = grpc.aio.server()
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(model), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with insecure_channel(f"127.0.0.1:{port}") as channel:
                request = tokenizer_pb2.TokenizeRequest(chat=_chat(("user", "hi")))
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await tokenizer_pb2_grpc.TokenizerStub(channel).Tokenize(request)
                return caught.value
        finally:
            await server.stop(None)

    error = asyncio.run(call())
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no chat template" in error.details()


def test_metrics_count_calls_by_method_and_code(server, stub):
    stub.GetInfo(tokenizer_pb2.GetInfoRequest())
    _error(lambda: stub.Tokenize(tokenizer_pb2.TokenizeRequest(text="")))
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = no_proxy.open(server.metrics_url, timeout=5).read().decode()
    assert 'splitserve_tokenizer_requests_total{code="OK",method="GetInfo"}' in text
    assert 'splitserve_tokenizer_requests_total{code="INVALID_ARGUMENT",method="Tokenize"}' in text
    assert 'splitserve_tokenizer_request_seconds_count{method="GetInfo"}' in text


def test_sigterm_turns_not_serving_then_exits_cleanly(server, channel, stub):
    # Last in this module: it stops the shared server.
    assert stub.GetInfo(tokenizer_pb2.GetInfoRequest()).vocab_size == 1000
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while server.proc.poll() is None:
        try:
            status = _health(channel, SERVICE)
        except grpc.RpcError:
            break  # already gone
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING or time.monotonic() < deadline
        time.sleep(0.05)
    assert server.proc.wait(timeout=10) == 0
    assert "tokenizer stopped" in server.log()
