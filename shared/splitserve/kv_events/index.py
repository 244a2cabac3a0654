"""The prefix index in Redis, shared by every gateway replica: which blocks each publisher holds.

Data model, chosen so a lookup is one round trip and a resync is cheap:
- `splitserve:kvidx:p:{publisher}`: a set of the 16-byte block hashes the publisher holds;
- `splitserve:kvidx:s:{publisher}`: its epoch and the sequence number of the last batch applied;
- `splitserve:kvidx:publishers`: a hash, publisher -> JSON (kind, address, medium, block size, model id, time);
- `splitserve:kvidx:x:{publisher}`: speculative entries, a sorted set of block hash -> expiry (ms since the
  epoch, by the claiming gateway's clock: the launcher's Redis user may not run TIME, and NTP keeps replicas'
  clocks far closer than the TTL):
  blocks a gateway just sent a request to the publisher for, so a burst of requests sharing a new prefix goes
  to one worker (across gateway replicas) before its real BlockStored events arrive. Real events supersede
  them (a stored block leaves the set, AllBlocksCleared drops it), expiry cleans up the rest.
A publisher is `{kind}|{address}`. Both per-publisher keys carry a TTL that every batch and heartbeat renews, so
the entries of a publisher that stops announcing expire by themselves (no sweeper), and a publisher whose keys
expired (or whose Redis restarted) finds its state gone at its next heartbeat and rewrites its whole set.

Apply (APPLY_LUA, atomic per batch): a delta batch applies only if its epoch is the stored one and its sequence
number is the next; anything else answers 0 and the publisher sends a snapshot (its full set) instead, which
always applies. Lookup (LOOKUP_LUA): for each publisher asked, the length of the leading run of the prompt's
block chain it holds, probed with SMISMEMBER in chunks of LOOKUP_CHUNK and stopped at the first miss. Cost: one
round trip; O(P * (L + LOOKUP_CHUNK)) set probes in P * ceil((L + 1) / LOOKUP_CHUNK) commands for P publishers
and a matched run of L blocks, all in Redis's C code but the loop over chunks. Beyond each confirmed run the
script walks the publisher's speculative set the same way (ZMSCORE: O(S + LOOKUP_CHUNK) more probes for S
speculative blocks), and in the same call claims the chain for
the workers the gateway would pick by load, for each kind none of whose publishers holds any of it: the script
is atomic, so of two lookups of a new prefix racing from two gateways the second sees the first's claim.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

from splitserve.kv_blocks.hashing import BlockHash

KEY_PREFIX = "splitserve:kvidx:"
PUBLISHERS_KEY = KEY_PREFIX + "publishers"
LOOKUP_CHUNK = 32
# A claim lives long enough for a prefill to finish and its events to arrive (ms to seconds on CPU): past that,
# an unconfirmed claim is wrong (the request failed, or went elsewhere) and must not keep attracting requests.
SPECULATIVE_TTL_S = 5.0
# The publishers hash lives as long as any publisher renews it; a dead one's field is ignored by its age.
PUBLISHERS_TTL_S = 300

MODE_DELTA, MODE_SNAPSHOT, MODE_HEARTBEAT = "delta", "snapshot", "beat"

APPLY_LUA = """
local set_key, state_key, publishers_key, spec_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local publisher, epoch, seq, mode = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local ttl_ms, meta, ops, publishers_ttl_ms = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
if mode == 'snapshot' then
  redis.call('DEL', set_key)
else
  local state = redis.call('HMGET', state_key, 'epoch', 'seq')
  if state[1] ~= epoch then return 0 end
  local last = tonumber(state[2])
  if mode == 'delta' and seq ~= last + 1 then return 0 end
  if mode == 'beat' and seq ~= last then return 0 end
end
local run, run_op = {}, nil
local function flush()
  if #run > 0 then
    redis.call(run_op == 'S' and 'SADD' or 'SREM', set_key, unpack(run))
    if run_op == 'S' then redis.call('ZREM', spec_key, unpack(run)) end
    run = {}
  end
