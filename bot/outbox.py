"""A durable outbox of signed Nostr replies, so a relay outage never loses one.

Every reply is written here (signed, ready to publish) before it is sent, and marked
sent once a relay accepted it. Replies that fail are retried until they land or their
time runs out; a reply that carries change is kept much longer and is logged loudly
if it ever expires unsent (its change also stays recorded in the wallet's store).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    event_id      TEXT PRIMARY KEY,
    event_json    TEXT NOT NULL,
    recipient     TEXT NOT NULL,
    carries_change INTEGER NOT NULL,
    seq           INTEGER NOT NULL,
    created_at    REAL NOT NULL,
    expires_at    REAL NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    sent_at       REAL
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox(sent_at, seq);
"""


@dataclass(frozen=True, slots=True)
class OutgoingEvent:
    """A signed event waiting to be published."""

    event_id: str
    event_json: str
    recipient: str
    carries_change: bool
    attempts: int


class Outbox:
    """Replies to publish, in ``<path>/outbox.sqlite3``."""

    def __init__(self, path: Path | None, clock: Callable[[], float] = time.time) -> None:
        self._path = ":memory:" if path is None else str(path / "outbox.sqlite3")
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._db: sqlite3.Connection | None = None
        self._seq = 0

    async def open(self) -> None:
        """Open (and create) the database."""

        def op() -> None:
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()
            self._seq = int(row[0])
            self._db = db

        await self._run(op)

    async def close(self) -> None:
        """Close the database and its thread."""
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("outbox is not open")
        return self._db

    async def add(
        self,
        event_id: str,
        event_json: str,
        recipient: str,
        *,
        carries_change: bool,
        ttl_s: float,
    ) -> None:
        """Keep a signed reply until it is sent or ``ttl_s`` passes. Order is kept."""
        now = self._clock()

        def op() -> None:
            self._seq += 1
            self._conn().execute(
                "INSERT OR IGNORE INTO outbox(event_id, event_json, recipient, carries_change, "
                "seq, created_at, expires_at) VALUES(?,?,?,?,?,?,?)",
                (event_id, event_json, recipient, int(carries_change), self._seq, now, now + ttl_s),
            )

        await self._run(op)

    async def mark_sent(self, event_id: str) -> None:
        """A relay accepted the event."""
        now = self._clock()
        await self._run(
            lambda: self._conn().execute(
                "UPDATE outbox SET sent_at=? WHERE event_id=?", (now, event_id)
            )
        )

    async def mark_attempt(self, event_id: str) -> None:
        """A send failed; count it."""
        await self._run(
            lambda: self._conn().execute(
                "UPDATE outbox SET attempts=attempts+1 WHERE event_id=?", (event_id,)
            )
        )

    async def unsent(self, limit: int = 100) -> list[OutgoingEvent]:
        """Replies not yet accepted by any relay and not expired, oldest first."""
        now = self._clock()

        def op() -> list[OutgoingEvent]:
            rows = (
                self._conn()
                .execute(
                    "SELECT event_id, event_json, recipient, carries_change, attempts FROM outbox "
                    "WHERE sent_at IS NULL AND expires_at > ? ORDER BY seq LIMIT ?",
                    (now, limit),
                )
                .fetchall()
            )
            return [OutgoingEvent(r[0], r[1], r[2], bool(r[3]), int(r[4])) for r in rows]

        return await self._run(op)

    async def expire(self) -> list[OutgoingEvent]:
        """Drop replies whose time ran out (and old sent ones); return the unsent dropped."""
        now = self._clock()

        def op() -> list[OutgoingEvent]:
            db = self._conn()
            rows = db.execute(
                "SELECT event_id, event_json, recipient, carries_change, attempts FROM outbox "
                "WHERE sent_at IS NULL AND expires_at <= ?",
                (now,),
            ).fetchall()
            db.execute("DELETE FROM outbox WHERE expires_at <= ?", (now,))
            db.execute(
                "DELETE FROM outbox WHERE sent_at IS NOT NULL AND sent_at < ?", (now - 86400,)
            )
            return [OutgoingEvent(r[0], r[1], r[2], bool(r[3]), int(r[4])) for r in rows]

        return await self._run(op)
