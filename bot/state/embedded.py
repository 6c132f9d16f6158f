"""The state of a single bot process, in SQLite (a file under the wallet dir, or memory).

It keeps the same data as :mod:`bot.state.redis`, under the same hash names, in a
``hashes(hash, field, value)`` table, so both give the same answers. Claims, buckets,
budget and statistics all survive a restart: Nostr relays re-deliver gift wraps for up
to two days, and their event ids must still be claimed then.

One connection, used from one dedicated thread (as in :mod:`mint_client.store`): every
call is one transaction run there, so check-and-change is atomic within the process
without a lock, and ``BEGIN IMMEDIATE`` keeps it atomic against a second connection to
the same file. WAL with ``synchronous=NORMAL``: a commit survives the process crashing
(what restarts need); only a power cut may lose the last moments, and no money is held
here.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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
    usage_fields,
)

__all__ = ["EmbeddedState"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    key        TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS buckets (
    name       TEXT PRIMARY KEY,
    tokens     REAL NOT NULL,
    ts         REAL NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hashes (
    hash  TEXT NOT NULL,
    field TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (hash, field)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS budget_days (
    date     TEXT PRIMARY KEY,
    ord      INTEGER NOT NULL,
    archived INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"""

_WAL_ATTEMPTS = 500
# A full bucket is the same as no bucket; one that never refills is kept this long.
_BUCKET_MAX_S = 2 * DAY_S


def _hincr(db: sqlite3.Connection, name: str, field: str, delta: int) -> None:
    db.execute(
        "INSERT INTO hashes(hash, field, value) VALUES(?, ?, ?) "
        "ON CONFLICT(hash, field) DO UPDATE SET value = value + excluded.value",
        (name, field, delta),
    )


def _hset(db: sqlite3.Connection, name: str, field: str, value: int) -> None:
    db.execute(
        "INSERT INTO hashes(hash, field, value) VALUES(?, ?, ?) "
        "ON CONFLICT(hash, field) DO UPDATE SET value = excluded.value",
        (name, field, value),
    )


def _hgetall(db: sqlite3.Connection, name: str) -> dict[str, int]:
    rows = db.execute("SELECT field, value FROM hashes WHERE hash=?", (name,)).fetchall()
    return {str(field): int(value) for field, value in rows}


def _hdel_range(db: sqlite3.Connection, kind: str, before: str) -> None:
    """Delete the hashes ``<kind><x>`` with ``x < before`` (dates and hours sort as text)."""
    db.execute("DELETE FROM hashes WHERE hash >= ? AND hash < ?", (kind, kind + before))


