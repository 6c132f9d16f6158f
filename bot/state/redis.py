"""The shared state in Redis, so several bot processes share claims, limits and budget.

Every check-and-change is one Lua script (atomic in Redis, whatever the number of
processes); nothing is read in Python and written back. Every key has a TTL or is
trimmed, so nothing grows forever. Keys, under the prefix (``ecashbot:``)::

    claim:<key>                  a replay claim; TTL = the claim's
    bucket:<name>                token bucket {tokens, ts}; expires once full again
    budget:day:<date>            {tokens, m:<model>}: the day's LLM tokens; TTL 31 days
    budget:days                  zset of days with budget use not yet archived
    budget:archived:<date>       marker: the day's totals went into the history once
    budget:hist:<date>, budget:hist   archived days (hash, zset index); 30 days
    budget:limits                the limits last given to reserve_budget
    stats:hour:<YYYY-MM-DDTHH>   counters; TTL 48 h
    stats:day:<date>, stats:days counters (hash, zset index); 30 days
    stats:month:<YYYY-MM>        counters; TTL 62 days after the last write
    stats:life, stats:peak       lifetime counters; the peak day's counters and ordinal

Times come from the injected clock (so tests can cross midnight), except claim TTLs,
which are Redis's own. The archive/trim script builds key names from the prefix, so
this expects one Redis (not a cluster).

Connection and timeout errors become :class:`StateUnavailable`. Commands are not
retried (a retried script could count twice); the pool replaces dead connections when
they are next checked out, so the same object works again once Redis is back.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import redis.asyncio
import redis.exceptions

from bot.state.base import (
    DAY_S,
    KEEP_BUDGET_DAY_S,
    KEEP_DAYS,
    KEEP_HOURS_S,
    KEEP_MONTH_S,
    Reservation,
    StateUnavailable,
    TakeResult,
    UsageEvent,
    budget_left_dict,
    build_stats,
    date_of,
    day_ord,
    hour_of,
    month_of,
    ord_of,
    ttl_until,
    usage_fields,
)

__all__ = ["RedisState"]

# Errors that mean "Redis is not there (right now)", not "we sent something wrong".
_DOWN: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError (still loading)
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica during failover
    redis.exceptions.OutOfMemoryError,
    OSError,
    TimeoutError,
)

# KEYS[1] bucket; ARGV capacity, refill_per_s, amount, now. Returns {allowed, tokens, retry}.
# Claim every key or none: KEYS the claims, ARGV[1] the TTL in seconds.
_CLAIM_ALL = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then return 0 end
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], 1, 'EX', ARGV[1])
end
return 1
"""

