"""Prefill and decode as real processes with a real kv-store between them: the handoff reproduces the offline
engine token for token, every way the blocks can go missing still serves the request (and is counted), and
cancelling a stream frees its blocks."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request

import grpc
import pytest
from prefill_reply import prefill_reply
from service_process import start_service

from splitserve import LLM, SamplingParams
from splitserve.launcher.ports import free_ports
from splitserve.proto_convert import sampling_params_to_proto
from splitserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from splitserve.serving.errors import param_from_error
from splitserve.token_bytes import TokenBytes

pytestmark = pytest.mark.timeout(300)
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def workers(llama_ckpt, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("worker-logs")
    store_port, prefill_port, decode_port, prefill_metrics, decode_metrics, prefill2_port = free_ports(6)
    store = f"127.0.0.1:{store_port}"
    common = ["--model", str(llama_ckpt), "--torch-threads", "1", "--num-kv-blocks", "64",
              "--kv-store-address", store, "--grace-s", "5"]
    children = []
    try:
        children.append(start_service("kv-store", ["kv-store", "--port", str(store_port)], log_dir, store))
        children.append(start_service("prefill", ["prefill", "--port", str(prefill_port), "--metrics-port",
                                           str(prefill_metrics), *common], log_dir, f"127.0.0.1:{prefill_port}"))
        children.append(start_service("decode", ["decode", "--port", str(decode_port), "--metrics-port",
                                          str(decode_metrics), *common], log_dir, f"127.0.0.1:{decode_port}"))
        children.append(start_service("prefill2", ["prefill", "--port", str(prefill2_port), *common], log_dir,
                               f"127.0.0.1:{prefill2_port}"))
        yield {"prefill": f"127.0.0.1:{prefill_port}", "decode": f"127.0.0.1:{decode_port}", "store": store,
               "prefill2": f"127.0.0.1:{prefill2_port}",
               "decode_metrics": f"http://127.0.0.1:{decode_metrics}/metrics", "children": children}
    finally:
        for child in reversed(children):
            child.send_signal(signal.SIGTERM)
        for child in children:
            if child.wait(15) is None:
                child.kill()


@pytest.fixture(scope="module")
def reference(llama_ckpt):
    return LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=128)


def _prefill(workers, prompt, params, request_id, worker="prefill"):
    async def go():
        async with grpc.aio.insecure_channel(workers[worker]) as channel:
            return await prefill_reply(prefill_pb2_grpc.PrefillStub(channel), prefill_pb2.PrefillRequest(
                request_id=request_id, prompt_token_ids=prompt, sampling_params=sampling_params_to_proto(params)),
                timeout=60)
    return asyncio.run(go())


def _decode(workers, prompt, params, request_id, first=None, handle=None, prior=()):
    async def go():
        async with grpc.aio.insecure_channel(workers["decode"]) as channel:
            produced = [first] if first is not None else list(prior)
            request = decode_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                                                 sampling_params=sampling_params_to_proto(params),
                                                 produced_token_ids=produced)
            if handle is not None:
                request.kv_handle.CopyFrom(handle)
            return [chunk async for chunk in decode_pb2_grpc.DecodeStub(channel).Generate(request, timeout=60)]
    return asyncio.run(go())


def _stats(workers, kind):
    async def go():
        async with grpc.aio.insecure_channel(workers[kind]) as channel:
            if kind == "prefill":
                return (await prefill_pb2_grpc.PrefillStub(channel).Stats(common_pb2.WorkerStatsRequest())).engine
            return (await decode_pb2_grpc.DecodeStub(channel).Stats(common_pb2.WorkerStatsRequest())).engine
    return asyncio.run(go())


def _metric(workers, line_start):
    text = urllib.request.urlopen(workers["decode_metrics"], timeout=5).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values)


def _pools_whole(workers):
    for _ in range(50):
        stats = [_stats(workers, "prefill"), _stats(workers, "decode")]
        if all(s.num_running == 0 and s.kv_blocks_free == s.kv_blocks_total for s in stats):
            return True
        time.sleep(0.1)
    return False


def _tokens(chunks):
    return [t for c in chunks for t in c.token_ids]


@pytest.mark.parametrize("length", [7, 70])
def test_handoff_equals_offline_engine(workers, reference, length):
    prompt = list(range(10, 10 + length))
    [expected] = reference.generate([prompt], GREEDY)
    expected = expected.outputs[0].token_ids
    got_before = _metric(workers, 'splitserve_kv_transfer_blocks_total{direction="get"}')
    first = _prefill(workers, prompt, GREEDY, f"h{length}")
    assert first.first_token_id == expected[0]
    assert first.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
    assert len(first.kv_handle.block_hashes.hashes) == length // 16
    chunks = _decode(workers, prompt, GREEDY, f"h{length}", first.first_token_id,
                     first.kv_handle if first.HasField("kv_handle") else None)
    assert [first.first_token_id] + _tokens(chunks) == expected
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == length and last.usage.completion_tokens == len(expected)
    assert last.usage.cached_tokens == (length // 16) * 16
    assert _metric(workers, 'splitserve_kv_transfer_blocks_total{direction="get"}') - got_before == length // 16
    assert _pools_whole(workers)


def test_missing_blocks_and_wrong_layout_are_recomputed_and_counted(workers, reference):
    prompt = list(range(200, 260))
    [expected] = reference.generate([prompt], GREEDY)
    expected = expected.outputs[0].token_ids
    first = _prefill(workers, prompt, GREEDY, "m1")
    handle = common_pb2.KVHandle()
    handle.CopyFrom(first.kv_handle)
    handle.block_hashes.hashes[1] = b"\x01" * 16  # the chain breaks after the first block
    before = _metric(workers, 'splitserve_decode_kv_recompute_total{reason="missing_blocks"}')
    chunks = _decode(workers, prompt, GREEDY, "m1", first.first_token_id, handle)
    assert [first.first_token_id] + _tokens(chunks) == expected
    assert _metric(workers, 'splitserve_decode_kv_recompute_total{reason="missing_blocks"}') == before + 1

    handle.CopyFrom(first.kv_handle)
    handle.layout.dtype = "float16"
    chunks = _decode(workers, prompt, GREEDY, "m2", first.first_token_id, handle)
    assert [first.first_token_id] + _tokens(chunks) == expected
    assert _metric(workers, 'splitserve_decode_kv_recompute_total{reason="layout_mismatch"}') >= 1

    # A prompt the decode worker has not cached yet (it now holds the one above: nothing would be pulled).
    prompt = list(range(500, 560))
    [expected] = reference.generate([prompt], GREEDY)
    first = _prefill(workers, prompt, GREEDY, "m3")
    handle.CopyFrom(first.kv_handle)
    handle.store_address = "127.0.0.1:1"  # nothing listens there
    chunks = _decode(workers, prompt, GREEDY, "m3", first.first_token_id, handle)
    assert [first.first_token_id] + _tokens(chunks) == expected.outputs[0].token_ids
    assert _metric(workers, 'splitserve_decode_kv_recompute_total{reason="transfer_failed"}') >= 1
    assert _pools_whole(workers)


def test_decode_pulls_only_the_blocks_its_prefix_cache_lacks(workers, reference):
    shorter = list(range(600, 600 + 16 * 2 + 5))    # 2 full blocks
    longer = shorter[:32] + list(range(700, 740))   # the same 2, then 2 more full blocks and a tail
    missing = 'splitserve_decode_kv_recompute_total{reason="missing_blocks"}'
    missing_before = _metric(workers, missing)
    for request_id, prompt in (("p1", shorter), ("p2", longer)):
        [expected] = reference.generate([prompt], GREEDY)
        pulled_before = _metric(workers, 'splitserve_kv_transfer_blocks_total{direction="get"}')
        first = _prefill(workers, prompt, GREEDY, request_id)
        chunks = _decode(workers, prompt, GREEDY, request_id, first.first_token_id, first.kv_handle)
        assert [first.first_token_id] + _tokens(chunks) == expected.outputs[0].token_ids
        assert chunks[-1].usage.cached_tokens == len(prompt) // 16 * 16
        # The second prompt's first 2 blocks are still in decode's prefix cache: only the other 2 are pulled.
        assert _metric(workers, 'splitserve_kv_transfer_blocks_total{direction="get"}') - pulled_before == 2
    assert _metric(workers, missing) == missing_before  # what decode holds itself is not missing
    assert _pools_whole(workers)


def test_a_second_prefill_worker_reuses_blocks_from_the_store(workers, reference):
    prompt = list(range(300, 300 + 16 * 5 + 3))  # 5 full blocks
    [expected] = reference.generate([prompt], GREEDY)
    first = _prefill(workers, prompt, GREEDY, "x1")
    assert first.cached_tokens == 0
    again = _prefill(workers, prompt, GREEDY, "x2", worker="prefill2")
    assert again.cached_tokens == 5 * 16  # read from the kv-store, not computed
    assert again.first_token_id == first.first_token_id == expected.outputs[0].token_ids[0]
    assert list(again.kv_handle.block_hashes.hashes) == list(first.kv_handle.block_hashes.hashes)
    chunks = _decode(workers, prompt, GREEDY, "x2", again.first_token_id, again.kv_handle)
    assert [again.first_token_id] + _tokens(chunks) == expected.outputs[0].token_ids


def test_workers_make_the_offline_text_stop_strings_and_logprob_pieces(workers, reference):
    prompt = list(range(110, 150))
    text = reference.generate([prompt], GREEDY)[0].outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    params = GREEDY.replace(stop=[stop], logprobs=2)
    [expected] = reference.generate([prompt], params)
    expected = expected.outputs[0]
    assert expected.stop_reason == stop
    first = _prefill(workers, prompt, params, "t1")
    chunks = _decode(workers, prompt, params, "t1", first.first_token_id, first.kv_handle)
    assert [first.first_token_id] + _tokens(chunks) == expected.token_ids
    assert first.first_text + "".join(c.text for c in chunks) == expected.text == text[:text.find(stop)]
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert chunks[-1].stop_reason.stop_string == stop
    # Logprob entries carry each token's own text and real bytes, for the chosen token and the alternatives.
    tokenizer = reference.get_tokenizer()
    entries = [first.first_token_logprob] + [lp for c in chunks for lp in c.logprobs]
    assert [e.token_id for e in entries] == expected.token_ids
    for entry in entries:
        for piece in [entry, *entry.top]:
            assert piece.token == tokenizer.decode([piece.token_id], skip_special_tokens=False)
            assert piece.token_bytes == TokenBytes(tokenizer)(piece.token_id)
    assert _pools_whole(workers)


def test_a_resumed_sequence_with_every_token_made_still_sends_its_held_back_text(workers, reference):
    # The previous worker streamed all max_tokens tokens but died before its last chunk: what it held back (the
    # tail that could start a stop string) is all that is left to send.
    prompt = list(range(160, 190))
    text = reference.generate([prompt], GREEDY)[0].outputs[0].text
    params = GREEDY.replace(stop=[text[-2:] + "\u00a7\u00a7"])
    [expected] = reference.generate([prompt], params)
    assert expected.outputs[0].text == text and expected.outputs[0].finish_reason == "length"
    [last] = _decode(workers, prompt, params, "r1", prior=expected.outputs[0].token_ids)
    assert (last.text, last.finish_reason, list(last.token_ids)) == (text[-2:], common_pb2.FINISH_REASON_LENGTH, [])


def test_local_prefill_on_decode(workers, reference):
    prompt = list(range(40, 90))
    [expected] = reference.generate([prompt], GREEDY)
    assert _tokens(_decode(workers, prompt, GREEDY, "local")) == expected.outputs[0].token_ids


def test_first_token_can_finish_the_request(workers):
    first = _prefill(workers, list(range(5, 40)), GREEDY.replace(max_tokens=1), "one")
    assert first.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert not first.kv_handle.block_hashes.hashes  # nothing to hand over


def test_min_tokens_reaches_both_workers(workers, reference):
    # The greedy first token as a stop id: it ends the request at prefill, unless min_tokens holds it back there
    # (the prefill worker samples the first token) and in decode.
    prompt = list(range(60, 100))
    greedy = GREEDY.replace(ignore_eos=False)
    stop_id = reference.generate([prompt], greedy)[0].outputs[0].token_ids[0]
    stopped = _prefill(workers, prompt, greedy.replace(stop_token_ids=[stop_id]), "mt0")
    assert (stopped.first_token_id, stopped.finish_reason) == (stop_id, common_pb2.FINISH_REASON_STOP)

    params = greedy.replace(stop_token_ids=[stop_id], min_tokens=6)
    [expected] = reference.generate([prompt], params)
    expected = expected.outputs[0].token_ids
    assert len(expected) >= 6 and stop_id not in expected[:6]
    first = _prefill(workers, prompt, params, "mt1")
    assert (first.first_token_id, first.finish_reason) == (expected[0], common_pb2.FINISH_REASON_UNSPECIFIED)
    chunks = _decode(workers, prompt, params, "mt1", first.first_token_id, first.kv_handle)
    assert [first.first_token_id] + _tokens(chunks) == expected
    assert _pools_whole(workers)


def test_invalid_requests_are_refused_with_the_param(workers):
    params = sampling_params_to_proto(GREEDY)
    params.top_p = 1.5

    async def go(kind):
        async with grpc.aio.insecure_channel(workers[kind]) as channel:
            if kind == "prefill":
                await prefill_reply(prefill_pb2_grpc.PrefillStub(channel), prefill_pb2.PrefillRequest(
                    request_id="bad", prompt_token_ids=[1, 2], sampling_params=params), timeout=10)
            else:
                async for _ in decode_pb2_grpc.DecodeStub(channel).Generate(decode_pb2.GenerateRequest(
                        request_id="bad", prompt_token_ids=[5000], sampling_params=sampling_params_to_proto(GREEDY)),
                        timeout=10):
                    pass

    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(go("prefill"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and param_from_error(info.value) == "top_p"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(go("decode"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt token ids" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _decode(workers, [5, 6, 7], GREEDY, "bad-produced", prior=[10**6])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert param_from_error(info.value) == "produced_token_ids"
    assert _pools_whole(workers)


def test_cancelling_the_stream_frees_decode_blocks(workers):
    async def go():
        async with grpc.aio.insecure_channel(workers["decode"]) as channel:
            call = decode_pb2_grpc.DecodeStub(channel).Generate(decode_pb2.GenerateRequest(
                request_id="long", prompt_token_ids=list(range(1, 100)),
                sampling_params=sampling_params_to_proto(GREEDY.replace(max_tokens=800))), timeout=60)
            seen = 0
            async for _ in call:
                seen += 1
                if seen == 3:
                    call.cancel()
                    break
        return seen

    assert asyncio.run(go()) == 3
    assert _pools_whole(workers)


def test_sigterm_drains_and_exits_zero(workers):
    """Last in this module: stops the workers. An in-flight stream finishes; new work is refused."""
    async def go():
        async with grpc.aio.insecure_channel(workers["decode"]) as channel:
            stub = decode_pb2_grpc.DecodeStub(channel)
            call = stub.Generate(decode_pb2.GenerateRequest(
                request_id="drain", prompt_token_ids=list(range(1, 30)),
                sampling_params=sampling_params_to_proto(GREEDY.replace(max_tokens=200))), timeout=60)
            first = await call.read()
            decode = next(c for c in workers["children"] if c.name == "decode")
            decode.send_signal(signal.SIGTERM)
            chunks = [first]
            while (chunk := await call.read()) is not grpc.aio.EOF:
                chunks.append(chunk)
            return chunks

    chunks = asyncio.run(go())
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(_tokens(chunks)) == 200
    for child in workers["children"]:
        if child.name == "decode":
            assert child.wait(20) == 0, child.log_tail()
        else:
            child.send_signal(signal.SIGTERM)
            assert child.wait(20) == 0, child.log_tail()