end
for i = 1, #ops, 17 do
  local op = string.sub(ops, i, i)
  if op == 'C' then
    flush()
    redis.call('DEL', set_key, spec_key)
  else
    if op ~= run_op or #run >= 4000 then
      flush()
      run_op = op
    end
    run[#run + 1] = string.sub(ops, i + 1, i + 16)
  end
end
flush()
redis.call('HSET', state_key, 'epoch', epoch, 'seq', seq)
redis.call('PEXPIRE', state_key, ttl_ms)
redis.call('PEXPIRE', set_key, ttl_ms)
redis.call('HSET', publishers_key, publisher, meta)
redis.call('PEXPIRE', publishers_key, publishers_ttl_ms)
return 1
"""

LOOKUP_LUA = """
local prefix, chain, chunk = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now, claim_ttl_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local claim_below, nclaims = tonumber(ARGV[6]), tonumber(ARGV[7])
local first = 8 + nclaims
local n = #chain / 16
local hashes = {}
for i = 1, n do hashes[i] = string.sub(chain, i * 16 - 15, i * 16) end
local function leading(from, key, cmd)
  local run, i = 0, from
  while i < n do
    local m = math.min(chunk, n - i)
    local answers = redis.call(cmd, key, unpack(hashes, i + 1, i + m))
    for j = 1, m do
      local v = answers[j]
      if cmd == 'SMISMEMBER' then
        if v ~= 1 then return run end
      elseif not v or tonumber(v) <= now then
        return run
      end
      run = run + 1
    end
    i = i + m
  end
  return run
end
local out, best = {}, {}
for p = first, #ARGV do
  local id = ARGV[p]
  local run = leading(0, prefix .. 'p:' .. id, 'SMISMEMBER')
  local spec = leading(run, prefix .. 'x:' .. id, 'ZMSCORE')
  out[#out + 1] = run
  out[#out + 1] = spec
  local kind = string.match(id, '^[^|]*')
  best[kind] = math.max(best[kind] or 0, run + spec)
end
for c = 8, first - 1 do
  local id = ARGV[c]
  if n > 0 and (best[string.match(id, '^[^|]*')] or 0) < claim_below then
    local key = prefix .. 'x:' .. id
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    for i = 1, n, 1000 do
      local args = {}
      for j = i, math.min(n, i + 999) do
        args[#args + 1] = now + claim_ttl_ms
        args[#args + 1] = hashes[j]
      end
      redis.call('ZADD', key, unpack(args))
    end
    redis.call('PEXPIRE', key, claim_ttl_ms)
    for p = first, #ARGV do
      if ARGV[p] == id then out[(p - first) * 2 + 2] = n - out[(p - first) * 2 + 1] end
    end
  end
end
return out
"""


def set_key(publisher: str) -> str:
    return f"{KEY_PREFIX}p:{publisher}"


def state_key(publisher: str) -> str:
    return f"{KEY_PREFIX}s:{publisher}"


def speculative_key(publisher: str) -> str:
    return f"{KEY_PREFIX}x:{publisher}"


def publisher_id(kind: str, address: str) -> str:
    return f"{kind}|{address}"


@dataclass(frozen=True)
class PublisherInfo:
    """What a gateway needs to use a publisher's entries: whose they are, where, and how its hashes are made
    (block size and model id; None for the kv-store, which holds blocks of whatever engines wrote them)."""
    kind: str
    address: str
    medium: str
    block_size: Optional[int]
    model_id: Optional[str]
    updated: float = 0.0

    @property
    def id(self) -> str:
        return publisher_id(self.kind, self.address)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "updated": time.time()})

    @classmethod
    def from_json(cls, raw: Union[str, bytes]) -> "PublisherInfo":
        data = json.loads(raw)
        block_size = data.get("block_size")
        return cls(kind=str(data["kind"]), address=str(data["address"]), medium=str(data["medium"]),
                   block_size=int(block_size) if block_size is not None else None,
                   model_id=data.get("model_id"), updated=float(data["updated"]))


def apply_args(info: PublisherInfo, epoch: str, seq: int, mode: str, ops: bytes, ttl_s: float) -> tuple[list, list]:
    """KEYS and ARGV of APPLY_LUA."""
    keys = [set_key(info.id), state_key(info.id), PUBLISHERS_KEY, speculative_key(info.id)]
    return keys, [info.id, epoch, seq, mode, max(1, int(ttl_s * 1000)), info.to_json(), ops,
                  PUBLISHERS_TTL_S * 1000]


def lookup_args(chain: Sequence[BlockHash], publishers: Sequence[str], claims: Sequence[str] = (),
                claim_below: int = 1, claim_ttl_s: float = SPECULATIVE_TTL_S) -> list:
    """ARGV of LOOKUP_LUA. The answer is, for each publisher in this order, its confirmed run and the
    speculative run beyond it. Each publisher in `claims` gets the whole chain as speculative entries (for
    claim_ttl_s) when no asked publisher of its kind holds at least claim_below blocks of it (confirmed or
    speculative); a claimed publisher that was also asked answers with the claim counted."""
    return [KEY_PREFIX, b"".join(chain), LOOKUP_CHUNK, int(time.time() * 1000), max(1, int(claim_ttl_s * 1000)),
            claim_below, len(claims), *claims, *publishers]
