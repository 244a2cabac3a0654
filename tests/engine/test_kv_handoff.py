"""The disaggregation hooks of the engine: a prefill engine exports a prompt's blocks and first token, a second
engine imports them and continues — and the result equals one engine doing everything, token for token."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from hf_reference import mixed_prompts
from splitserve import LLM, InvalidRequestError, SamplingParams
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.block_io import CacheBlocks, export_blocks, import_blocks
from splitserve.kv_blocks.checksum import row_crc32s
from splitserve.kv_transfer.metrics import KV_TRANSFER_FAILURES, KV_TRANSFER_SECONDS
from splitserve.kv_transfer.transport import ReceivedBlocks

VOCAB = 1000
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _engine(ckpt, **kw):
    return LLM(str(ckpt), dtype="float32", device="cpu", num_kv_blocks=kw.pop("num_kv_blocks", 96), **kw).engine


def _run(engine, request_id, prompt, params, **kw):
    engine.add_request(request_id, prompt, params, **kw)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    [out] = [o for o in outputs if o.request_id == request_id]
    return out


def _assert_pool_whole(engine):
    stats = engine.stats()
    assert stats["free_blocks"] == stats["num_blocks"], stats


@pytest.fixture(scope="module")
def engines(llama_ckpt):
    return _engine(llama_ckpt), _engine(llama_ckpt), LLM(str(llama_ckpt), dtype="float32", device="cpu")


def test_block_bytes_round_trip(engines):
    prefill, decode, _ = engines
    caches = prefill.runner.kv_caches
    for cache in caches:
        cache.normal_()
    rows = export_blocks(caches, [3, 7])
    assert rows.dtype == torch.uint8 and rows.shape == (2, prefill.layout.bytes_per_block)
    import_blocks(decode.runner.kv_caches, [10, 2], rows, decode.layout)
    for src, dst in zip(caches, decode.runner.kv_caches):
        assert torch.equal(src[:, 3], dst[:, 10]) and torch.equal(src[:, 7], dst[:, 2])
    with pytest.raises(ValueError, match="shape"):
        import_blocks(decode.runner.kv_caches, [1], rows, decode.layout)


def test_export_for_another_device_has_the_same_bytes(engines):
    """The branch GPU caches take (gather on the cache's device, then move) against the host branch."""
    prefill, _, _ = engines
    for cache in prefill.runner.kv_caches:
        cache.normal_()
    host = export_blocks(prefill.runner.kv_caches, [5, 1, 8])
    moved = export_blocks(prefill.runner.kv_caches, [5, 1, 8], out_device="cpu:0")
    assert torch.equal(host, moved)


def test_import_of_picked_rows(engines):
    """Blocks already cached on the decode side are skipped: only some received rows are written, in place."""
    prefill, decode, _ = engines
    caches = prefill.runner.kv_caches
    for cache in caches:
        cache.normal_()
    rows = export_blocks(caches, [3, 7, 9])
    import_blocks(decode.runner.kv_caches, [12, 4], rows, decode.layout, row_indices=[2, 0])
    import_blocks(decode.runner.kv_caches, [6, 8], rows, decode.layout, row_indices=[0, 1])  # a leading run
    for src, dst in zip(caches, decode.runner.kv_caches):
        assert torch.equal(src[:, 9], dst[:, 12]) and torch.equal(src[:, 3], dst[:, 4])
        assert torch.equal(src[:, 3], dst[:, 6]) and torch.equal(src[:, 7], dst[:, 8])
    with pytest.raises(ValueError, match="row_indices"):
        import_blocks(decode.runner.kv_caches, [1, 2], rows, decode.layout, row_indices=[0, 3])


@pytest.mark.parametrize("prompt_len", [5, 16, 47, 200])
def test_prefill_then_decode_equals_one_engine(engines, prompt_len):
    prefill, decode, offline = engines
    prompt = mixed_prompts(VOCAB, [prompt_len], seed=prompt_len)[0]
    [reference] = offline.generate([prompt], GREEDY)

    first = _run(prefill, f"p{prompt_len}", prompt, GREEDY.replace(max_tokens=1), export_kv=True)
    export = first.kv_export
    assert export is not None and len(export.block_hashes) == prompt_len // 16
    assert export.blocks.shape == (prompt_len // 16, prefill.layout.bytes_per_block)
    first_token = first.outputs[0].token_ids[0]
    assert first_token == reference.outputs[0].token_ids[0]

    computed_before = decode.stats()["prompt_tokens_computed"]
    held = decode.import_kv_blocks(export.block_hashes, export.blocks)
    assert len(held) == prompt_len // 16
    out = _run(decode, f"d{prompt_len}", prompt, GREEDY, first_token=(first_token, None, None), held_block_ids=held)
    assert out.outputs[0].token_ids == reference.outputs[0].token_ids
    # Only the tail after the last full block (and the first token) was computed on the decode side.
    assert decode.stats()["prompt_tokens_computed"] - computed_before == prompt_len % 16
    assert out.num_cached_tokens == (prompt_len // 16) * 16
    _assert_pool_whole(prefill)
    _assert_pool_whole(decode)


def test_import_stops_when_the_pool_is_full_and_releases_on_abort(llama_ckpt, engines):
    prefill, _, _ = engines
    small = _engine(llama_ckpt, num_kv_blocks=4)
    prompt = mixed_prompts(VOCAB, [100], seed=5)[0]
    export = _run(prefill, "full", prompt, GREEDY.replace(max_tokens=1), export_kv=True).kv_export
    held = small.import_kv_blocks(export.block_hashes, export.blocks)
    assert len(held) == 4 and small.stats()["free_blocks"] == 0
    small.add_request("x", prompt[:40], GREEDY, first_token=(1, None, None), held_block_ids=held)
    small.abort_request("x")
    _assert_pool_whole(small)
    # A refused request gives its held blocks back too.
    held = small.import_kv_blocks(export.block_hashes[:2], export.blocks[:2])
    with pytest.raises(InvalidRequestError):
        small.add_request("y", [], GREEDY, held_block_ids=held)
    _assert_pool_whole(small)


def test_async_engine_streams_and_cancels(llama_ckpt):
    engine = _engine(llama_ckpt)
    reference = LLM(str(llama_ckpt), dtype="float32", device="cpu").generate(
        [list(range(1, 30))], GREEDY)[0].outputs[0].token_ids

    async def main():
        runner = AsyncEngine(engine)
        runner.start()
        try:
            tokens, last = [], None
            async for delta in runner.generate("a", list(range(1, 30)), GREEDY):
                tokens += delta.token_ids
                last = delta
            assert tokens == reference and last.finish_reason == "length"
            assert last.num_output_tokens == 24 and last.num_prompt_tokens == 29

            # Leaving the stream early aborts the request and frees its blocks.
            stream = runner.generate("b", list(range(1, 30)), GREEDY.replace(max_tokens=500))
            async for _ in stream:
                break
            await stream.aclose()
            # Concurrent requests, one cancelled through abort().
            started = asyncio.Event()

            async def consume(rid):
                out = []
                async for delta in runner.generate(rid, list(range(5, 60)), GREEDY.replace(max_tokens=200)):
                    out.append(delta)
                    started.set()
                    await asyncio.sleep(0)
                return out
            task_a = asyncio.create_task(consume("c"))
            task_b = asyncio.create_task(consume("d"))
            await started.wait()
            assert runner.abort("c")
            a, b = await asyncio.gather(task_a, task_b)
            assert a[-1].finish_reason == "abort" and b[-1].finish_reason == "length"
            with pytest.raises(InvalidRequestError):
                async for _ in runner.generate("e", [], GREEDY):
                    pass
            await runner.wait_idle()
            for _ in range(50):
                if not engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.05)
        finally:
            await runner.stop()

    asyncio.run(main())
    _assert_pool_whole(engine)


def test_a_serving_engine_lends_its_blocks_instead_of_copying_them(llama_ckpt, engines):
    _, decode, offline = engines
    lender = _engine(llama_ckpt)
    returned = []
    lender.lend_exports(lambda: returned.append(True))  # a server loop wakes its engine thread with this
    prompt = mixed_prompts(VOCAB, [70], seed=11)[0]
    export = _run(lender, "lend", prompt, GREEDY.replace(max_tokens=1), export_kv=True).kv_export
    lent = export.blocks
    assert isinstance(lent, CacheBlocks) and lent.shape == (4, lender.layout.bytes_per_block)
    # The request is over, yet its prompt blocks stay held (not freed or reused) while the transfer runs.
    assert all(lender.pool.ref_count(b) == 1 for b in lent.block_ids)
    rows = lent.rows()
    assert torch.equal(rows, export_blocks(lender.runner.kv_caches, lent.block_ids))
    assert lent.row_crc32s() == row_crc32s(rows)  # computed in place over the cache, K then V, layer by layer
    part = torch.zeros((2, rows.shape[1]), dtype=torch.uint8)
    lent.subset([3, 1]).copy_rows_to(0, 2, part)
    assert torch.equal(part, rows[[3, 1]])
    export.release()
    export.release()  # once only
    assert returned == [True]
    assert all(lender.pool.ref_count(b) == 1 for b in lent.block_ids)  # taken back on the engine's thread only
    lender.reclaim_lent_blocks()
    _assert_pool_whole(lender)
    # What was lent is what a decode engine continues from.
    held = decode.import_kv_blocks(export.block_hashes, rows)
    out = _run(decode, "lent-d", prompt, GREEDY, first_token=(export_first_token(offline, prompt), None, None),
               held_block_ids=held)
    [reference] = offline.generate([prompt], GREEDY)
    assert out.outputs[0].token_ids == reference.outputs[0].token_ids
    _assert_pool_whole(decode)


def export_first_token(offline, prompt):
    [first] = offline.generate([prompt], GREEDY.replace(max_tokens=1))
    return first.outputs[0].token_ids[0]


def test_received_rows_copied_too_late_are_not_used(engines):
    prefill, decode, _ = engines
    prompt = mixed_prompts(VOCAB, [64], seed=12)[0]
    export = _run(prefill, "late", prompt, GREEDY.replace(max_tokens=1), export_kv=True).kv_export
    failures_before = KV_TRANSFER_FAILURES.labels("get", "received_rows_unusable")._value.get()
    cached_before = decode.stats()

    expired = ReceivedBlocks(4, [(0, export.blocks[:2]), (2, export.blocks[2:])], valid_until=time.monotonic() - 1,
                             mapped=True)
    assert decode.import_kv_blocks(export.block_hashes, expired) == []  # copied, but after the pin ran out
    given_back = ReceivedBlocks(4, [(0, export.blocks)], mapped=True)
    given_back.close()
    assert decode.import_kv_blocks(export.block_hashes, given_back) == []  # the transport took them back first
    assert KV_TRANSFER_FAILURES.labels("get", "received_rows_unusable")._value.get() == failures_before + 2
    assert decode.stats()["kv_load_failures"] == cached_before["kv_load_failures"] + 2
    assert all(decode.pool.lookup(h) is None for h in export.block_hashes)  # nothing of it became findable
    assert decode.stats()["free_blocks"] == cached_before["free_blocks"]

    in_time = ReceivedBlocks(4, [(0, export.blocks[:1]), (1, export.blocks[1:])], mapped=True)
    seconds_before = KV_TRANSFER_SECONDS.labels("get")._value.get()
    held = decode.import_kv_blocks(export.block_hashes, in_time)
    assert len(held) == 4
    assert KV_TRANSFER_SECONDS.labels("get")._value.get() > seconds_before  # the copy out of the store, timed
    for block_id, row in zip(held, export.blocks):
        assert torch.equal(export_blocks(decode.runner.kv_caches, [block_id])[0], row)
    for block_id in held:
        decode.pool.release(block_id)
    _assert_pool_whole(decode)


@pytest.mark.parametrize("layers,heads,head_dim,dtype", [(3, 8, 128, torch.bfloat16), (2, 2, 8, torch.float32)],
                         ids=["large-blocks-one-copy-each", "small-blocks-per-layer"])
def test_import_writes_the_same_bytes_whether_or_not_layers_share_one_tensor(layers, heads, head_dim, dtype):
    from splitserve.kv_blocks.layout import KVLayout
    from splitserve.engine.block_io import PER_BLOCK_COPY_BYTES, stacked_caches

    layout = KVLayout(layers, 16, heads, head_dim, dtype)
    stacked = list(torch.randn(layers, 2, 20, 16, heads, head_dim).to(dtype).unbind(0))  # as ModelRunner allocates
    separate = [cache.clone() for cache in stacked]
    assert stacked_caches(stacked) is not None and stacked_caches(separate) is None
    assert stacked_caches(stacked[::-1]) is None  # layers out of order are not one tensor's layers
    source = [torch.randn(2, 20, 16, heads, head_dim).to(dtype) for _ in range(layers)]
    rows = export_blocks(source, [1, 5, 9, 2])
    for caches in (stacked, separate):
        import_blocks(caches, [7, 3, 11], rows, layout, row_indices=[2, 0, 3])
        assert torch.equal(export_blocks(caches, [7, 3, 11]), rows[[2, 0, 3]])
    assert torch.equal(torch.stack(stacked), torch.stack(separate))  # and nothing else was touched
    assert (layout.bytes_per_block >= PER_BLOCK_COPY_BYTES) == (heads == 8)  # both paths are exercised


@pytest.mark.parametrize("already", [1, 9])
def test_resumed_sequence_continues_after_its_prior_output(engines, already):
    """Decode failover: a second engine gets the prompt's blocks and the tokens a failed worker produced; it
    recomputes that tail and continues exactly as one engine would have."""
    prefill, decode, offline = engines
    prompt = mixed_prompts(VOCAB, [70], seed=31)[0]
    [reference] = offline.generate([prompt], GREEDY)
    expected = reference.outputs[0].token_ids
    export = _run(prefill, f"rp{already}", prompt, GREEDY.replace(max_tokens=1), export_kv=True).kv_export
    held = decode.import_kv_blocks(export.block_hashes, export.blocks)
    out = _run(decode, f"rd{already}", prompt, GREEDY, held_block_ids=held, prior_output_ids=expected[:already])
    assert out.outputs[0].token_ids == expected
    assert out.num_cached_tokens == (70 // 16) * 16
    _assert_pool_whole(decode)
    with pytest.raises(InvalidRequestError, match="either"):
        decode.add_request("both", prompt, GREEDY, first_token=(1, None, None), prior_output_ids=[1])


def test_received_blocks_are_in_the_cache_once_add_request_returns(llama_ckpt, engines):
    """The serving engine's load is over when add_request returns, so the transport may end its pin right then;
    and what the prefix cache holds is asked on the engine's thread, never read from another."""
    prefill, _, offline = engines
    decode = _engine(llama_ckpt)
    prompt = mixed_prompts(VOCAB, [70], seed=13)[0]
    export = _run(prefill, "pin", prompt, GREEDY.replace(max_tokens=1), export_kv=True).kv_export
    first = export_first_token(offline, prompt)

    async def main():
        runner = AsyncEngine(decode)
        runner.start()
        try:
            assert await runner.cached_prefix_blocks(export.block_hashes) == 0
            received = ReceivedBlocks(4, [(0, export.blocks[:1]), (1, export.blocks[1:])], mapped=True)
            stream = await runner.add_request("pin-d", prompt, GREEDY, first_token=(first, None, None),
                                              kv_blocks=(export.block_hashes, received))
            received.close()  # what ending the pin does: the rows are gone from here on
            assert await runner.cached_prefix_blocks(export.block_hashes) == 4
            async with stream:
                return [token async for delta in stream for token in delta.token_ids]
        finally:
            await runner.stop()

    computed_before = decode.stats()["prompt_tokens_computed"]
    tokens = asyncio.run(main())
    [reference] = offline.generate([prompt], GREEDY)
    assert [first] + tokens == reference.outputs[0].token_ids
    assert decode.stats()["prompt_tokens_computed"] - computed_before == 70 % 16  # only the tail was computed
    _assert_pool_whole(decode)


def test_a_request_that_fails_on_the_engine_thread_ends_its_stream_with_an_error(engines):
    """The engine thread's exception must reach the caller (it once vanished, leaving the request hanging)."""
    _, decode, _ = engines

    async def main():
        runner = AsyncEngine(decode)
        runner.start()
        try:
            deltas = []
            stream = runner.generate("both", list(range(5, 40)), GREEDY, first_token=(7, None, None),
                                     prior_output_ids=[7])
            async for delta in stream:
                deltas.append(delta)
            return deltas
        finally:
            await runner.stop()

    deltas = asyncio.run(asyncio.wait_for(main(), 30))
    assert deltas[-1].finish_reason == "error" and "either" in deltas[-1].message
