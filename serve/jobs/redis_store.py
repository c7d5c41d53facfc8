"""`RedisBackend`: `StoreBackend` on Redis, one Lua script per operation, so each is atomic across every
client and replica (Redis runs a script to the end before any other command), with the caller's
`now` as the only clock (Redis' own clock is never read). Each script follows `MemoryStore`'s logic
for its operation, and sits next to the method that runs it.

A script gets the key prefix as ARGV[1] and its arguments as one JSON object in ARGV[2], decoded
into the table `args` (a None argument is left out: nil in Lua).

Keys, all under `<prefix>:`
  job:<id>        hash: the fields scripts read or change, each on its own (numbers as exact decimal
                  strings), `body` (the rest of the Job as JSON, opaque to Lua, with the full input: what
                  `claim` reads), `abridged` (the same with the input abridged: what reads return), `seq`
                  (accept order). When the job ends, `body` becomes the abridged one and `abridged` goes.
                  Jobs from the previous version have `head` (no input) and no `abridged`: reads take their
                  `body` and abridge it in Python
  logs:<id>       list of LogLine JSON
  queue           zset id -> order: the FIFO of every queued job by an increasing sequence (positions,
                  counts); a re-queue goes below the minimum
  queue:<owner>   zset id -> the same order: the owner's queued jobs
  owners          zset owner -> the order of its first queued job: what `claim` walks (never the queue)
  queued:<owner>  set of the owner's queued ids (the queued count `cap_pending` and `max_pending` check;
                  the previous version keeps it too)
  inputs:<owner>  zset id -> bytes of the full input of each of the owner's unfinished jobs
  stored:<owner>  counter: their sum (what `max_stored_bytes` bounds)
  deadlines       zset id -> created_at + start_timeout_s of queued, never-started jobs that have one
  running         zset id -> lease_until (what `reap` looks for)
  expiring        zset id -> expires_at of finished jobs (what `reap` forgets)
  finished        list of ended notify jobs' ids, in the order they ended (the outbox `take_finished`
                  drains)
  notifying       zset id -> lease end of the ends handed out whose delivery is not over (`notified`)
  window:<owner>  zset unique sequence number -> admission time (the rolling rate window)
  slots:<owner>   zset slot id (or running job id) -> lease expiry (the concurrency cap)
  seq             counter: window members, queue order, accept order
  resumed         the end of the latest outage a `resume` reported (an outage counts once)
  work            counter moved (and PUBLISHed on the channel of the same name) whenever queued work may
                  have become claimable: what idle runners wait on (`wait_for_work`)

The logic expires things by `now`; Redis TTLs are only a safety net for leftovers, set well past the
logical expiry. Scripts build key names from the prefix, so this needs one Redis (not Redis Cluster), 7.0
or later: each script declares with a shebang whether Redis may refuse it when full (maxmemory reached,
answered OOM: StoreUnavailable). Only `enqueue`, which stores what clients send, may be refused; every other
script runs anyway, so jobs still start and end, and ending frees their inputs.

During an upgrade, replicas of the previous version share this Redis: they queue jobs in `queue` alone,
and end or claim jobs without touching `queue:<owner>`, `owners` or `inputs:<owner>`. So a claim skips an
owner's first job that is no longer queued, `reap` rebuilds the owners' queues when their sizes and the
queue's disagree, and an enqueue about to refuse for "stored" first drops the jobs that have ended. Its reap
re-queues a lapsed job as this one's does (status, runner), so a runner's late `finish` is refused after
either version's reap; `requeue` puts a job back in `queue` and `queued:<owner>`, where it claims from.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from serve.jobs.models import (
    CANCELLED,
    QUEUE_FULL_RETRY_S,
    REQUEUED,
    START_TIMEOUT,
    WINDOW_S,
    WORKER_LOST,
    Admission,
    CancelOutcome,
    Job,
    JobError,
    JobResult,
    JobStatus,
    Limits,
    LogLine,
    StoreUnavailable,
    abridge_long_strings,
    final_status,
    input_bytes,
)

# Error replies of a server that cannot take writes for now (READONLY is redis-py's ReadOnlyError).
_UNAVAILABLE_REPLIES = ("MISCONF", "MASTERDOWN", "BUSY", "TRYAGAIN")
SAFETY_MARGIN_S = 3600.0  # how long past its logical expiry a leftover key may stay in Redis
# Connections one replica opens to Redis; a call beyond them waits for one (redis-py's default pool would
# refuse it at once: a burst of 101 calls in one replica would be 503s), up to POOL_WAIT_S, then is unavailable.
POOL_CONNECTIONS = 100
POOL_WAIT_S = 5.0

# The hash fields scripts read or change, one each; the rest of a Job travels as `body`.
_FIELDS = {"owner", "max_concurrent", "status", "created_at", "started_at", "finished_at", "expires_at",
           "attempts", "runner", "lease_until", "cancel_requested", "notify", "result", "error"}
# What a read fetches besides the body (a brief one leaves 'result' out): never `HGETALL`, which would
# copy the full input of an unfinished job.
_READ_FIELDS = sorted(_FIELDS - {"result"})


def _lua_string(text: str) -> str:
    """A Lua long string: taken verbatim, with no escapes to translate."""
    if "]==]" in text:
        raise ValueError(f"cannot quote {text!r} for Lua")
    return f"[==[{text}]==]"


# Prepended to every script.
_PRELUDE = f"""
local WINDOW_S, SAFETY_MARGIN_S, QUEUE_FULL_RETRY_S = {WINDOW_S!r}, {SAFETY_MARGIN_S!r}, {QUEUE_FULL_RETRY_S!r}
local READ_FIELDS = {{{", ".join(repr(name) for name in _READ_FIELDS)}}}
local CANCELLED = {_lua_string(CANCELLED.model_dump_json())}
local WORKER_LOST = {_lua_string(WORKER_LOST.model_dump_json())}
local START_TIMEOUT = {_lua_string(START_TIMEOUT.model_dump_json())}
""" + r"""
local prefix, args = ARGV[1], cjson.decode(ARGV[2])
local function key(...) return table.concat({prefix, ...}, ':') end

