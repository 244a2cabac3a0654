"""The Redis prefix index with real publishers and a real redis-server: batches apply in order, a gap or a new
epoch is answered by a snapshot, a silent publisher's entries expire, a lookup is one round trip."""

from __future__ import annotations

import time

import pytest
import redis
from prometheus_client import REGISTRY

from splitserve.kv_blocks.hashing import chain_block_hashes
from splitserve.kv_events.events import (MEDIUM_DEVICE, AllBlocksCleared, BlockRemoved, BlockStored,
                                         events_from_pool)
from splitserve.kv_events.index import (APPLY_LUA, LOOKUP_LUA, MODE_DELTA, MODE_SNAPSHOT, PublisherInfo,
                                        apply_args, lookup_args, speculative_key)
from splitserve.kv_events.publisher import KVEventPublisher

CHAIN = chain_block_hashes(list(range(64 * 16)), 16, "model-a")     # 64 blocks


def _info(address: str = "10.0.0.1:1") -> PublisherInfo:
    return PublisherInfo("prefill", address, MEDIUM_DEVICE, 16, "model-a")


def _stored(hashes) -> BlockStored:
    return BlockStored(tuple(hashes), None, 16, MEDIUM_DEVICE)


def _runs(client: redis.Redis, publishers: list[PublisherInfo], chain=CHAIN) -> list[int]:
    """Each publisher's confirmed run."""
    return [run for run, _ in _lookup(client, publishers, chain)]


