"""The prefix index in Redis, shared by every gateway replica: which blocks each publisher holds.

Data model, chosen so a lookup is one round trip and a resync is cheap:
- `splitserve:kvidx:p:{publisher}`: a set of the 16-byte block hashes the publisher holds;
- `splitserve:kvidx:s:{publisher}`: its epoch and the sequence number of the last batch applied;
- `splitserve:kvidx:publishers`: a hash, publisher -> JSON (kind, address, medium, block size, model id, time).
A publisher is `{kind}|{address}`. Both per-publisher keys carry a TTL that every batch and heartbeat renews, so
the entries of a publisher that stops announcing expire by themselves (no sweeper), and a publisher whose keys
expired (or whose Redis restarted) finds its state gone at its next heartbeat and rewrites its whole set.

Apply (APPLY_LUA, atomic per batch): a delta batch applies only if its epoch is the stored one and its sequence
number is the next; anything else answers 0 and the publisher sends a snapshot (its full set) instead, which
always applies. Lookup (LOOKUP_LUA): for each publisher asked, the length of the leading run of the prompt's
block chain it holds, probed with SMISMEMBER in chunks of LOOKUP_CHUNK and stopped at the first miss. Cost: one
round trip; O(P * (L + LOOKUP_CHUNK)) set probes in P * ceil((L + 1) / LOOKUP_CHUNK) commands for P publishers
and a matched run of L blocks, all in Redis's C code but the loop over chunks.
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
# The publishers hash lives as long as any publisher renews it; a dead one's field is ignored by its age.
PUBLISHERS_TTL_S = 300

MODE_DELTA, MODE_SNAPSHOT, MODE_HEARTBEAT = "delta", "snapshot", "beat"

APPLY_LUA = """
local set_key, state_key, publishers_key = KEYS[1], KEYS[2], KEYS[3]
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
    run = {}
  end
end
for i = 1, #ops, 17 do
  local op = string.sub(ops, i, i)
  if op == 'C' then
    flush()
    redis.call('DEL', set_key)
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
local n = #chain / 16
local hashes = {}
for i = 1, n do hashes[i] = string.sub(chain, i * 16 - 15, i * 16) end
local out = {}
for p = 4, #ARGV do
  local key = prefix .. 'p:' .. ARGV[p]
  local run, i = 0, 0
  while i < n do
    local m = math.min(chunk, n - i)
    local flags = redis.call('SMISMEMBER', key, unpack(hashes, i + 1, i + m))
    local missed = false
    for j = 1, m do
      if flags[j] == 1 then run = run + 1 else missed = true; break end
    end
    if missed then break end
    i = i + m
  end
  out[#out + 1] = run
end
return out
"""


def set_key(publisher: str) -> str:
    return f"{KEY_PREFIX}p:{publisher}"


def state_key(publisher: str) -> str:
    return f"{KEY_PREFIX}s:{publisher}"


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
    keys = [set_key(info.id), state_key(info.id), PUBLISHERS_KEY]
    return keys, [info.id, epoch, seq, mode, max(1, int(ttl_s * 1000)), info.to_json(), ops,
                  PUBLISHERS_TTL_S * 1000]


def lookup_args(chain: Sequence[BlockHash], publishers: Sequence[str]) -> list:
    """ARGV of LOOKUP_LUA: the answer is the run length of each publisher, in this order."""
    return [KEY_PREFIX, b"".join(chain), LOOKUP_CHUNK, *publishers]