-- For replies only: Lua would truncate a number to an integer. (Arguments to redis.call are exact.)
local function num(x) return string.format('%.17g', x) end

-- A flat field/value reply the client turns back into a model.
local function fields(t)
  local out = {}
  for name, value in pairs(t) do
    out[#out + 1] = name
    out[#out + 1] = type(value) == 'number' and num(value) or tostring(value)
  end
  return out
end

local function expire_after(k, expiry, now)
  redis.call('PEXPIRE', k, math.ceil((expiry - now + SAFETY_MARGIN_S) * 1000))
end

local function prune_slots(owner, now)
  local slots = key('slots', owner)
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  return slots
end

-- MemoryStore._announce: queued work may be claimable now; wake the runners waiting for it.
local function announce()
  if redis.call('ZCARD', key('queue')) == 0 then return end
  redis.call('PUBLISH', key('work'), redis.call('INCR', key('work')))
end

-- Takes or extends a lease, which only grows (a late call may carry an old `now`); the key outlives its
-- longest lease.
local function take_slot(owner, slot, expiry, now)
  local slots = key('slots', owner)
  redis.call('ZADD', slots, 'GT', expiry, slot)
  expire_after(slots, tonumber(redis.call('ZRANGE', slots, -1, -1, 'WITHSCORES')[2]), now)
end

-- MemoryStore._decision: admit (recording `now` in the window) or refuse (recording nothing).
-- in_flight_extra: work counted against the cap beyond the slots; nil = no concurrency check.
-- queued (an enqueue): {pending, max_pending, stored (with the new job's bytes), max_stored}.
-- Returns the decision and, when admitted, a fresh sequence number.
local function decide(owner, rate, cap, now, in_flight_extra, queued)
  local window = key('window', owner)
  redis.call('ZREMRANGEBYSCORE', window, '-inf', now - WINDOW_S)
  local slots = prune_slots(owner, now)
  local count = redis.call('ZCARD', window)
  local oldest = tonumber(redis.call('ZRANGE', window, 0, 0, 'WITHSCORES')[2])
  local d = {allowed = false, limit = rate, max_concurrent = cap, remaining = math.max(0, rate - count),
             reset_s = oldest and oldest + WINDOW_S - now or 0}
  if count >= rate then
    d.reason, d.retry_after_s = 'rate', d.reset_s
    return d
  end
  if in_flight_extra and redis.call('ZCARD', slots) + in_flight_extra >= cap then
    d.reason, d.retry_after_s = 'concurrency', 1
    return d
  end
  if queued and queued.pending >= queued.max_pending then
    d.reason, d.retry_after_s = 'pending', QUEUE_FULL_RETRY_S
    return d
  end
  if queued and queued.stored > queued.max_stored then
    d.reason, d.retry_after_s = 'stored', QUEUE_FULL_RETRY_S
    return d
  end
  -- Members must be unique (two admissions may share a `now`): the sequence number is.
  local seq = redis.call('INCR', key('seq'))
  redis.call('ZADD', window, now, seq)
  expire_after(window, now + WINDOW_S, now)
  d.allowed, d.remaining, d.reset_s = true, d.remaining - 1, (oldest or now) + WINDOW_S - now
  return d, seq
end

local function forget(id)
  redis.call('DEL', key('job', id), key('logs', id))
  redis.call('ZREM', key('expiring'), id)
end

-- MemoryStore._visible: another key's job is no job, and an expired one is deleted on sight.
local function visible(id, owner, now)
  local holder, expires_at = unpack(redis.call('HMGET', key('job', id), 'owner', 'expires_at'))
  if holder ~= owner then return false end
  if expires_at and tonumber(expires_at) <= now then
    forget(id)
    return false
  end
  return true
end

-- A job as the client rebuilds it: the fields it answers with, its body, its log lines, its queue position
-- (false unless queued). view: 'full' (claim: the body with the full input), 'read' (the abridged body;
-- a job from the previous version has none, and its body is abridged by the client) or 'brief' (the
-- same without 'result'). Never the full input but for a claim: a read costs what it answers.
local function job_reply(id, view)
  local job = key('job', id)
  local names = {unpack(READ_FIELDS)}
  if view ~= 'brief' then names[#names + 1] = 'result' end
  local values, flat = redis.call('HMGET', job, unpack(names)), {}
  for i, name in ipairs(names) do
    if values[i] then
      flat[#flat + 1] = name
      flat[#flat + 1] = values[i]
    end
  end
  local body = view ~= 'full' and redis.call('HGET', job, 'abridged') or redis.call('HGET', job, 'body')
  local position = false
  if redis.call('HGET', job, 'status') == 'queued' then position = redis.call('ZRANK', key('queue'), id) end
  return {flat, body, redis.call('LRANGE', key('logs', id), 0, -1), position}
end

local function running_by(id, runner)
  local status, holder = unpack(redis.call('HMGET', key('job', id), 'status', 'runner'))
  return status == 'running' and holder == runner
end

-- The owner's place in `owners`: the order of its first queued job, or none.
local function place_owner(owner)
  local first = redis.call('ZRANGE', key('queue', owner), 0, 0, 'WITHSCORES')
  if first[1] then
    redis.call('ZADD', key('owners'), first[2], owner)
  else
    redis.call('ZREM', key('owners'), owner)
  end
end

-- MemoryStore._push: queue a job at `order`, above every other (an accept) or below (a re-queue).
local function push(id, owner, order)
  redis.call('ZADD', key('queue'), order, id)
  redis.call('SADD', key('queued', owner), id)
  redis.call('ZADD', key('queue', owner), order, id)
  place_owner(owner)
end

-- MemoryStore._dequeue. Also drops the start deadline: it bounds the wait for a first start only (a
-- re-queue has none).
local function dequeue(id, owner)
  redis.call('ZREM', key('queue'), id)
  redis.call('SREM', key('queued', owner), id)
  redis.call('ZREM', key('deadlines'), id)
  redis.call('ZREM', key('queue', owner), id)
  place_owner(owner)
end

-- The bytes of the owner's unfinished jobs' inputs.
local function stored_bytes(owner)
  return tonumber(redis.call('GET', key('stored', owner)) or 0)
end

local function hold_input(owner, id, bytes)
  redis.call('ZADD', key('inputs', owner), bytes, id)
  redis.call('INCRBY', key('stored', owner), bytes)
end

-- Once per job, whoever calls it first (its end, or forget_ended_inputs).
local function free_input(owner, id)
  local bytes = redis.call('ZSCORE', key('inputs', owner), id)
  if not bytes then return end
  redis.call('ZREM', key('inputs', owner), id)
  if redis.call('DECRBY', key('stored', owner), bytes) <= 0 then redis.call('DEL', key('stored', owner)) end
end

-- Frees the inputs of the owner's jobs that ended without terminate (a replica of the previous version
-- ended them): O(the owner's unfinished jobs), only when an enqueue is about to be refused for them.
local function forget_ended_inputs(owner)
  for _, id in ipairs(redis.call('ZRANGE', key('inputs', owner), 0, -1)) do
    local status = redis.call('HGET', key('job', id), 'status')
    if status ~= 'queued' and status ~= 'running' then free_input(owner, id) end
  end
end

-- MemoryStore._terminate. result / err: JSON, or nil for none.
local function terminate(id, status, now, ttl, result, err)
  local job = key('job', id)
  local owner = redis.call('HGET', job, 'owner')
  redis.call('ZREM', key('slots', owner), id)
  free_input(owner, id)
  -- The full input goes: the record keeps the abridged one.
  local abridged = redis.call('HGET', job, 'abridged')
  if abridged then
    redis.call('HSET', job, 'body', abridged)
    redis.call('HDEL', job, 'abridged')
  end
  redis.call('ZREM', key('running'), id)
  redis.call('HDEL', job, 'runner', 'lease_until', 'result', 'error')
  redis.call('HSET', job, 'status', status, 'finished_at', now, 'expires_at', now + ttl)
  if result then redis.call('HSET', job, 'result', result) end
  if err then redis.call('HSET', job, 'error', err) end
  redis.call('ZADD', key('expiring'), now + ttl, id)
  expire_after(job, now + ttl, now)
  expire_after(key('logs', id), now + ttl, now)
  -- Every way a job ends comes through here: none goes unannounced.
  if redis.call('HGET', job, 'notify') == 'true' then redis.call('RPUSH', key('finished'), id) end
  announce()  -- its slot is free
end

-- MemoryStore._lose: a running job taken from its runner (reap, requeue). requeued: the LogLine JSON a
-- re-queued job gets; err: the JSON error it ends with when no attempt is left.
local function lose(id, now, ttl, max_attempts, requeued, err)
  local job = key('job', id)
  local owner, attempts, cancel = unpack(redis.call('HMGET', job, 'owner', 'attempts', 'cancel_requested'))
  if cancel == 'true' then
    terminate(id, 'cancelled', now, ttl, nil, CANCELLED)
  elseif tonumber(attempts) < max_attempts then
    redis.call('ZREM', key('slots', owner), id)
    redis.call('ZREM', key('running'), id)
    redis.call('HSET', job, 'status', 'queued')
    redis.call('HDEL', job, 'runner', 'lease_until')
    redis.call('RPUSH', key('logs', id), requeued)
    local first = redis.call('ZRANGE', key('queue'), 0, 0, 'WITHSCORES')[2]
    push(id, owner, first and tonumber(first) - 1 or 0)  -- at the front
    announce()
  else
    terminate(id, 'failed', now, ttl, nil, err)
  end
end

-- MemoryStore._expire_unstarted: fail the queued jobs not started by their deadline.
local function expire_unstarted(now, ttl)
  local overdue = redis.call('ZRANGEBYSCORE', key('deadlines'), '-inf', now)
  -- In queue order, as MemoryStore walks them (never-started jobs queue in accept order): the order
  -- they end in is the outbox's.
  local seq = {}
  for _, id in ipairs(overdue) do seq[id] = tonumber(redis.call('HGET', key('job', id), 'seq')) end
  table.sort(overdue, function(a, b) return seq[a] < seq[b] end)
  for _, id in ipairs(overdue) do
    dequeue(id, redis.call('HGET', key('job', id), 'owner'))
    terminate(id, 'failed', now, ttl, nil, START_TIMEOUT)
  end
  return #overdue
end
"""


def _job_hash(job: Job) -> dict[str, str]:
    """A job's hash: strings stay raw, other values are JSON, None is no field."""
    # 'body' has the full input (what a claim hands the runner), 'abridged' the one reads return: a data: URI
    # can be megabytes. The previous version reads 'body' whole, as before.
    rest = _FIELDS | {"logs", "queue_position"}
    record = {"body": job.model_dump_json(exclude=rest),
              "abridged": job.model_copy(update={"input": abridge_long_strings(job.input)}).model_dump_json(
                  exclude=rest)}
    for name, value in job.model_dump(mode="json", include=_FIELDS).items():
        if value is not None:
            record[name] = value if isinstance(value, str) else json.dumps(value)
    return record


def _job(reply: list[Any] | None, full: bool = False) -> Job | None:
    """The job a `job_reply` describes; full: its body has the full input (a claim), else it is abridged
    here too (a job the previous version stored has no abridged body; abridging is idempotent)."""
    if reply is None:
        return None
    flat, body, logs, position = reply
    record = dict(zip(flat[::2], flat[1::2]))
    data = json.loads(body)
    if not full:
        data["input"] = abridge_long_strings(data["input"])
    for name in ("result", "error"):
        if name in record:
            record[name] = json.loads(record[name])
    # The numbers, flags and status are strings here; the model parses them.
    return Job.model_validate({**data, **record, "logs": [json.loads(line) for line in logs],
                               "queue_position": position})


def _admission(reply: list[str]) -> Admission:
    return Admission.model_validate(dict(zip(reply[::2], reply[1::2])))


class RedisBackend:
    """Shared by every client of the same Redis and prefix."""

    def __init__(self, url: str, result_ttl_s: float, max_attempts: int, prefix: str = "llava-serve",
                 password: str | None = None):
        self._url = url
        self._password = password  # AUTH's, when the URL holds none (a password in the URL wins)
        self._ttl = result_ttl_s
        self._max_attempts = max_attempts
        self._prefix = prefix
        self._client: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._pubsub: PubSub | None = None  # subscribed to the work channel by the first wait
        self._waiting = asyncio.Lock()  # one reader of the subscription at a time

    def _redis(self) -> Redis:
        # Made on first use, in the running loop: a client's connections belong to the loop that
        # opened them (the service has one loop per replica; the tests run on one session loop).
        if self._client is None:
            # No retries: a script whose reply was lost may have run, and running it again would
            # apply it twice (two slots, two claims). The caller gets StoreUnavailable instead.
            self._client = Redis.from_pool(BlockingConnectionPool.from_url(
                self._url, decode_responses=True, retry=Retry(NoBackoff(), 0), max_connections=POOL_CONNECTIONS,
                timeout=POOL_WAIT_S, password=self._password))
        return self._client

    async def _run(self, script: str, *, grows: bool = False, **arguments: Any) -> Any:
        """Run one operation's script. grows: it stores what a client sent, and Redis refuses it when full
        (maxmemory reached); every other script runs anyway (`allow-oom`), so jobs still start and end."""
        if script not in self._scripts:
            # EVALSHA; the script is loaded on the first NOSCRIPT (a new or restarted server).
            shebang = "#!lua\n" if grows else "#!lua flags=allow-oom\n"
            self._scripts[script] = self._redis().register_script(shebang + _PRELUDE + script)
        table = json.dumps({name: v for name, v in arguments.items() if v is not None},
                           ensure_ascii=False, allow_nan=False)
        try:
            return await self._scripts[script](args=[self._prefix, table])
        except (RedisConnectionError, RedisTimeoutError, OutOfMemoryError) as exc:  # OOM: maxmemory reached
            raise StoreUnavailable(f"Redis job store unavailable: {type(exc).__name__}: {exc}") from exc
        except ResponseError as exc:
            # A server that cannot take writes for now (a full disk, a replica after a failover, a long
            # script): the store is unavailable, not the request wrong.
            if isinstance(exc, ReadOnlyError) or str(exc).startswith(_UNAVAILABLE_REPLIES):
                raise StoreUnavailable(f"Redis job store unavailable: {exc}") from exc
            raise

    async def aclose(self) -> None:
        if self._pubsub is not None:
            await self._pubsub.aclose()
            self._pubsub = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- limits ---------------------------------------------------------------------------

    _ADMIT = """
local d = decide(args.owner, args.rate, args.cap, args.now, 0)
if d.allowed then
  take_slot(args.owner, args.slot, args.now + args.lease_s, args.now)
  d.slot = args.slot
end
return fields(d)
"""

    async def admit(self, owner: str, limits: Limits, slot: str, lease_s: float, now: float) -> Admission:
        return _admission(await self._run(self._ADMIT, owner=owner, rate=limits.rate_per_minute,
                                          cap=limits.max_concurrent, slot=slot, lease_s=lease_s, now=now))

    # A lapsed lease is gone even if nothing pruned it yet.
    _RENEW = """
local expiry = redis.call('ZSCORE', key('slots', args.owner), args.slot)
if not expiry or tonumber(expiry) <= args.now then
  redis.call('ZREM', key('slots', args.owner), args.slot)
  return 0
end
take_slot(args.owner, args.slot, args.now + args.lease_s, args.now)
return 1
"""

    async def renew(self, owner: str, slot: str, lease_s: float, now: float) -> bool:
        return bool(await self._run(self._RENEW, owner=owner, slot=slot, lease_s=lease_s, now=now))

    _RELEASE = """
redis.call('ZREM', key('slots', args.owner), args.slot)
announce()
"""

    async def release(self, owner: str, slot: str, now: float) -> None:
        await self._run(self._RELEASE, owner=owner, slot=slot)

    # -- jobs -----------------------------------------------------------------------------

    _ENQUEUE = """
local owner, now, id = args.owner, args.now, args.id
local pending = redis.call('SCARD', key('queued', owner))
local stored = stored_bytes(owner) + args.bytes
if stored > args.max_stored and pending < args.max_pending then
  forget_ended_inputs(owner)  -- about to refuse: not for jobs that ended unseen
  stored = stored_bytes(owner) + args.bytes
end
local queued = {pending = pending, max_pending = args.max_pending, stored = stored, max_stored = args.max_stored}
local d, seq = decide(owner, args.rate, args.cap, now, args.cap_pending and pending or nil, queued)
if d.allowed then
  local record = {'seq', seq}
  for name, value in pairs(args.job) do
    record[#record + 1] = name
    record[#record + 1] = value
  end
  redis.call('HSET', key('job', id), unpack(record))
  if #args.logs > 0 then redis.call('RPUSH', key('logs', id), unpack(args.logs)) end
  hold_input(owner, id, args.bytes)
  push(id, owner, seq)  -- seq only grows, so the job goes behind everything queued
  if args.start_timeout_s then redis.call('ZADD', key('deadlines'), now + args.start_timeout_s, id) end
  d.queue_position = redis.call('ZCARD', key('queue')) - 1
  announce()
end
return fields(d)
"""

    async def enqueue(self, job: Job, limits: Limits, cap_pending: bool, now: float) -> Admission:
        accepted = job.model_copy(update={"status": JobStatus.QUEUED, "created_at": now})
        return _admission(await self._run(
            self._ENQUEUE, grows=True, owner=job.owner, rate=limits.rate_per_minute, cap=limits.max_concurrent,
            max_pending=limits.max_pending, max_stored=limits.max_stored_bytes, bytes=input_bytes(job.input),
            cap_pending=cap_pending, now=now, id=job.id, start_timeout_s=job.start_timeout_s,
            logs=[line.model_dump_json() for line in accepted.logs], job=_job_hash(accepted)))

    _GET = """
if not visible(args.id, args.owner, args.now) then return false end
return job_reply(args.id, args.brief and 'brief' or 'read')
"""

    async def get(self, job_id: str, owner: str, now: float, brief: bool) -> Job | None:
        return _job(await self._run(self._GET, id=job_id, owner=owner, now=now, brief=brief))

    # Walks owners in the order of their first queued job (pages by order: `owners` may change meanwhile).
    _CLAIM = """
local now = args.now
expire_unstarted(now, args.ttl)
local after = '-inf'
repeat
  local page = redis.call('ZRANGEBYSCORE', key('owners'), after, '+inf', 'WITHSCORES', 'LIMIT', 0, 100)
  for i = 1, #page, 2 do
    local owner = page[i]
    after = '(' .. page[i + 1]
    local id = redis.call('ZRANGE', key('queue', owner), 0, 0)[1]
    local job = key('job', id or '')
    if not id then
      place_owner(owner)
    elseif not redis.call('ZSCORE', key('queue'), id) then
      -- Dequeued by a replica of the previous version: not this owner's first job any more.
      redis.call('ZREM', key('queue', owner), id)
      place_owner(owner)
    elseif redis.call('ZCARD', prune_slots(owner, now)) < tonumber(redis.call('HGET', job, 'max_concurrent')) then
      dequeue(id, owner)
      take_slot(owner, id, now + args.lease_s, now)
      redis.call('ZADD', key('running'), now + args.lease_s, id)
      redis.call('HSET', job, 'status', 'running', 'runner', args.runner, 'lease_until', now + args.lease_s)
      redis.call('HINCRBY', job, 'attempts', 1)
      redis.call('HSETNX', job, 'started_at', now)
      return job_reply(id, 'full')
    end
  end
until #page == 0
return false
"""

    async def claim(self, runner: str, lease_s: float, now: float) -> Job | None:
        return _job(await self._run(self._CLAIM, runner=runner, lease_s=lease_s, now=now, ttl=self._ttl), full=True)

    _HEARTBEAT = """
local id, now = args.id, args.now
if not running_by(id, args.runner) then return 0 end
-- A lapsed lease reap has not acted on is still this runner's: only a reap takes a job away. A lease only grows.
local job = key('job', id)
local expiry = math.max(now + args.lease_s, tonumber(redis.call('HGET', job, 'lease_until')) or now)
redis.call('HSET', job, 'lease_until', expiry)
redis.call('ZADD', key('running'), expiry, id)
take_slot(redis.call('HGET', job, 'owner'), id, expiry, now)
if redis.call('HGET', job, 'cancel_requested') == 'true' then return 0 end
return 1
"""

    async def heartbeat(self, job_id: str, runner: str, lease_s: float, now: float) -> bool:
        return bool(await self._run(self._HEARTBEAT, id=job_id, runner=runner, lease_s=lease_s, now=now))

    # line: LogLine JSON, stamped with `now` by the client (cjson would round the float).
    _LOG = """
if running_by(args.id, args.runner) then redis.call('RPUSH', key('logs', args.id), args.line) end
"""

    async def log(self, job_id: str, runner: str, message: str, now: float) -> None:
        line = LogLine(timestamp=now, message=message).model_dump_json()
        await self._run(self._LOG, id=job_id, runner=runner, line=line)

    _FINISH = """
local id = args.id
-- Even past its lease (MemoryStore.finish): nobody else can have it while it is running on this runner.
if not running_by(id, args.runner) then return 0 end
if redis.call('HGET', key('job', id), 'cancel_requested') == 'true' then  -- MemoryStore.finish
  terminate(id, 'cancelled', args.now, args.ttl, nil, CANCELLED)
else
  terminate(id, args.status, args.now, args.ttl, args.result, args.error)
end
return 1
"""

    async def finish(
        self, job_id: str, runner: str, result: JobResult | None, error: JobError | None, now: float
    ) -> bool:
        return bool(await self._run(
            self._FINISH, id=job_id, runner=runner, status=final_status(result, error).value, now=now,
            ttl=self._ttl, result=result.model_dump_json() if result is not None else None,
            error=error.model_dump_json() if error is not None else None))

    # requeued: as reap's.
    _REQUEUE = """
if not running_by(args.id, args.runner) then return 0 end
lose(args.id, args.now, args.ttl, args.max_attempts, args.requeued, args.error)
return 1
"""

    async def requeue(self, job_id: str, runner: str, error: JobError, now: float) -> bool:
        requeued = LogLine(timestamp=now, message=REQUEUED).model_dump_json()
        return bool(await self._run(
            self._REQUEUE, id=job_id, runner=runner, now=now, ttl=self._ttl, max_attempts=self._max_attempts,
            requeued=requeued, error=error.model_dump_json()))

    _CANCEL = """
local id, owner, now = args.id, args.owner, args.now
if not visible(id, owner, now) then return 'not_found' end
local job = key('job', id)
local status = redis.call('HGET', job, 'status')
if status == 'queued' then
  dequeue(id, owner)
  terminate(id, 'cancelled', now, args.ttl, nil, CANCELLED)
  return 'cancelled'
elseif status == 'running' then
  redis.call('HSET', job, 'cancel_requested', 'true')
  return 'requested'
end
return 'already_done'
"""

    async def cancel(self, job_id: str, owner: str, now: float) -> CancelOutcome:
        return CancelOutcome(await self._run(self._CANCEL, id=job_id, owner=owner, now=now, ttl=self._ttl))

    # requeued: the LogLine JSON a re-queued job gets.
    _REAP = """
local now, ttl = args.now, args.ttl
local lost = redis.call('ZRANGEBYSCORE', key('running'), '-inf', now)
-- Newest first, as MemoryStore walks its jobs: each re-queue goes to the front, so the lost jobs
-- end up in accept order.
local seq = {}
for _, id in ipairs(lost) do seq[id] = tonumber(redis.call('HGET', key('job', id), 'seq')) end
table.sort(lost, function(a, b) return seq[a] > seq[b] end)
for _, id in ipairs(lost) do lose(id, now, ttl, args.max_attempts, args.requeued, WORKER_LOST) end
local expired = redis.call('ZRANGEBYSCORE', key('expiring'), '-inf', now)
for _, id in ipairs(expired) do forget(id) end
-- Deliveries whose deliverer died: offered again, at the front, oldest lease first.
local undelivered = redis.call('ZRANGEBYSCORE', key('notifying'), '-inf', now)
for i = #undelivered, 1, -1 do
  redis.call('ZREM', key('notifying'), undelivered[i])
  redis.call('LPUSH', key('finished'), undelivered[i])
end
-- The owners' queues hold every queued job, unless a replica of the previous version queued or dequeued
-- some: then they are rebuilt from the queue (O(owners) to check, O(queue) only to rebuild).
local owners, in_owner_queues = redis.call('ZRANGE', key('owners'), 0, -1), 0
for _, owner in ipairs(owners) do in_owner_queues = in_owner_queues + redis.call('ZCARD', key('queue', owner)) end
if in_owner_queues ~= redis.call('ZCARD', key('queue')) then
  for _, owner in ipairs(owners) do redis.call('DEL', key('queue', owner)) end
  redis.call('DEL', key('owners'))
  local queued = redis.call('ZRANGE', key('queue'), 0, -1, 'WITHSCORES')
  for i = 1, #queued, 2 do
    local owner = redis.call('HGET', key('job', queued[i]), 'owner')
    if owner then
      redis.call('ZADD', key('queue', owner), queued[i + 1], queued[i])
      redis.call('ZADD', key('owners'), 'NX', queued[i + 1], owner)  -- in order: the first is its first job
    end
  end
end
return #lost + #expired + expire_unstarted(now, ttl)
"""

    async def reap(self, now: float) -> int:
        requeued = LogLine(timestamp=now, message=REQUEUED).model_dump_json()
        return await self._run(self._REAP, now=now, ttl=self._ttl, max_attempts=self._max_attempts,
                               requeued=requeued)

    # -- the completion outbox ------------------------------------------------------------

    _TAKE_FINISHED = """
local taken = {}
for _ = 1, args.limit do
  local id = redis.call('LPOP', key('finished'))
  if not id then break end
  if redis.call('EXISTS', key('job', id)) == 1 then
    taken[#taken + 1] = job_reply(id, 'read')
    redis.call('ZADD', key('notifying'), args.now + args.lease_s, id)
  end
end
return taken
"""

    async def take_finished(self, limit: int, lease_s: float, now: float) -> list[Job]:
        return [_job(reply) for reply in await self._run(self._TAKE_FINISHED, limit=limit, lease_s=lease_s,
                                                          now=now)]

    _NOTIFIED = """
redis.call('ZREM', key('notifying'), args.id)
"""

    async def notified(self, job_id: str, now: float) -> None:
        await self._run(self._NOTIFIED, id=job_id)

    _RENOTIFY = """
redis.call('ZREM', key('notifying'), args.id)
local status = redis.call('HGET', key('job', args.id), 'status')
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  redis.call('RPUSH', key('finished'), args.id)
end
"""

    async def renotify(self, job_id: str, now: float) -> None:
        await self._run(self._RENOTIFY, id=job_id)

    # Slots are keyed by owner: found by name (SCAN), once per outage. Patterns escaped: a prefix or owner may
    # hold glob characters.
    _RESUME = r"""
local now = args.now
local away = now - math.max(args.since, tonumber(redis.call('GET', key('resumed'))) or args.since)
if away <= 0 then return end
redis.call('SET', key('resumed'), now)
local running = redis.call('ZRANGE', key('running'), 0, -1, 'WITHSCORES')
for i = 1, #running, 2 do
  local expiry = tonumber(running[i + 1]) + away
  redis.call('ZADD', key('running'), expiry, running[i])
  redis.call('HSET', key('job', running[i]), 'lease_until', expiry)
end
local pattern, cursor = string.gsub(key('slots', ''), '[%*%?%[%]\\]', '\\%0') .. '*', '0'
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', pattern, 'COUNT', 1000)
  cursor = page[1]
  for _, slots in ipairs(page[2]) do
    local held = redis.call('ZRANGE', slots, 0, -1, 'WITHSCORES')
    for i = 1, #held, 2 do redis.call('ZADD', slots, tonumber(held[i + 1]) + away, held[i]) end
    if #held > 0 then expire_after(slots, tonumber(held[#held]) + away, now) end
  end
until cursor == '0'
"""

    async def resume(self, since: float, now: float) -> None:
        await self._run(self._RESUME, since=since, now=now)

    _COUNTS = """
return {redis.call('ZCARD', key('queue')), redis.call('ZCARD', key('running'))}
"""

    async def counts(self, now: float) -> dict[str, int]:
        queued, running = await self._run(self._COUNTS)
        return {"queued": int(queued), "running": int(running)}

    # Reads only: slots past their lease are not counted (score <= now), rather than pruned.
    _STARTABLE = """
local total, after = 0, '-inf'
repeat
  local page = redis.call('ZRANGEBYSCORE', key('owners'), after, '+inf', 'WITHSCORES', 'LIMIT', 0, 100)
  for i = 1, #page, 2 do
    local owner = page[i]
    after = '(' .. page[i + 1]
    local id = redis.call('ZRANGE', key('queue', owner), 0, 0)[1]
    local cap = id and tonumber(redis.call('HGET', key('job', id), 'max_concurrent'))
    if cap then
      local room = cap - redis.call('ZCOUNT', key('slots', owner), '(' .. args.now, '+inf')
      total = total + math.max(0, math.min(redis.call('ZCARD', key('queue', owner)), room))
    end
  end
until #page == 0
return total
"""

    async def startable(self, now: float) -> int:
        return int(await self._run(self._STARTABLE, now=now))

    # -- waiting for work -----------------------------------------------------------------

    async def wait_for_work(self, seen: int, timeout_s: float, now: float) -> int:
        channel = f"{self._prefix}:work"
        async with self._waiting:
            try:
                if self._pubsub is None:
                    pubsub = self._redis().pubsub()
                    try:
                        await pubsub.subscribe(channel)  # before reading the counter: no move is missed
                    except BaseException:
                        await pubsub.aclose()
                        raise
                    self._pubsub = pubsub
                await self._drain()  # what was published while nobody waited: the counter read next has it
                current = int(await self._redis().get(channel) or 0)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout_s
                # Any published message means a move (an earlier one only wakes us once too often).
                while current == seen and (left := deadline - loop.time()) > 0:
                    message = await self._pubsub.get_message(timeout=left)
                    if message is not None and message["type"] == "message":
                        await self._drain()
                        current = int(await self._redis().get(channel) or 0)
                return current
            except asyncio.CancelledError:
                raise  # the runner stopped waiting; redis-py reconnects and subscribes again on the next read
            except Exception as exc:
                if self._pubsub is not None:  # subscribed anew on the next wait
                    with contextlib.suppress(Exception):
                        await self._pubsub.aclose()
                    self._pubsub = None
                if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
                    raise StoreUnavailable(f"Redis job store unavailable: {type(exc).__name__}: {exc}") from exc
                raise

    async def _drain(self) -> None:
        """Read every message already delivered, without waiting: under load each end of a job publishes,
        and an unread backlog would grow until Redis drops the subscriber."""
        for _ in range(100_000):  # None: nothing more delivered (subscription confirmations come back too)
            if await self._pubsub.get_message(timeout=0) is None:
                return
