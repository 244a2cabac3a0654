"""The disaggregation hooks of the engine: a prefill engine exports a prompt's blocks and first token, a second
engine loads them when it admits the request and continues — and the result equals one engine doing everything,
token for token. A load that cannot be trusted is computed instead, with the same result."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from hf_reference import mixed_prompts
from splitserve import LLM, InvalidRequestError, SamplingParams
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.block_io import CacheBlocks, export_blocks, import_blocks
from splitserve.engine.kv_connector import KVLoad, KVLoadError, RowsInMemory
from splitserve.kv_blocks.checksum import row_crc32s
from splitserve.kv_transfer.metrics import KV_TRANSFER_FAILURES, KV_TRANSFER_SECONDS
from splitserve.kv_transfer.transport import ReceivedBlocks

VOCAB = 1000
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _engine(ckpt, **kw):
    return LLM(str(ckpt), dtype="float32", device="cpu", num_kv_blocks=kw.pop("num_kv_blocks", 96), **kw).engine


def _run(engine, request_id, prompt, params, **kw):
    engine.add_request(request_id, prompt, params, **kw)
    return _finish(engine, request_id)


def _finish(engine, request_id):
    """Steps until nothing is left; the output of `request_id`."""
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
    decode.pool.reset_prefix_cache()  # blocks an earlier case left cached here would be found instead of loaded
    outcomes = []
    out = _run(decode, f"d{prompt_len}", prompt, GREEDY, produced_token_ids=[first_token],
               kv_load=KVLoad(export.block_hashes, export.blocks, outcomes.append))
    assert out.outputs[0].token_ids == reference.outputs[0].token_ids
    assert outcomes == [None]  # loaded (or, with no full block, nothing to load), and said so once
    # Only the tail after the last full block (and the first token) was computed on the decode side.
    assert decode.stats()["prompt_tokens_computed"] - computed_before == prompt_len % 16
    assert out.num_cached_tokens == (prompt_len // 16) * 16
    _assert_pool_whole(prefill)
    _assert_pool_whole(decode)


def test_a_seeded_sample_continued_in_another_engine_equals_one_engine(engines):
    """The decode engine's generator starts past the draw the prefill engine made for the first token, so a
    seeded request samples the same tokens whichever path it takes (local or remote prefill)."""
    prefill, decode, offline = engines
    prompt = mixed_prompts(VOCAB, [40], seed=6)[0]
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    [reference] = offline.generate([prompt], seeded)
    first = _run(prefill, "p-seeded", prompt, seeded.replace(max_tokens=1), export_kv=True)
    first_token = first.outputs[0].token_ids[0]
    assert first_token == reference.outputs[0].token_ids[0]
    export = first.kv_export
    out = _run(decode, "d-seeded", prompt, seeded, produced_token_ids=[first_token],
               kv_load=KVLoad(export.block_hashes, export.blocks, lambda error: None))
    assert out.outputs[0].token_ids == reference.outputs[0].token_ids
    _assert_pool_whole(prefill)
    _assert_pool_whole(decode)


class _CountingRows(RowsInMemory):
    def __init__(self, rows):
        super().__init__(rows)
        self.reads = 0

    def read(self, write):
        self.reads += 1
        super().read(write)


def _busy_engine(llama_ckpt):
    """An engine with one seat, taken by a running request: whatever comes next waits."""
    engine = _engine(llama_ckpt, max_num_seqs=1)
    engine.add_request("busy", mixed_prompts(VOCAB, [30], seed=40)[0], GREEDY)
    engine.step()
    return engine


def test_a_waiting_request_owns_no_cache_blocks_and_loads_at_admission(llama_ckpt, engines):
    prefill, _, offline = engines
    decode = _busy_engine(llama_ckpt)
    prompt, export, first = _exported(prefill, offline, "own", 41)
    rows, outcomes = _CountingRows(export.blocks), []
    decode.add_request("waits", prompt, GREEDY, produced_token_ids=[first],
                       kv_load=KVLoad(export.block_hashes, rows, outcomes.append))
    for _ in range(3):
        decode.step()
        [waiting] = decode.scheduler.waiting
        assert waiting.request_id == "waits" and waiting.block_ids == []
        assert decode.stats()["used_blocks"] == len(decode.scheduler.running[0].block_ids)
        assert rows.reads == 0 and outcomes == []  # the rows are still needed: nothing has read them yet

    # Aborted while it waits: the rows are no longer needed, at once (a pin on them can end).
    given_up = []
    decode.add_request("gives-up", prompt, GREEDY, produced_token_ids=[1],
                       kv_load=KVLoad(export.block_hashes, export.blocks, given_up.append))
    decode.abort_request("gives-up")
    assert given_up == [None]

    computed_before = decode.stats()["prompt_tokens_computed"]
    out = _finish(decode, "waits")
    assert out.outputs[0].token_ids == offline.generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert rows.reads == 1 and outcomes == [None]
    assert decode.stats()["prompt_tokens_computed"] - computed_before == 70 % 16  # loaded, not computed
    assert out.num_cached_tokens == 64
    _assert_pool_whole(decode)


def test_a_load_whose_pin_ran_out_while_it_waited_is_computed_instead(llama_ckpt, engines):
    prefill, _, offline = engines
    decode = _busy_engine(llama_ckpt)
    prompt, export, first = _exported(prefill, offline, "expires", 42)
    failures_before = KV_TRANSFER_FAILURES.labels("get", "received_rows_unusable")._value.get()
    pinned = ReceivedBlocks(4, [(0, export.blocks)], valid_until=time.monotonic() + 0.2, mapped=True)
    outcomes = []
    decode.add_request("late", prompt, GREEDY, produced_token_ids=[first],
                       kv_load=KVLoad(export.block_hashes, pinned, outcomes.append))
    decode.step()
    time.sleep(0.3)  # the request is still waiting for the busy one's seat when the pin runs out
    assert not pinned.in_time() and decode.scheduler.waiting[0].request_id == "late"
    computed_before = decode.stats()["prompt_tokens_computed"]
    out = _finish(decode, "late")
    assert out.outputs[0].token_ids == offline.generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert len(outcomes) == 1 and "ran out" in outcomes[0]
    assert decode.stats()["kv_load_failures"] == 1  # splitserve_kv_load_failures_total
    assert KV_TRANSFER_FAILURES.labels("get", "received_rows_unusable")._value.get() == failures_before + 1
    assert decode.stats()["prompt_tokens_computed"] - computed_before == 70  # the whole prompt, computed
    _assert_pool_whole(decode)


class _TornRows(RowsInMemory):
    """Rows whose copy ends untrusted after it wrote (garbage here): the engine must not use what it wrote."""

    def read(self, write):
        super().read(write)
        raise KVLoadError("the source stopped being guaranteed during the copy")


def test_a_load_that_fails_after_writing_is_computed_over(llama_ckpt, engines):
    prefill, _, offline = engines
    decode = _engine(llama_ckpt)
    prompt, export, first = _exported(prefill, offline, "torn", 43)
    garbage = torch.randint(0, 256, tuple(export.blocks.shape), dtype=torch.uint8)
    outcomes = []
    out = _run(decode, "torn-d", prompt, GREEDY, produced_token_ids=[first],
               kv_load=KVLoad(export.block_hashes, _TornRows(garbage), outcomes.append))
    assert out.outputs[0].token_ids == offline.generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert outcomes == ["the source stopped being guaranteed during the copy"]
    assert out.num_cached_tokens == 0 and decode.stats()["kv_load_failures"] == 1
    # The prefix cache holds what was computed (the prefill's values up to float rounding across batch shapes),
    # never the garbage the failed load wrote.
    block = decode.pool.lookup(export.block_hashes[0])
    cached = export_blocks(decode.runner.kv_caches, [block])[0].view(torch.float32)
    assert torch.allclose(cached, export.blocks[0].view(torch.float32), atol=1e-4)
    _assert_pool_whole(decode)


def test_received_blocks_for_another_prompt_are_not_loaded(llama_ckpt, engines):
    """Only rows named by the prompt's own block hashes are loaded: a handle for another prompt is ignored."""
    prefill, _, offline = engines
    decode = _engine(llama_ckpt)
    prompt, other = mixed_prompts(VOCAB, [70, 70], seed=44)
    export = _run(prefill, "other", other, GREEDY.replace(max_tokens=1), export_kv=True).kv_export
    rows = _CountingRows(export.blocks)
    out = _run(decode, "mismatch", prompt, GREEDY, produced_token_ids=[export_first_token(offline, prompt)],
               kv_load=KVLoad(export.block_hashes, rows))
    assert out.outputs[0].token_ids == offline.generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert rows.reads == 0 and out.num_cached_tokens == 0
    _assert_pool_whole(decode)


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
    out = _run(decode, "lent-d", prompt, GREEDY, produced_token_ids=[export_first_token(offline, prompt)],
               kv_load=KVLoad(export.block_hashes, rows))
    [reference] = offline.generate([prompt], GREEDY)
    assert out.outputs[0].token_ids == reference.outputs[0].token_ids
    _assert_pool_whole(decode)


