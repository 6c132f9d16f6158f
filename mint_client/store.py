"""The bot's money store: proofs, NUT-13 counters and the payment record, in SQLite.

One connection, used from one dedicated thread, so every transaction is serialized
and the event loop never waits on disk. WAL with ``synchronous=FULL``: a committed
write survives a crash, and new proofs are committed before anything depends on them.

Proof states:
  ``reserved``  signed for a payment still in flight; only that payment may touch them
  ``held``      the bot's own (what it earned)
  ``issued``    given back as change or refund; no longer ours
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mint_client.tokens import DLEQ, Proof

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    keyset_id TEXT PRIMARY KEY,
    counter   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS payments (
    id            TEXT PRIMARY KEY,
    created_at    REAL NOT NULL,
    transport     TEXT NOT NULL,
    mint          TEXT NOT NULL,
    unit          TEXT NOT NULL,
    token_hash    TEXT NOT NULL,
    input_ys      TEXT NOT NULL,
    paid_sat      INTEGER NOT NULL,
    fee_sat       INTEGER NOT NULL,
    keyset_id     TEXT NOT NULL,
    counter_start INTEGER NOT NULL,
    amounts       TEXT NOT NULL,
    status        TEXT NOT NULL,
    charged_sat   INTEGER,
    change_sat    INTEGER,
    change_token  TEXT,
    reply_to      TEXT,
    delivered_at  REAL,
    pickups       INTEGER NOT NULL DEFAULT 0,
    updated_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_token ON payments(token_hash);
CREATE INDEX IF NOT EXISTS payments_status ON payments(status);
CREATE INDEX IF NOT EXISTS payments_reply_to ON payments(reply_to, created_at);
CREATE TABLE IF NOT EXISTS proofs (
    y          TEXT PRIMARY KEY,
    mint       TEXT NOT NULL,
    unit       TEXT NOT NULL,
    keyset_id  TEXT NOT NULL,
    amount     INTEGER NOT NULL,
    secret     TEXT NOT NULL,
    c          TEXT NOT NULL,
    dleq_e     TEXT,
    dleq_s     TEXT,
    dleq_r     TEXT,
    state      TEXT NOT NULL,
    payment_id TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS proofs_payment ON proofs(payment_id);
CREATE INDEX IF NOT EXISTS proofs_state ON proofs(state, mint);
"""


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """One payment as the store remembers it."""

    id: str
    transport: str
    mint: str
    unit: str
    token_hash: str
    input_ys: list[str]
    paid_sat: int
    fee_sat: int
    keyset_id: str
    counter_start: int
    amounts: list[int]
    status: str
    charged_sat: int | None
    change_sat: int | None
    change_token: str | None
    #: where to deliver the change again after a crash ("nip17:<hex pubkey>", ...); None
    #: for HTTP, whose change waits for pickup
    reply_to: str | None = None
    created_at: float = 0.0
    delivered_at: float | None = None
    pickups: int = 0


_PAYMENT_COLUMNS = (
    "id, transport, mint, unit, token_hash, input_ys, paid_sat, fee_sat, keyset_id, "
    "counter_start, amounts, status, charged_sat, change_sat, change_token, reply_to, "
    "created_at, delivered_at, pickups"
)


def _row_payment(row: Sequence[Any]) -> PaymentRecord:
    return PaymentRecord(
        id=row[0],
        transport=row[1],
        mint=row[2],
        unit=row[3],
        token_hash=row[4],
        input_ys=json.loads(row[5]),
        paid_sat=row[6],
        fee_sat=row[7],
        keyset_id=row[8],
        counter_start=row[9],
        amounts=json.loads(row[10]),
        status=row[11],
        charged_sat=row[12],
        change_sat=row[13],
        change_token=row[14],
        reply_to=row[15],
        created_at=row[16],
        delivered_at=row[17],
        pickups=row[18],
    )


@dataclass(frozen=True, slots=True)
class StoredProof:
    """A proof with the store's bookkeeping."""

    proof: Proof
    mint: str
    unit: str
    state: str
    payment_id: str | None


class StoreError(Exception):
    """The store's invariants would break (a proof handed out twice, a state skipped)."""