_TAKE = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local saved = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(saved[1])
local ts = tonumber(saved[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
-- processes' clocks differ a little: time never runs backwards for a bucket
if now > ts then
  tokens = tokens + (now - ts) * rate
  ts = now
end
tokens = math.min(capacity, tokens)
local allowed = 0
local retry = 0
if amount <= tokens then
  tokens = tokens - amount
  allowed = 1
elseif amount > capacity or rate <= 0 then
  retry = -1
else
  retry = (amount - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
-- a full bucket is the same as no bucket, so it may go once it would be full again
local ttl = 172800
if rate > 0 then
  ttl = math.min(ttl, math.ceil((capacity - tokens) / rate) + 1)
end
redis.call('EXPIRE', KEYS[1], ttl)
return {allowed, tostring(tokens), tostring(retry)}
"""

# Adds delta to a budget day; if that day is archived already (a late settlement, or a
# process whose clock lags), to its history as well, so the history stays true.
# KEYS: day hash, archived marker, history hash, pending zset.
_APPLY_BUDGET = """
local function apply(day_date, day_ord, field, delta, ttl)
  redis.call('HINCRBY', KEYS[1], 'tokens', delta)
  redis.call('HINCRBY', KEYS[1], field, delta)
  redis.call('EXPIRE', KEYS[1], ttl)
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HINCRBY', KEYS[3], 'tokens', delta)
    redis.call('HINCRBY', KEYS[3], field, delta)
    redis.call('EXPIRE', KEYS[3], ttl)
  else
    redis.call('ZADD', KEYS[4], day_ord, day_date)
  end
end
"""

# KEYS as _APPLY_BUDGET + KEYS[5] limits.
# ARGV date, ord, model, tokens, daily_limit, model_limit (-1: none), buffer, ttl.
_RESERVE = (
    _APPLY_BUDGET
    + """
local field = 'm:' .. ARGV[3]
local tokens = tonumber(ARGV[4])
local daily = tonumber(ARGV[5])
local model_limit = tonumber(ARGV[6])
local buffer = tonumber(ARGV[7])
redis.call('HSET', KEYS[5], 'daily_limit', ARGV[5], 'safety_buffer', ARGV[7], field, ARGV[6])
local used = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0')
local model_used = tonumber(redis.call('HGET', KEYS[1], field) or '0')
if used + tokens > daily - buffer then
  return 0
end
if model_limit >= 0 and model_used + tokens > model_limit - buffer then
  return 0
end
apply(ARGV[1], ARGV[2], field, tokens, ARGV[8])
return 1
"""
)

# KEYS as _APPLY_BUDGET. ARGV date, ord, model, delta, ttl.
_SETTLE = (
    _APPLY_BUDGET
    + """
apply(ARGV[1], ARGV[2], 'm:' .. ARGV[3], tonumber(ARGV[4]), ARGV[5])
return 1
"""
)

# Run (at least) once per process per day: archive past budget days exactly once, and
# trim the daily history. ARGV prefix, today (ordinal), days to keep, history TTL.
_ROLL = """
local p = ARGV[1]
local today = tonumber(ARGV[2])
local keep = tonumber(ARGV[3])
local ttl = ARGV[4]
local archived = 0
local pending = redis.call('ZRANGEBYSCORE', p .. 'budget:days', '-inf', '(' .. today, 'WITHSCORES')
for i = 1, #pending, 2 do
  local day = pending[i]
  -- the marker makes this happen once, however many processes cross midnight together
  if redis.call('SET', p .. 'budget:archived:' .. day, '1', 'NX', 'EX', ttl) then
    local totals = redis.call('HGETALL', p .. 'budget:day:' .. day)
    local hist = p .. 'budget:hist:' .. day
    for j = 1, #totals, 2 do
      redis.call('HINCRBY', hist, totals[j], totals[j + 1])
    end
    redis.call('EXPIRE', hist, ttl)
    redis.call('ZADD', p .. 'budget:hist', pending[i + 1], day)
    archived = archived + 1
  end
  redis.call('ZREM', p .. 'budget:days', day)
end
local cutoff = '(' .. (today - keep + 1)
for _, index in ipairs({{'budget:hist', 'budget:hist:'}, {'stats:days', 'stats:day:'}}) do
  local old = redis.call('ZRANGEBYSCORE', p .. index[1], '-inf', cutoff)
  for _, day in ipairs(old) do
    redis.call('DEL', p .. index[2] .. day)
  end
  redis.call('ZREMRANGEBYSCORE', p .. index[1], '-inf', cutoff)
end
return archived
"""

# KEYS hour, day, month, life, peak, days index.
# ARGV ordinal, date, hour TTL, day TTL, month TTL, then field, delta pairs.
_RECORD = """
for i = 6, #ARGV, 2 do
  for k = 1, 4 do
    redis.call('HINCRBY', KEYS[k], ARGV[i], ARGV[i + 1])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('ZADD', KEYS[6], ARGV[1], ARGV[2])
-- the peak day follows today when today charges more, or when today is the peak
local peak_day = redis.call('HGET', KEYS[5], 'day')
local charged = tonumber(redis.call('HGET', KEYS[2], 'charged_sat') or '0')
local peak_charged = tonumber(redis.call('HGET', KEYS[5], 'charged_sat') or '0')
if (not peak_day) or peak_day == ARGV[1] or charged > peak_charged then
  local totals = redis.call('HGETALL', KEYS[2])
  local flat = {'day', ARGV[1]}
  for j = 1, #totals, 2 do
    if not string.find(totals[j], ':', 1, true) then
      flat[#flat + 1] = totals[j]
      flat[#flat + 1] = totals[j + 1]
    end
  end
  redis.call('DEL', KEYS[5])
  redis.call('HSET', KEYS[5], unpack(flat))
end
return 1
"""


def _ints(raw: Mapping[str, str]) -> dict[str, int]:
    return {field: int(value) for field, value in raw.items()}


class RedisState:
    """The state in one Redis, shared by every process that uses the same prefix."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "ecashbot:",
        clock: Callable[[], float] = time.time,
        timeout_s: float = 2.0,
    ) -> None:
        self._prefix = prefix
        self._clock = clock
        # One pool for the process. Short timeouts: a request waits for the state before
        # any money moves, so a dead Redis must turn into a quick 503, not a hang.
        self._redis = redis.asyncio.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
        )
        self._claim_all = self._redis.register_script(_CLAIM_ALL)
        self._take = self._redis.register_script(_TAKE)
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)
        self._roll_script = self._redis.register_script(_ROLL)
        self._record = self._redis.register_script(_RECORD)
        # The day this process last archived/trimmed for; only set once that succeeded,
        # so a Redis outage at midnight just means trying again on the next call.
        self._rolled_day: int | None = None

    def _key(self, name: str) -> str:
        return self._prefix + name

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except _DOWN as exc:
            raise StateUnavailable(f"redis: {exc}") from exc

    # -- replay claims -------------------------------------------------------------------

    async def claim(self, key: str, ttl_s: int) -> bool:
        """Claim ``key`` for ``ttl_s`` seconds (Redis's clock); True for the first only."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        with self._guard():
            return bool(await self._redis.set(self._key(f"claim:{key}"), 1, nx=True, ex=ttl_s))

    async def release(self, key: str) -> None:
        """Undo a claim."""
        with self._guard():
            await self._redis.delete(self._key(f"claim:{key}"))

    async def extend(self, key: str, ttl_s: int) -> None:
        """Keep a held claim for ``ttl_s`` from now (re-taking it if it lapsed meanwhile)."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        with self._guard():
            await self._redis.set(self._key(f"claim:{key}"), 1, ex=ttl_s)

    async def claim_all(self, keys: Sequence[str], ttl_s: int) -> bool:
        """Claim every key or none, atomically (one script)."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        if not keys:
            return True
        with self._guard():
            done = await self._claim_all(
                keys=[self._key(f"claim:{k}") for k in keys], args=[int(ttl_s)]
            )
        return bool(done)

    async def extend_all(self, keys: Sequence[str], ttl_s: int) -> None:
        """:meth:`extend` for each key, in one round trip."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        with self._guard():
            async with self._redis.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.set(self._key(f"claim:{k}"), 1, ex=ttl_s)
                await pipe.execute()

    async def release_all(self, keys: Sequence[str]) -> None:
        """:meth:`release` for each key."""
        if keys:
            with self._guard():
                await self._redis.delete(*(self._key(f"claim:{k}") for k in keys))

    # -- rate limits ---------------------------------------------------------------------

    async def take(
        self, bucket: str, *, capacity: int, refill_per_s: float, amount: int = 1
    ) -> TakeResult:
        """Take ``amount`` from a token bucket, atomically; a refused take takes nothing."""
        with self._guard():
            allowed, tokens, retry = await self._take(
                keys=[self._key(f"bucket:{bucket}")],
                args=[capacity, repr(float(refill_per_s)), amount, repr(self._clock())],
            )
        retry_s = float(retry)
        return TakeResult(
            allowed=bool(allowed),
            remaining=math.floor(float(tokens)),
            retry_after_s=math.inf if retry_s < 0 else retry_s,
        )

    # -- daily budget --------------------------------------------------------------------

    async def _roll(self, now: float) -> None:
        today = day_ord(now)
        if self._rolled_day == today:
            return
        with self._guard():
            await self._roll_script(args=[self._prefix, today, KEEP_DAYS, KEEP_BUDGET_DAY_S])
        self._rolled_day = today

    def _budget_keys(self, day: str) -> list[str]:
        return [
            self._key(f"budget:day:{day}"),
            self._key(f"budget:archived:{day}"),
            self._key(f"budget:hist:{day}"),
            self._key("budget:days"),
        ]

    async def reserve_budget(
        self,
        model: str,
        tokens: int,
        *,
        daily_limit: int,
        model_limit: int | None,
        safety_buffer: int,
    ) -> Reservation | None:
        """Reserve ``tokens`` against today's budget; None if a limit minus buffer is hit."""
        if tokens < 0:
            raise ValueError("tokens must not be negative")
        now = self._clock()
        await self._roll(now)
        today = date_of(day_ord(now))
        with self._guard():
            ok = await self._reserve(
                keys=[*self._budget_keys(today), self._key("budget:limits")],
                args=[
                    today,
                    day_ord(now),
                    model,
                    tokens,
                    daily_limit,
                    -1 if model_limit is None else model_limit,
                    safety_buffer,
                    KEEP_BUDGET_DAY_S,
                ],
            )
        return Reservation(date=today, model=model, tokens=tokens) if ok else None

    async def settle_budget(self, res: Reservation, used_tokens: int) -> None:
        """Replace a reservation by the real use, in the day the reservation was made."""
        await self._roll(self._clock())
        with self._guard():
            await self._settle(
                keys=self._budget_keys(res.date),
                args=[
                    res.date,
                    ord_of(res.date),
                    res.model,
                    used_tokens - res.tokens,
                    KEEP_BUDGET_DAY_S,
                ],
            )

    async def budget_left(self, model: str) -> dict[str, Any]:
        """Today's budget use for ``model`` and overall, with the latest limits seen."""
        now = self._clock()
        await self._roll(now)
        today = date_of(day_ord(now))
        with self._guard():
            used, model_used = await self._redis.hmget(
                self._key(f"budget:day:{today}"), ["tokens", f"m:{model}"]
            )
            limits = await self._redis.hgetall(self._key("budget:limits"))
        return budget_left_dict(today, model, int(used or 0), int(model_used or 0), _ints(limits))

    # -- statistics ----------------------------------------------------------------------

    async def record(self, event: UsageEvent) -> None:
        """Count one request in the hourly, daily, monthly and lifetime statistics."""
        fields = usage_fields(event)
        now = self._clock()
        await self._roll(now)
        today = day_ord(now)
        hour = hour_of(now)
        hour_start = math.floor(now / 3600) * 3600
        args: list[str | int] = [
            today,
            date_of(today),
            ttl_until(hour_start + KEEP_HOURS_S, now),
            ttl_until((today + KEEP_DAYS + 1) * DAY_S, now),
            KEEP_MONTH_S,
        ]
        for field, value in fields.items():
            if value:  # zeros change nothing; "requests" (always 1) names the model
                args += [field, value]
        with self._guard():
            await self._record(
                keys=[
                    self._key(f"stats:hour:{hour}"),
                    self._key(f"stats:day:{date_of(today)}"),
                    self._key(f"stats:month:{month_of(now)}"),
                    self._key("stats:life"),
                    self._key("stats:peak"),
                    self._key("stats:days"),
                ],
                args=args,
            )

    async def stats(self) -> dict[str, Any]:
        """The statistics as JSON-ready data (shape in :mod:`bot.state.base`)."""
        now = self._clock()
        await self._roll(now)
        today = day_ord(now)
        day = date_of(today)
        hours = [f"stats:hour:{day}T{h:02d}" for h in range(24)]
        days = [f"stats:day:{date_of(d)}" for d in range(today - KEEP_DAYS + 1, today + 1)]
        names = [
            *hours,
            *days,
            f"stats:month:{month_of(now)}",
            "stats:life",
            "stats:peak",
            f"budget:day:{day}",
        ]
        with self._guard():
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self._key(name))
                pipe.zrange(self._key("budget:hist"), 0, -1)
                replies: list[Any] = await pipe.execute()
            archived: Sequence[str] = replies[-1]
            async with self._redis.pipeline(transaction=False) as pipe:
                for past in archived:
                    pipe.hgetall(self._key(f"budget:hist:{past}"))
                history: list[Any] = await pipe.execute() if archived else []
        raw = [_ints(reply) for reply in replies[:-1]]
        return build_stats(
            now,
            hours=raw[:24],
            days=raw[24 : 24 + KEEP_DAYS],
            month=raw[-4],
            lifetime=raw[-3],
            peak=raw[-2],
            budget_today=raw[-1],
            budget_days=[(past, _ints(h)) for past, h in zip(archived, history, strict=True)],
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise :class:`StateUnavailable` if Redis does not answer."""
        with self._guard():
            await self._redis.ping()

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