def _lookup(client: redis.Redis, publishers: list[PublisherInfo], chain=CHAIN, claims=(), **kwargs):
    """(confirmed run, speculative run beyond it) of each publisher."""
    answer = [int(r) for r in client.eval(LOOKUP_LUA, 0, *lookup_args(chain, [p.id for p in publishers],
                                                                      [c.id for c in claims], **kwargs))]
    return list(zip(answer[::2], answer[1::2]))


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _eventually(condition, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.fixture
def client(redis_server):
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


@pytest.fixture
def publishers(redis_server):
    made = []

    def make(info: PublisherInfo, **kwargs) -> KVEventPublisher:
        publisher = KVEventPublisher(redis_server.url, info, heartbeat_s=0.1, **kwargs)
        made.append(publisher)
        return publisher

    yield make
    for publisher in made:
        publisher.stop()


@pytest.fixture
def indexed(client, publishers):
    """A started publisher whose first `blocks` blocks of CHAIN the index already shows: (its info, it)."""
    def start(blocks: int, **kwargs) -> tuple[PublisherInfo, KVEventPublisher]:
        info = _info()
        publisher = publishers(info, **kwargs)
        publisher.start()
        publisher.publish([_stored(CHAIN[:blocks])])
        _eventually(lambda: _runs(client, [info]) == [blocks])
        return info, publisher

    return start


def test_lookup_gives_each_publisher_its_leading_run(client, publishers):
    a, b = _info("10.0.0.1:1"), _info("10.0.0.2:1")
    pa, pb = publishers(a), publishers(b)
    pa.publish([_stored(CHAIN[:40])])
    pb.publish([_stored(CHAIN[:10]), _stored(CHAIN[11:64])])       # a hole at block 10: the run stops there
    pa.start()
    pb.start()
    _eventually(lambda: _runs(client, [a, b]) == [40, 10])
    pa.publish([BlockRemoved((CHAIN[5],), MEDIUM_DEVICE)])
    _eventually(lambda: _runs(client, [a, b]) == [5, 10])
    pb.publish([AllBlocksCleared(MEDIUM_DEVICE), _stored(CHAIN[:3])])
    _eventually(lambda: _runs(client, [a, b]) == [5, 3])
    assert _runs(client, [_info("10.0.0.9:1")]) == [0]             # never published: nothing, no error


def test_pool_changes_keep_their_order():
    """A block removed and stored again in one step ends up stored, so order survives into the events."""
    h1, h2 = CHAIN[0], CHAIN[1]
    events = events_from_pool([(True, h1), (True, h2), (False, h1), (True, h1)], 16)
    assert events == [_stored([h1, h2]), BlockRemoved((h1,), MEDIUM_DEVICE), _stored([h1])]


def test_a_gap_in_sequence_numbers_is_refused_and_a_snapshot_repairs_it(client, publishers):
    info = _info()
    apply = client.register_script(APPLY_LUA)
    ops = b"".join(b"S" + h for h in CHAIN[:4])
    assert apply(*_keys_args(info, "e1", 0, MODE_SNAPSHOT, ops)) == 1
    assert apply(*_keys_args(info, "e1", 1, MODE_DELTA, b"S" + CHAIN[4])) == 1
    assert apply(*_keys_args(info, "e1", 3, MODE_DELTA, b"S" + CHAIN[5])) == 0     # seq 2 went missing
    assert _runs(client, [info]) == [5]                                               # not applied
    assert apply(*_keys_args(info, "e2", 4, MODE_DELTA, b"S" + CHAIN[5])) == 0     # another epoch

    # A publisher whose batch was lost (its queue was full) resyncs from its own copy.
    dropped = _sample("splitserve_kv_events_dropped_batches_total", kind="prefill")
    publisher = publishers(info, max_queue=1)
    publisher.publish([_stored(CHAIN[:8])])
    publisher.publish([_stored(CHAIN[8:16])])                         # queue full: dropped, a snapshot follows
    assert _sample("splitserve_kv_events_dropped_batches_total", kind="prefill") == dropped + 1
    publisher.start()
    _eventually(lambda: _runs(client, [info]) == [16])                 # the dropped batch's blocks too
    publisher.publish([_stored(CHAIN[16:20])])                        # deltas follow the snapshot
    _eventually(lambda: _runs(client, [info]) == [20])


def test_a_gap_seen_by_the_index_triggers_a_resync(client, indexed):
    info, publisher = indexed(4)
    before = _sample("splitserve_kv_events_resyncs_total", kind="prefill", reason="gap")
    with publisher._lock:          # a batch the index never saw: the next delta does not follow
        publisher._seq += 1
        publisher._held.update(CHAIN[4:6])
    publisher.publish([_stored(CHAIN[6:8])])
    _eventually(lambda: _runs(client, [info]) == [8])
    assert _sample("splitserve_kv_events_resyncs_total", kind="prefill", reason="gap") == before + 1


def test_a_restarted_publisher_replaces_its_old_entries(client, publishers, indexed):
    info, old = indexed(30)
    old._stopping.set()            # dies without cleaning up
    old._thread.join()
    new = publishers(info)         # the same worker restarted: a new epoch, an empty cache
    assert new.epoch != old.epoch
    new.start()
    _eventually(lambda: _runs(client, [info]) == [0])
    new.publish([_stored(CHAIN[:2])])
    _eventually(lambda: _runs(client, [info]) == [2])


def test_entries_of_a_publisher_that_stops_announcing_expire(client, indexed):
    info, publisher = indexed(10, ttl_s=0.5)
    publisher._stopping.set()      # hangs or dies: no more heartbeats
    publisher._thread.join()
    _eventually(lambda: _runs(client, [info]) == [0], timeout_s=5)


def test_a_redis_restart_is_repaired_by_the_next_heartbeat(client, indexed, redis_server):
    info, publisher = indexed(12)
    redis_server.stop()
    redis_server.start()           # empty: persistence is off
    _eventually(lambda: _retrying(lambda: _runs(client, [info])) == [12])


def _retrying(fn):
    try:
        return fn()
    except redis.ConnectionError:
        return None


def _keys_args(info, epoch, seq, mode, ops):
    return apply_args(info, epoch, seq, mode, ops, ttl_s=10)


def test_a_claim_is_seen_by_the_next_lookup_superseded_by_real_events_and_expires(client, publishers):
    """Two lookups of a new prefix (as from two gateways): the first claims it for the worker it would pick, the
    second sees that claim and claims nothing; real BlockStored events replace the claim, and an unconfirmed one
    expires."""
    a, b, d = _info("10.0.0.1:1"), _info("10.0.0.2:1"), PublisherInfo("decode", "10.0.0.3:1", MEDIUM_DEVICE, 16,
                                                                       "model-a")
    assert _lookup(client, [a, b, d], claims=[a, d]) == [(0, 64), (0, 0), (0, 64)]
    assert _lookup(client, [a, b, d], claims=[b]) == [(0, 64), (0, 0), (0, 64)]      # a holds it: b claims nothing
    assert _lookup(client, [a, b], CHAIN[:10]) == [(0, 10), (0, 0)]                  # a prefix of the claim
    other = chain_block_hashes(list(range(5000, 5000 + 8 * 16)), 16, "model-a")
    assert _lookup(client, [a, b], other) == [(0, 0), (0, 0)]                         # another prompt: nothing

    publisher = publishers(a)
    publisher.publish([_stored(CHAIN[:20])])
    publisher.start()
    _eventually(lambda: _lookup(client, [a]) == [(20, 44)])                          # confirmed, then claimed
    assert client.zcard(speculative_key(a.id)) == 44                                  # stored blocks left the set
    publisher.publish([AllBlocksCleared(MEDIUM_DEVICE)])                              # the worker restarted
    _eventually(lambda: _lookup(client, [a]) == [(0, 0)])

    assert _lookup(client, [b], claims=[b], claim_ttl_s=0.2) == [(0, 64)]
    time.sleep(0.3)
    assert _lookup(client, [b]) == [(0, 0)]                                           # expired
    assert client.exists(speculative_key(b.id)) == 0                                  # and gone


def test_a_claim_below_a_threshold_extends_a_short_run(client):
    """After the router picked a worker whose known run is short, the whole chain is claimed for it."""
    a = _info()
    client.eval(APPLY_LUA, *_keys_args_eval(a, b"".join(b"S" + h for h in CHAIN[:3])))
    assert _lookup(client, [], claims=[a], claim_below=len(CHAIN) + 1) == []
    assert _lookup(client, [a]) == [(3, 61)]


def _keys_args_eval(info, ops):
    keys, args = apply_args(info, "e1", 0, MODE_SNAPSHOT, ops, ttl_s=10)
    return [len(keys), *keys, *args]