class ProofStore:
    """Proofs, counters and payments in ``<path>/wallet.sqlite3``."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.db_path = path / "wallet.sqlite3"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="proof-store")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        """Open (and create) the database."""
        await self._run(self._open)

    def _open(self) -> None:
        db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=10000")
        db.executescript(_SCHEMA)
        self._db = db

    async def close(self) -> None:
        """Close the database and its thread."""
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        if db is None:
            raise StoreError("store is not open")
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    # -- counters (NUT-13) ------------------------------------------------------------

    async def reserve_counters(self, keyset_id: str, n: int) -> int:
        """Take ``n`` fresh counter values for ``keyset_id``; returns the first.

        Committed before the outputs are sent, so a value is never used twice, even
        across a crash.
        """

        def tx(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT counter FROM counters WHERE keyset_id=?", (keyset_id,)
            ).fetchone()
            start = int(row[0]) if row else 0
            db.execute(
                "INSERT INTO counters(keyset_id, counter) VALUES(?, ?) "
                "ON CONFLICT(keyset_id) DO UPDATE SET counter=excluded.counter",
                (keyset_id, start + n),
            )
            return start

        return await self._run(self._tx, tx)

    # -- payments ---------------------------------------------------------------------

    async def begin_payment(self, rec: PaymentRecord) -> None:
        """Record a payment before its swap is sent (status ``redeeming``)."""
        now = time.time()

        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO payments(id, created_at, transport, mint, unit, token_hash, "
                "input_ys, paid_sat, fee_sat, keyset_id, counter_start, amounts, status, "
                "charged_sat, change_sat, change_token, updated_at) "
                "VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.id,
                    now,
                    rec.transport,
                    rec.mint,
                    rec.unit,
                    rec.token_hash,
                    json.dumps(rec.input_ys),
                    rec.paid_sat,
                    rec.fee_sat,
                    rec.keyset_id,
                    rec.counter_start,
                    json.dumps(rec.amounts),
                    rec.status,
                    rec.charged_sat,
                    rec.change_sat,
                    rec.change_token,
                    now,
                ),
            )

        await self._run(self._tx, tx)

    async def set_payment_status(self, payment_id: str, status: str) -> None:
        """Move a payment to ``status`` (e.g. ``failed`` when the mint refused the swap)."""

        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE payments SET status=?, updated_at=? WHERE id=?",
                (status, time.time(), payment_id),
            )

        await self._run(self._tx, tx)

    async def add_redeemed_proofs(
        self, payment_id: str, mint: str, unit: str, proofs: Sequence[Proof]
    ) -> None:
        """Store the proofs a swap gave us, reserved for ``payment_id`` (status ``redeemed``)."""
        now = time.time()

        def tx(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO proofs(y, mint, unit, keyset_id, amount, secret, c, dleq_e, "
                "dleq_s, dleq_r, state, payment_id, updated_at) "
                "VALUES(?,?,?,?,?,?,?,?,?,?,'reserved',?,?)",
                [
                    (
                        p.Y(),
                        mint,
                        unit,
                        p.keyset_id,
                        p.amount,
                        p.secret,
                        p.C,
                        p.dleq.e if p.dleq else None,
                        p.dleq.s if p.dleq else None,
                        p.dleq.r if p.dleq else None,
                        payment_id,
                        now,
                    )
                    for p in proofs
                ],
            )
            db.execute(
                "UPDATE payments SET status='redeemed', updated_at=? WHERE id=?",
                (now, payment_id),
            )

        await self._run(self._tx, tx)

    async def settle_payment(
        self,
        payment_id: str,
        *,
        status: str,
        charged_sat: int,
        change_ys: Sequence[str],
        change_sat: int,
        change_token: str | None,
    ) -> None:
        """Give ``change_ys`` out as change and keep the rest, in one transaction.

        Refuses (and changes nothing) unless every change proof is still reserved for
        this payment and the amounts add up: a proof is never handed out twice.
        """
        now = time.time()

        def tx(db: sqlite3.Connection) -> None:
            rows = db.execute(
                "SELECT y, amount FROM proofs WHERE payment_id=? AND state='reserved'",
                (payment_id,),
            ).fetchall()
            reserved = {str(y): int(a) for y, a in rows}
            if any(y not in reserved for y in change_ys):
                raise StoreError(f"payment {payment_id}: change proof not reserved for it")
            if sum(reserved[y] for y in change_ys) != change_sat:
                raise StoreError(f"payment {payment_id}: change proofs don't sum to change")
            kept = sum(reserved.values()) - change_sat
            if kept != charged_sat:
                raise StoreError(f"payment {payment_id}: kept {kept} != charged {charged_sat}")
            db.executemany(
                "UPDATE proofs SET state='issued', updated_at=? WHERE y=?",
                [(now, y) for y in change_ys],
            )
            db.execute(
                "UPDATE proofs SET state='held', updated_at=? "
                "WHERE payment_id=? AND state='reserved'",
                (now, payment_id),
            )
            db.execute(
                "UPDATE payments SET status=?, charged_sat=?, change_sat=?, change_token=?, "
                "updated_at=? WHERE id=?",
                (status, charged_sat, change_sat, change_token, now, payment_id),
            )

        await self._run(self._tx, tx)

    async def payment(self, payment_id: str) -> PaymentRecord | None:
        """One payment, or None."""
        found = await self._payments("WHERE id=?", (payment_id,))
        return found[0] if found else None

    async def payments_by_token(self, token_hash: str) -> list[PaymentRecord]:
        """The payments made with one token (by its hash), newest first."""
        return await self._payments("WHERE token_hash=? ORDER BY created_at DESC", (token_hash,))

    async def payments_in(self, *statuses: str) -> list[PaymentRecord]:
        """Payments in any of ``statuses``, oldest first."""
        marks = ",".join("?" * len(statuses))
        return await self._payments(f"WHERE status IN ({marks}) ORDER BY created_at", statuses)

    async def payments_for(self, reply_to: str, since: float) -> list[PaymentRecord]:
        """A DM sender's payments since ``since`` (epoch s), newest first."""
        return await self._payments(
            "WHERE reply_to=? AND created_at>=? ORDER BY created_at DESC", (reply_to, since)
        )

    async def all_payments(self) -> list[PaymentRecord]:
        """Every payment, oldest first (for the audit)."""
        return await self._payments("ORDER BY created_at", ())

    async def _payments(self, where: str, args: Sequence[Any]) -> list[PaymentRecord]:
        def q() -> list[PaymentRecord]:
            assert self._db is not None
            rows = self._db.execute(
                f"SELECT {_PAYMENT_COLUMNS} FROM payments {where}", tuple(args)
            ).fetchall()
            return [_row_payment(r) for r in rows]

        return await self._run(q)

    async def mark_delivered(self, payment_id: str) -> None:
        """The change (or refund) was handed to the payer's transport."""
        now = time.time()

        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE payments SET delivered_at=COALESCE(delivered_at, ?), updated_at=? "
                "WHERE id=?",
                (now, now, payment_id),
            )

        await self._run(self._tx, tx)

    async def count_pickup(self, payment_id: str) -> None:
        """The change was fetched again with POST /v1/change."""

        def tx(db: sqlite3.Connection) -> None:
            db.execute("UPDATE payments SET pickups=pickups+1 WHERE id=?", (payment_id,))

        await self._run(self._tx, tx)

    async def proofs_of(self, payment_id: str, state: str = "reserved") -> list[Proof]:
        """The proofs of one payment in ``state``."""

        def q() -> list[Proof]:
            assert self._db is not None
            rows = self._db.execute(
                "SELECT amount, keyset_id, secret, c, dleq_e, dleq_s, dleq_r FROM proofs "
                "WHERE payment_id=? AND state=? ORDER BY amount",
                (payment_id, state),
            ).fetchall()
            return [_row_proof(r) for r in rows]

        return await self._run(q)

    async def balances(self, state: str = "held") -> dict[str, int]:
        """Sum of proofs in ``state`` by mint."""

        def q() -> dict[str, int]:
            assert self._db is not None
            rows = self._db.execute(
                "SELECT mint, SUM(amount) FROM proofs WHERE state=? GROUP BY mint", (state,)
            ).fetchall()
            return {str(m): int(s) for m, s in rows}

        return await self._run(q)

    async def all_proofs(self) -> list[StoredProof]:
        """Every proof the store knows, for audits and tests."""

        def q() -> list[StoredProof]:
            assert self._db is not None
            rows = self._db.execute(
                "SELECT amount, keyset_id, secret, c, dleq_e, dleq_s, dleq_r, mint, unit, "
                "state, payment_id FROM proofs"
            ).fetchall()
            return [
                StoredProof(
                    proof=_row_proof(r[:7]), mint=r[7], unit=r[8], state=r[9], payment_id=r[10]
                )
                for r in rows
            ]

        return await self._run(q)


def _row_proof(r: Sequence[Any]) -> Proof:
    amount, keyset_id, secret, c, e, s, rr = r
    return Proof(
        amount=int(amount),
        keyset_id=str(keyset_id),
        secret=str(secret),
        C=str(c),
        dleq=DLEQ(e=e, s=s, r=rr) if e and s else None,
    )