class EmbeddedState:
    """The state in one process, persisted in SQLite at ``path`` (``None``: in memory)."""

    def __init__(self, path: Path | None, *, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
        self._db: sqlite3.Connection | None = None
        self._closed = False
        # Set only after a successful roll (see RedisState): a failure is retried.
        self._rolled_day: int | None = None

    # -- the database thread ------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        # Opened lazily in the state's thread, so the constructor stays synchronous.
        if self._db is None:
            if self._path is None:
                target = ":memory:"
            else:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                target = str(self._path)
            db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=10000")
            # Switching a new file to WAL needs an exclusive lock and does not wait for
            # one (the busy timeout does not apply): retry while another connection has it.
            for attempt in range(_WAL_ATTEMPTS):
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    if attempt == _WAL_ATTEMPTS - 1:
                        raise
                    time.sleep(0.01)
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` as one transaction in the state's thread."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._tx, fn)
        except (sqlite3.OperationalError, OSError) as exc:  # disk full or failing, locked
            raise StateUnavailable(f"state database: {exc}") from exc

    # -- replay claims -------------------------------------------------------------------

    async def claim(self, key: str, ttl_s: int) -> bool:
        """Claim ``key`` for ``ttl_s`` seconds; True for the first claimer only."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        now = self._clock()

        def tx(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM claims WHERE key=? AND expires_at<=?", (key, now))
            cur = db.execute(
                "INSERT OR IGNORE INTO claims(key, expires_at) VALUES(?, ?)", (key, now + ttl_s)
            )
            return cur.rowcount == 1

        return await self._run(tx)

    async def release(self, key: str) -> None:
        """Undo a claim."""

        def tx(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM claims WHERE key=?", (key,))

        await self._run(tx)

    async def extend(self, key: str, ttl_s: int) -> None:
        """Keep a held claim for ``ttl_s`` from now (re-taking it if it lapsed meanwhile)."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        expires = self._clock() + ttl_s

        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO claims(key, expires_at) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET expires_at=excluded.expires_at",
                (key, expires),
            )

        await self._run(tx)

    async def claim_all(self, keys: Sequence[str], ttl_s: int) -> bool:
        """Claim every key or none, in one transaction."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        now = self._clock()
        keys = list(keys)

        def tx(db: sqlite3.Connection) -> bool:
            for key in keys:
                db.execute("DELETE FROM claims WHERE key=? AND expires_at<=?", (key, now))
                if db.execute("SELECT 1 FROM claims WHERE key=?", (key,)).fetchone():
                    return False
            db.executemany(
                "INSERT INTO claims(key, expires_at) VALUES(?, ?)",
                [(k, now + ttl_s) for k in dict.fromkeys(keys)],
            )
            return True

        return await self._run(tx)

    async def extend_all(self, keys: Sequence[str], ttl_s: int) -> None:
        """:meth:`extend` for each key, in one transaction."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        expires = self._clock() + ttl_s
        keys = list(keys)

        def tx(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO claims(key, expires_at) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET expires_at=excluded.expires_at",
                [(k, expires) for k in keys],
            )

        await self._run(tx)

    async def release_all(self, keys: Sequence[str]) -> None:
        """:meth:`release` for each key."""
        keys = list(keys)

        def tx(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM claims WHERE key=?", [(k,) for k in keys])

        await self._run(tx)

    # -- rate limits ---------------------------------------------------------------------

    async def take(
        self, bucket: str, *, capacity: int, refill_per_s: float, amount: int = 1
    ) -> TakeResult:
        """Take ``amount`` from a token bucket, atomically; a refused take takes nothing."""
        now = self._clock()

        def tx(db: sqlite3.Connection) -> TakeResult:
            row = db.execute("SELECT tokens, ts FROM buckets WHERE name=?", (bucket,)).fetchone()
            tokens, ts = (float(capacity), now) if row is None else (float(row[0]), float(row[1]))
            if now > ts:  # as in Redis: time never runs backwards for a bucket
                tokens += (now - ts) * refill_per_s
                ts = now
            tokens = min(float(capacity), tokens)
            retry = 0.0
            allowed = amount <= tokens
            if allowed:
                tokens -= amount
            elif amount > capacity or refill_per_s <= 0:
                retry = math.inf
            else:
                retry = (amount - tokens) / refill_per_s
            keep_s = float(_BUCKET_MAX_S)
            if refill_per_s > 0:
                keep_s = min(keep_s, math.ceil((capacity - tokens) / refill_per_s) + 1)
            db.execute(
                "INSERT INTO buckets(name, tokens, ts, expires_at) VALUES(?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET tokens=excluded.tokens, ts=excluded.ts, "
                "expires_at=excluded.expires_at",
                (bucket, tokens, ts, ts + keep_s),
            )
            return TakeResult(allowed=allowed, remaining=math.floor(tokens), retry_after_s=retry)

        return await self._run(tx)

    # -- daily budget --------------------------------------------------------------------

    async def _roll(self, now: float) -> None:
        today = day_ord(now)
        if self._rolled_day == today:
            return

        def tx(db: sqlite3.Connection) -> None:
            pending = db.execute(
                "SELECT date FROM budget_days WHERE ord<? AND archived=0", (today,)
            ).fetchall()
            for (day,) in pending:
                # The flag is the marker: only the connection that flips it archives.
                won = db.execute(
                    "UPDATE budget_days SET archived=1 WHERE date=? AND archived=0", (day,)
                ).rowcount
                if won:
                    for field, value in _hgetall(db, f"budget:day:{day}").items():
                        _hincr(db, f"budget:hist:{day}", field, value)
            cutoff = today - KEEP_DAYS + 1
            _hdel_range(db, "budget:hist:", date_of(cutoff))
            _hdel_range(db, "stats:day:", date_of(cutoff))
            budget_cutoff = day_ord(now - KEEP_BUDGET_DAY_S)
            _hdel_range(db, "budget:day:", date_of(budget_cutoff))
            db.execute("DELETE FROM budget_days WHERE ord<?", (budget_cutoff,))
            _hdel_range(db, "stats:hour:", hour_of(now - KEEP_HOURS_S))
            _hdel_range(db, "stats:month:", month_of(now - KEEP_MONTH_S))
            db.execute("DELETE FROM claims WHERE expires_at<=?", (now,))
            db.execute("DELETE FROM buckets WHERE expires_at<=?", (now,))

        await self._run(tx)
        self._rolled_day = today

    @staticmethod
    def _apply_budget(db: sqlite3.Connection, day: str, field: str, delta: int) -> None:
        _hincr(db, f"budget:day:{day}", "tokens", delta)
        _hincr(db, f"budget:day:{day}", field, delta)
        row = db.execute("SELECT archived FROM budget_days WHERE date=?", (day,)).fetchone()
        if row is not None and row[0]:
            # Archived already (a late settlement): keep the history true as well.
            _hincr(db, f"budget:hist:{day}", "tokens", delta)
            _hincr(db, f"budget:hist:{day}", field, delta)
        elif row is None:
            db.execute("INSERT INTO budget_days(date, ord) VALUES(?, ?)", (day, ord_of(day)))

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
        field = f"m:{model}"

        def tx(db: sqlite3.Connection) -> bool:
            _hset(db, "budget:limits", "daily_limit", daily_limit)
            _hset(db, "budget:limits", "safety_buffer", safety_buffer)
            _hset(db, "budget:limits", field, -1 if model_limit is None else model_limit)
            totals = _hgetall(db, f"budget:day:{today}")
            if totals.get("tokens", 0) + tokens > daily_limit - safety_buffer:
                return False
            if (
                model_limit is not None
                and totals.get(field, 0) + tokens > model_limit - safety_buffer
            ):
                return False
            self._apply_budget(db, today, field, tokens)
            return True

        ok = await self._run(tx)
        return Reservation(date=today, model=model, tokens=tokens) if ok else None

    async def settle_budget(self, res: Reservation, used_tokens: int) -> None:
        """Replace a reservation by the real use, in the day the reservation was made."""
        await self._roll(self._clock())

        def tx(db: sqlite3.Connection) -> None:
            self._apply_budget(db, res.date, f"m:{res.model}", used_tokens - res.tokens)

        await self._run(tx)

    async def budget_left(self, model: str) -> dict[str, Any]:
        """Today's budget use for ``model`` and overall, with the latest limits seen."""
        now = self._clock()
        await self._roll(now)
        today = date_of(day_ord(now))

        def tx(db: sqlite3.Connection) -> tuple[dict[str, int], dict[str, int]]:
            return _hgetall(db, f"budget:day:{today}"), _hgetall(db, "budget:limits")

        totals, limits = await self._run(tx)
        return budget_left_dict(
            today, model, totals.get("tokens", 0), totals.get(f"m:{model}", 0), limits
        )

    # -- statistics ----------------------------------------------------------------------

    async def record(self, event: UsageEvent) -> None:
        """Count one request in the hourly, daily, monthly and lifetime statistics."""
        fields = usage_fields(event)
        now = self._clock()
        await self._roll(now)
        today = day_ord(now)
        day_hash = f"stats:day:{date_of(today)}"
        hashes = (f"stats:hour:{hour_of(now)}", day_hash, f"stats:month:{month_of(now)}")

        def tx(db: sqlite3.Connection) -> None:
            for field, value in fields.items():
                if value:  # zeros change nothing; "requests" (always 1) names the model
                    for name in (*hashes, "stats:life"):
                        _hincr(db, name, field, value)
            # The peak day follows today when today charges more, or when today is it.
            peak = _hgetall(db, "stats:peak")
            charged = _hgetall(db, day_hash).get("charged_sat", 0)
            if not peak or peak["day"] == today or charged > peak.get("charged_sat", 0):
                db.execute("DELETE FROM hashes WHERE hash='stats:peak'")
                _hset(db, "stats:peak", "day", today)
                for field, value in _hgetall(db, day_hash).items():
                    if ":" not in field:
                        _hset(db, "stats:peak", field, value)

        await self._run(tx)

    async def stats(self) -> dict[str, Any]:
        """The statistics as JSON-ready data (shape in :mod:`bot.state.base`)."""
        now = self._clock()
        await self._roll(now)
        today = day_ord(now)
        day = date_of(today)

        def tx(db: sqlite3.Connection) -> dict[str, Any]:
            archived = db.execute(
                "SELECT date FROM budget_days WHERE archived=1 AND ord>=? ORDER BY ord",
                (today - KEEP_DAYS + 1,),
            ).fetchall()
            return build_stats(
                now,
                hours=[_hgetall(db, f"stats:hour:{day}T{h:02d}") for h in range(24)],
                days=[
                    _hgetall(db, f"stats:day:{date_of(d)}")
                    for d in range(today - KEEP_DAYS + 1, today + 1)
                ],
                month=_hgetall(db, f"stats:month:{month_of(now)}"),
                lifetime=_hgetall(db, "stats:life"),
                peak=_hgetall(db, "stats:peak"),
                budget_today=_hgetall(db, f"budget:day:{day}"),
                budget_days=[(d, _hgetall(db, f"budget:hist:{d}")) for (d,) in archived],
            )

        return await self._run(tx)

    # -- lifecycle -----------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise :class:`StateUnavailable` if the database can't be used."""

        def tx(db: sqlite3.Connection) -> None:
            db.execute("SELECT 1").fetchone()

        await self._run(tx)

    async def close(self) -> None:
        """Close the database and its thread."""

        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)