def _exported(prefill, offline, name, seed):
    """A 70-token prompt, the blocks a prefill engine exported for it, and its first token."""
    prompt = mixed_prompts(VOCAB, [70], seed=seed)[0]
    export = _run(prefill, name, prompt, GREEDY.replace(max_tokens=1), export_kv=True).kv_export
    return prompt, export, export_first_token(offline, prompt)


def export_first_token(offline, prompt):
    [first] = offline.generate([prompt], GREEDY.replace(max_tokens=1))
    return first.outputs[0].token_ids[0]


def test_received_rows_are_read_only_while_they_can_be_trusted(engines):
    """ReceivedBlocks (the transport's ReceivedKV): rows given back, or past the pin's deadline, are not copied."""
    prefill, _, _ = engines
    prompt = mixed_prompts(VOCAB, [64], seed=12)[0]
    export = _run(prefill, "late", prompt, GREEDY.replace(max_tokens=1), export_kv=True).kv_export
    failures_before = KV_TRANSFER_FAILURES.labels("get", "received_rows_unusable")._value.get()
    copied = []

    expired = ReceivedBlocks(4, [(0, export.blocks[:2]), (2, export.blocks[2:])], valid_until=time.monotonic() - 1,
                             mapped=True)
    assert expired.seconds_left() == 0
    with pytest.raises(KVLoadError, match="ran out"):
        expired.read(copied.append)
    given_back = ReceivedBlocks(4, [(0, export.blocks)], mapped=True)
    given_back.close()
    with pytest.raises(KVLoadError, match="given back"):
        given_back.read(copied.append)
    assert copied == []  # neither was copied at all
    assert KV_TRANSFER_FAILURES.labels("get", "received_rows_unusable")._value.get() == failures_before + 2

    in_time = ReceivedBlocks(4, [(0, export.blocks[:1]), (1, export.blocks[1:])], mapped=True)
    seconds_before = KV_TRANSFER_SECONDS.labels("get")._value.get()
    in_time.read(copied.append)
    assert [[first for first, _ in runs] for runs in copied] == [[0, 1]]
    assert KV_TRANSFER_SECONDS.labels("get")._value.get() > seconds_before  # the copy out of the store, timed


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
    decode.pool.reset_prefix_cache()
    out = _run(decode, f"rd{already}", prompt, GREEDY, produced_token_ids=expected[:already],
               kv_load=KVLoad(export.block_hashes, export.blocks))
    assert out.outputs[0].token_ids == expected
    assert out.num_cached_tokens == (70 // 16) * 16
    _assert_pool_whole(decode)
    with pytest.raises(InvalidRequestError, match="produced token ids"):
        decode.add_request("bad", prompt, GREEDY, produced_token_ids=[VOCAB * 100])


def test_the_rows_are_needed_until_the_engine_reports_the_load(llama_ckpt, engines):
    """A transport's pin must last until stream.kv_loaded() returns, and may end right then: the rows are in the
    cache. What the prefix cache holds is asked on the engine's thread, never read from another."""
    prefill, _, offline = engines
    decode = _engine(llama_ckpt)
    prompt, export, first = _exported(prefill, offline, "pin", 13)

    async def main():
        runner = AsyncEngine(decode)
        runner.start()
        try:
            assert await runner.cached_prefix_blocks(export.block_hashes) == 0
            received = ReceivedBlocks(4, [(0, export.blocks[:1]), (1, export.blocks[1:])], mapped=True)
            stream = await runner.add_request("pin-d", prompt, GREEDY, produced_token_ids=[first],
                                              kv_blocks=(export.block_hashes, received))
            assert await stream.kv_loaded() is None
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


def test_a_waiting_request_cancelled_or_past_its_pin_lets_the_rows_go_at_once(llama_ckpt, engines):
    """stream.kv_loaded() returns when the request ends before admission (its pin may end at once), and when
    the rows' deadline passes first (ending the pin then; the engine computes them)."""
    prefill, _, offline = engines
    decode = _engine(llama_ckpt, max_num_seqs=1)
    prompt, export, first = _exported(prefill, offline, "cancel", 14)

    async def main():
        runner = AsyncEngine(decode)
        runner.start()
        try:
            busy = await runner.add_request("busy", list(range(1, 30)), GREEDY.replace(max_tokens=400))
            received = ReceivedBlocks(4, [(0, export.blocks)], mapped=True)
            waiting = await runner.add_request("waits", prompt, GREEDY, produced_token_ids=[first],
                                               kv_blocks=(export.block_hashes, received))
            loaded = asyncio.ensure_future(waiting.kv_loaded())
            await asyncio.sleep(0.2)
            assert not loaded.done()  # still waiting for the only seat
            waiting.close()  # the client went away
            assert await asyncio.wait_for(loaded, 5) is None

            expiring = ReceivedBlocks(4, [(0, export.blocks)], valid_until=time.monotonic() + 0.2, mapped=True)
            late = await runner.add_request("late", prompt, GREEDY, produced_token_ids=[first],
                                            kv_blocks=(export.block_hashes, expiring))
            error = await asyncio.wait_for(late.kv_loaded(), 5)
            assert error is not None and "readable" in error
            expiring.close()
            busy.close()
            async with late:
                return [token async for delta in late for token in delta.token_ids]
        finally:
            await runner.stop()

    tokens = asyncio.run(asyncio.wait_for(main(), 120))
    assert [first] + tokens == offline.generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert decode.stats()["kv_load_failures"] == 1
    _assert_pool_whole(decode)


def test_a_request_that_fails_on_the_engine_thread_ends_its_stream_with_an_error(engines, monkeypatch):
    """The engine thread's exception must reach the caller (it once vanished, leaving the request hanging)."""
    _, decode, _ = engines

    def refuse(*args, **kwargs):
        raise InvalidRequestError("refused on the engine's thread", "prompt")

    monkeypatch.setattr(decode, "add_request", refuse)

    async def main():
        runner = AsyncEngine(decode)
        runner.start()
        try:
            return [delta async for delta in runner.generate("refused", list(range(5, 40)), GREEDY)]
        finally:
            await runner.stop()

    deltas = asyncio.run(asyncio.wait_for(main(), 30))
    assert deltas[-1].finish_reason == "error" and "refused" in deltas[-1].message
