"""The bot's money store: proofs, NUT-13 counters and the payment record, in SQLite.

One connection, used from one dedicated thread, so every transaction is serialized
and the event loop never waits on disk. WAL with ``synchronous=FULL``: a committed
write survives a crash, and new proofs are committed before anything depends on them.

Proof states:
  ``reserved``  signed for a payment still in flight; only that payment may touch them
  ``held``      the bot's own (what it earned)
  ``issued``    given back as change or refund; no longer ours
  ``spending``  set aside for a transfer out in flight (``spent_by`` names it)
  ``spent``     spent by the mint in a transfer out (a melt, or the swap of a send)
  ``sent``      handed out by the operator in a token (``wallet send``); no longer ours
  ``locked``    a payer's proof locked to the bot's key (NUT-11), taken with no mint call;
                ours, swapped into ``held`` proofs by a later batch (a ``sweep`` transfer)

A proof's ``payment_id`` is where it came from: the payment it was redeemed or minted
for, or the transfer whose change it is. ``for_payment`` is the payment it is reserved
for or was issued to, when that is another one: change of a locked payment comes from
the stock of ``held`` proofs. The record also keeps the Lightning invoices
handed to payers (``invoices``) and every transfer out (``transfers``).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from mint_client.crypto import cover_counts
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
    updated_at    REAL NOT NULL,
    answer        TEXT,
    locked        INTEGER NOT NULL DEFAULT 0
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
CREATE TABLE IF NOT EXISTS invoices (
    quote_id   TEXT PRIMARY KEY,
    mint       TEXT NOT NULL,
    unit       TEXT NOT NULL,
    amount_sat INTEGER NOT NULL,
    request    TEXT NOT NULL,
    expiry     INTEGER,
    transport  TEXT NOT NULL,
    reply_to   TEXT,
    status     TEXT NOT NULL,
    payment_id TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS invoices_status ON invoices(status, created_at);
CREATE TABLE IF NOT EXISTS transfers (
    id                TEXT PRIMARY KEY,
    kind              TEXT NOT NULL,
    mint              TEXT NOT NULL,
    unit              TEXT NOT NULL,
    status            TEXT NOT NULL,
    input_ys          TEXT NOT NULL,
    input_sat         INTEGER NOT NULL,
    input_fee_sat     INTEGER NOT NULL,
    amount_sat        INTEGER NOT NULL,
    fee_reserve_sat   INTEGER NOT NULL,
    keyset_id         TEXT NOT NULL,
    counter_start     INTEGER NOT NULL,
    amounts           TEXT NOT NULL,
    destination       TEXT,
    quote_id          TEXT,
    lightning_fee_sat INTEGER,
    change_sat        INTEGER,
    token             TEXT,
    preimage          TEXT,
    created_at        REAL NOT NULL,
    updated_at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS transfers_status ON transfers(status, created_at);
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
    #: the answer, kept from settlement until it is delivered: a crash in between loses
    #: neither the change nor what it paid for
    answer: str | None = None
    #: paid with proofs locked to the bot (NUT-11), taken without a swap: they stay
    #: ``locked`` (all of ``paid_sat``; the fee is paid when a sweep swaps them) and the
    #: change comes from the stock
    locked: bool = False


_PAYMENT_COLUMNS = (
    "id, transport, mint, unit, token_hash, input_ys, paid_sat, fee_sat, keyset_id, "
    "counter_start, amounts, status, charged_sat, change_sat, change_token, reply_to, "
    "created_at, delivered_at, pickups, answer, locked"
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
        answer=row[19],
        locked=bool(row[20]),
    )


def _insert_payment(db: sqlite3.Connection, rec: PaymentRecord, now: float) -> None:
    """The journal's first line of a payment (before any mint call acts on it)."""
    db.execute(
        "INSERT INTO payments(id, created_at, transport, mint, unit, token_hash, "
        "input_ys, paid_sat, fee_sat, keyset_id, counter_start, amounts, status, "
        "charged_sat, change_sat, change_token, reply_to, updated_at, locked) "
        "VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
            rec.reply_to,
            now,
            int(rec.locked),
        ),
    )


@dataclass(frozen=True, slots=True)
class StoredProof:
    """A proof with the store's bookkeeping."""

    proof: Proof
    mint: str
    unit: str
    state: str
    payment_id: str | None
    #: the transfer that spent (or is spending, or sent) the proof
    spent_by: str | None = None
    #: the payment it is reserved for or was issued to, when not ``payment_id``
    for_payment: str | None = None

    @property
    def given_to(self) -> str | None:
        """The payment this proof is reserved for or was issued to (or came from)."""
        return self.for_payment or self.payment_id


@dataclass(frozen=True, slots=True)
class InvoiceRecord:
    """A Lightning invoice (a NUT-04 mint quote) the bot gave a payer to pay a question with."""

    quote_id: str
    mint: str
    unit: str
    amount_sat: int
    request: str
    expiry: int | None
    transport: str
    #: where a refund goes if the question is lost ("nip17:<hex pubkey>"); None for HTTP
    reply_to: str | None = None
    #: ``open`` (handed out), ``claimed`` (a payment mints it), ``expired``
    status: str = "open"
    payment_id: str | None = None
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class TransferRecord:
    """Ecash the operator moved out: a token (``send``) or a Lightning payment (``melt``).

    Every sat of the inputs is accounted for once done:
    ``input_sat = amount_sat + input_fee_sat + lightning_fee_sat + change_sat``.
    """

    id: str
    kind: str
    mint: str
    unit: str
    #: ``pending`` (inputs set aside, mint call may be in flight), ``done``, ``failed``
    status: str
    input_ys: list[str]
    input_sat: int
    #: NUT-02 fee of the inputs
    input_fee_sat: int
    #: what left the wallet: the token's value, or the invoice's amount
    amount_sat: int
    #: the melt quote's Lightning fee reserve (0 for a token)
    fee_reserve_sat: int
    #: deterministic (NUT-13) outputs: NUT-08 blanks for a melt, send + keep for a swap
    keyset_id: str
    counter_start: int
    amounts: list[int]
    #: the bolt11 invoice, "<lightning address>: <bolt11>", or None for a token
    destination: str | None = None
    quote_id: str | None = None
    lightning_fee_sat: int | None = None
    change_sat: int | None = None
    token: str | None = None
    preimage: str | None = None
    created_at: float = 0.0

    @property
    def fee_sat(self) -> int:
        """Every fee the transfer cost: the mint's input fee and the Lightning fee."""
        return self.input_fee_sat + (self.lightning_fee_sat or 0)


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
        columns = {str(r[1]) for r in db.execute("PRAGMA table_info(payments)")}
        if "answer" not in columns:  # a journal from before answers were kept
            db.execute("ALTER TABLE payments ADD COLUMN answer TEXT")
        if "locked" not in columns:  # a journal from before locked payments
            db.execute("ALTER TABLE payments ADD COLUMN locked INTEGER NOT NULL DEFAULT 0")
        proof_columns = {str(r[1]) for r in db.execute("PRAGMA table_info(proofs)")}
        if "spent_by" not in proof_columns:  # a store from before transfers out
            db.execute("ALTER TABLE proofs ADD COLUMN spent_by TEXT")
        if "for_payment" not in proof_columns:  # a store from before change from stock
            db.execute("ALTER TABLE proofs ADD COLUMN for_payment TEXT")
        db.execute("CREATE INDEX IF NOT EXISTS proofs_spent_by ON proofs(spent_by)")
        db.execute("CREATE INDEX IF NOT EXISTS proofs_for_payment ON proofs(for_payment)")
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
            _insert_payment(db, rec, now)

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
        answer: str | None = None,
    ) -> None:
        """Give ``change_ys`` out as change and keep the rest, in one transaction.

        Refuses (and changes nothing) unless every change proof is still reserved for
        this payment and the amounts add up: a proof is never handed out twice.
        """
        now = time.time()

        def tx(db: sqlite3.Connection) -> None:
            rows = db.execute(
                f"SELECT y, amount FROM proofs WHERE {_RESERVED_FOR}", (payment_id, payment_id)
            ).fetchall()
            reserved = {str(y): int(a) for y, a in rows}
            if any(y not in reserved for y in change_ys):
                raise StoreError(f"payment {payment_id}: change proof not reserved for it")
            if sum(reserved[y] for y in change_ys) != change_sat:
                raise StoreError(f"payment {payment_id}: change proofs don't sum to change")
            pay = db.execute(
                "SELECT locked, paid_sat, fee_sat FROM payments WHERE id=?", (payment_id,)
            ).fetchone()
            if pay is None:
                raise StoreError(f"unknown payment {payment_id}")
            if pay[0]:  # locked: the payment's value is its locked proofs, change is stock
                if int(pay[1]) != charged_sat + change_sat + int(pay[2]):
                    raise StoreError(
                        f"payment {payment_id}: paid {pay[1]} != charged {charged_sat} + "
                        f"change {change_sat} + fee {pay[2]}"
                    )
            elif sum(reserved.values()) - change_sat != charged_sat:
                kept = sum(reserved.values()) - change_sat
                raise StoreError(f"payment {payment_id}: kept {kept} != charged {charged_sat}")
            db.executemany(
                "UPDATE proofs SET state='issued', for_payment=?, updated_at=? WHERE y=?",
                [(payment_id, now, y) for y in change_ys],
            )
            db.execute(
                "UPDATE proofs SET state='held', for_payment=NULL, updated_at=? "
                f"WHERE {_RESERVED_FOR}",
                (now, payment_id, payment_id),
            )
            db.execute(
                "UPDATE payments SET status=?, charged_sat=?, change_sat=?, change_token=?, "
                "answer=?, updated_at=? WHERE id=?",
                (status, charged_sat, change_sat, change_token, answer, now, payment_id),
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

    async def locked_payments_since(self, since: float) -> list[PaymentRecord]:
        """Payments taken locked to the bot (not failed) since ``since`` (epoch s)."""
        return await self._payments(
            "WHERE locked=1 AND status!='failed' AND created_at>=? ORDER BY created_at", (since,)
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
        """The answer and change (or refund) were handed to the payer's transport.

        The kept answer is dropped then: it was only kept for a crash in between.
        """
        now = time.time()

        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE payments SET delivered_at=COALESCE(delivered_at, ?), answer=NULL, "
                "updated_at=? WHERE id=?",
                (now, now, payment_id),
            )

        await self._run(self._tx, tx)

    async def count_pickup(self, payment_id: str) -> None:
        """The change was fetched again with POST /v1/change."""

        def tx(db: sqlite3.Connection) -> None:
            db.execute("UPDATE payments SET pickups=pickups+1 WHERE id=?", (payment_id,))

        await self._run(self._tx, tx)

    async def proofs_of(self, payment_id: str, state: str = "reserved") -> list[Proof]:
        """The proofs of one payment in ``state`` (``reserved``: stock reserved for it too)."""

        def q() -> list[Proof]:
            assert self._db is not None
            cols = "SELECT amount, keyset_id, secret, c, dleq_e, dleq_s, dleq_r FROM proofs "
            if state == "reserved":
                rows = self._db.execute(
                    f"{cols} WHERE {_RESERVED_FOR} ORDER BY amount", (payment_id, payment_id)
                ).fetchall()
            else:
                rows = self._db.execute(
                    f"{cols} WHERE payment_id=? AND state=? ORDER BY amount", (payment_id, state)
                ).fetchall()
            return [_row_proof(r) for r in rows]

        return await self._run(q)

    # -- locked payments (NUT-11) and the stock their change comes from ------------------

    async def begin_locked_payment(self, rec: PaymentRecord, proofs: Sequence[Proof]) -> bool:
        """Take a locked payment: its proofs (``locked``) and stock reserved for its change.

        In one transaction: the payment (status ``redeemed``), its proofs, and ``held``
        proofs of its mint from which every change amount up to ``paid - fee`` can be
        made, reserved for it. False (and nothing written) when the stock can't cover
        that. Raises :class:`StoreError` if a proof is already in the store (a replay).
        """
        need = rec.paid_sat - rec.fee_sat
        now = time.time()

        def tx(db: sqlite3.Connection) -> bool:
            counts = db.execute(
                "SELECT amount, COUNT(*) FROM proofs WHERE state='held' AND mint=? AND unit=? "
                "GROUP BY amount",
                (rec.mint, rec.unit),
            ).fetchall()
            plan = cover_counts({int(a): int(n) for a, n in counts}, need)
            if plan is None:
                return False
            chosen = [
                str(y)
                for a, n in plan.items()
                for (y,) in db.execute(
                    "SELECT y FROM proofs WHERE state='held' AND mint=? AND unit=? AND amount=? "
                    "LIMIT ?",
                    (rec.mint, rec.unit, a, n),
                )
            ]
            marks = ",".join("?" * len(proofs))
            seen = db.execute(
                f"SELECT COUNT(*) FROM proofs WHERE y IN ({marks})", [p.Y() for p in proofs]
            ).fetchone()[0]
            if seen:
                raise StoreError(f"payment {rec.id}: a locked proof was taken before")
            _insert_payment(db, replace(rec, status="redeemed", locked=True), now)
            _insert_proofs(db, rec.mint, rec.unit, proofs, "locked", rec.id, None, now)
            db.executemany(
                "UPDATE proofs SET state='reserved', for_payment=?, updated_at=? WHERE y=?",
                [(rec.id, now, y) for y in chosen],
            )
            return True

        return await self._run(self._tx, tx)

    async def locked_proofs(self, mint: str, unit: str, limit: int) -> list[Proof]:
        """Locked proofs waiting for a sweep at one mint, oldest first."""

        def q() -> list[Proof]:
            assert self._db is not None
            rows = self._db.execute(
                "SELECT amount, keyset_id, secret, c, dleq_e, dleq_s, dleq_r FROM proofs "
                "WHERE state='locked' AND mint=? AND unit=? ORDER BY updated_at LIMIT ?",
                (mint, unit, limit),
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
                "state, payment_id, spent_by, for_payment FROM proofs"
            ).fetchall()
            return [
                StoredProof(
                    proof=_row_proof(r[:7]),
                    mint=r[7],
                    unit=r[8],
                    state=r[9],
                    payment_id=r[10],
                    spent_by=r[11],
                    for_payment=r[12],
                )
                for r in rows
            ]

        return await self._run(q)

    # -- Lightning invoices (NUT-04 quotes users pay) and transfers out (NUT-05, tokens) --

    async def add_invoice(self, rec: InvoiceRecord) -> None:
        """Record an invoice handed to a payer (before they can pay it)."""
        now = time.time()

        def tx(db: sqlite3.Connection) -> None:
            _upsert_invoice(db, rec, now)

        await self._run(self._tx, tx)

    async def invoice(self, quote_id: str) -> InvoiceRecord | None:
        """One invoice by its quote id, or None."""
        found = await self._invoices("WHERE quote_id=?", (quote_id,))
        return found[0] if found else None

    async def invoices_in(self, *statuses: str) -> list[InvoiceRecord]:
        """Invoices in any of ``statuses``, oldest first."""
        marks = ",".join("?" * len(statuses))
        return await self._invoices(f"WHERE status IN ({marks}) ORDER BY created_at", statuses)

    async def set_invoice_status(self, quote_id: str, status: str) -> None:
        """Move an invoice to ``status`` (``expired`` when its quote lapsed unpaid)."""

        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE invoices SET status=?, updated_at=? WHERE quote_id=?",
                (status, time.time(), quote_id),
            )

        await self._run(self._tx, tx)

    async def _invoices(self, where: str, args: Sequence[Any]) -> list[InvoiceRecord]:
        def q() -> list[InvoiceRecord]:
            assert self._db is not None
            rows = self._db.execute(
                f"SELECT {_INVOICE_COLUMNS} FROM invoices {where}", tuple(args)
            ).fetchall()
            return [_row_invoice(r) for r in rows]

        return await self._run(q)

    async def begin_quote_payment(self, rec: PaymentRecord, invoice: InvoiceRecord) -> None:
        """Record a payment by a paid invoice before its ecash is minted, in one transaction.

        The payment (status ``redeeming``, ``token_hash`` ``quote:<id>``, no inputs, no
        fee) holds the counters of the deterministic outputs, so a lost mint answer can
        be restored (NUT-09); the invoice is marked ``claimed`` by it.
        """
        now = time.time()

        def tx(db: sqlite3.Connection) -> None:
            _insert_payment(db, rec, now)
            _upsert_invoice(db, replace(invoice, status="claimed", payment_id=rec.id), now)

        await self._run(self._tx, tx)

    async def held_proofs(self, mint: str, unit: str) -> list[Proof]:
        """The free (``held``) proofs at one mint, largest first."""

        def q() -> list[Proof]:
            assert self._db is not None
            rows = self._db.execute(
                "SELECT amount, keyset_id, secret, c, dleq_e, dleq_s, dleq_r FROM proofs "
                "WHERE state='held' AND mint=? AND unit=? ORDER BY amount DESC",
                (mint, unit),
            ).fetchall()
            return [_row_proof(r) for r in rows]

        return await self._run(q)

    async def proof_totals(self) -> list[tuple[str, str, str, int]]:
        """(mint, keyset id, state, sat) for every group of proofs the store holds."""

        def q() -> list[tuple[str, str, str, int]]:
            assert self._db is not None
            rows = self._db.execute(
                "SELECT mint, keyset_id, state, SUM(amount) FROM proofs "
                "GROUP BY mint, keyset_id, state ORDER BY mint, keyset_id, state"
            ).fetchall()
            return [(str(m), str(k), str(s), int(a)) for m, k, s, a in rows]

        return await self._run(q)

    async def begin_transfer(self, rec: TransferRecord) -> None:
        """Record a transfer out and set its inputs aside (``spending``), before any mint call.

        Raises :class:`StoreError` (and changes nothing) unless every input is still
        ``held`` (``locked`` for a sweep) at the transfer's mint: concurrent transfers
        never share a proof.
        """
        now = time.time()
        from_state = _FREE_STATE.get(rec.kind, "held")

        def tx(db: sqlite3.Connection) -> None:
            marks = ",".join("?" * len(rec.input_ys))
            rows = db.execute(
                f"SELECT y, amount FROM proofs WHERE y IN ({marks}) AND state=? "
                "AND mint=? AND unit=?",
                (*rec.input_ys, from_state, rec.mint, rec.unit),
            ).fetchall()
            if len(rows) != len(set(rec.input_ys)) or len(rows) != len(rec.input_ys):
                raise StoreError(f"transfer {rec.id}: an input is no longer free")
            if sum(int(a) for _, a in rows) != rec.input_sat:
                raise StoreError(f"transfer {rec.id}: inputs don't sum to {rec.input_sat}")
            db.execute(
                f"INSERT INTO transfers({_TRANSFER_COLUMNS}, updated_at) "
                f"VALUES({','.join('?' * (_TRANSFER_NCOLS + 1))})",
                (*_transfer_row(replace(rec, status="pending", created_at=now)), now),
            )
            db.executemany(
                "UPDATE proofs SET state='spending', spent_by=?, updated_at=? WHERE y=?",
                [(rec.id, now, y) for y in rec.input_ys],
            )

        await self._run(self._tx, tx)

    async def finish_transfer(
        self,
        transfer_id: str,
        *,
        inputs_state: str,
        kept: Sequence[Proof],
        sent: Sequence[Proof],
        lightning_fee_sat: int,
        change_sat: int,
        token: str | None = None,
        preimage: str | None = None,
    ) -> TransferRecord:
        """A transfer is done: its inputs are gone, ``kept`` (change) is ours, ``sent`` isn't.

        Refuses unless the inputs are still set aside for it and every sat adds up:
        inputs = amount + input fee + Lightning fee + change.
        """
        now = time.time()
        if inputs_state not in ("spent", "sent"):
            raise StoreError(f"inputs can't become {inputs_state!r}")

        def tx(db: sqlite3.Connection) -> TransferRecord:
            row = db.execute(
                f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE id=?", (transfer_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"unknown transfer {transfer_id}")
            rec = _row_transfer(row)
            if rec.status != "pending":
                raise StoreError(f"transfer {transfer_id} is {rec.status}, not pending")
            spending = db.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM proofs WHERE spent_by=? AND state='spending'",
                (transfer_id,),
            ).fetchone()[0]
            if int(spending) != rec.input_sat:
                raise StoreError(f"transfer {transfer_id}: inputs are no longer set aside")
            if sum(p.amount for p in kept) != change_sat:
                raise StoreError(f"transfer {transfer_id}: change proofs don't sum to change")
            if rec.input_sat != rec.amount_sat + rec.input_fee_sat + lightning_fee_sat + change_sat:
                raise StoreError(f"transfer {transfer_id}: inputs != amount + fees + change")
            db.execute(
                "UPDATE proofs SET state=?, updated_at=? WHERE spent_by=? AND state='spending'",
                (inputs_state, now, transfer_id),
            )
            _insert_proofs(db, rec.mint, rec.unit, kept, "held", transfer_id, None, now)
            _insert_proofs(db, rec.mint, rec.unit, sent, "sent", transfer_id, transfer_id, now)
            db.execute(
                "UPDATE transfers SET status='done', lightning_fee_sat=?, change_sat=?, token=?, "
                "preimage=?, updated_at=? WHERE id=?",
                (lightning_fee_sat, change_sat, token, preimage, now, transfer_id),
            )
            return replace(
                rec,
                status="done",
                lightning_fee_sat=lightning_fee_sat,
                change_sat=change_sat,
                token=token,
                preimage=preimage,
            )

        return await self._run(self._tx, tx)

    async def fail_transfer(self, transfer_id: str) -> None:
        """A transfer that never happened: its inputs are free (``held``) again."""
        now = time.time()

        def tx(db: sqlite3.Connection) -> None:
            kind = db.execute("SELECT kind FROM transfers WHERE id=?", (transfer_id,)).fetchone()
            free = _FREE_STATE.get(str(kind[0]) if kind else "", "held")
            db.execute(
                "UPDATE proofs SET state=?, spent_by=NULL, updated_at=? "
                "WHERE spent_by=? AND state='spending'",
                (free, now, transfer_id),
            )
            db.execute(
                "UPDATE transfers SET status='failed', updated_at=? "
                "WHERE id=? AND status='pending'",
                (now, transfer_id),
            )

        await self._run(self._tx, tx)

    async def transfer(self, transfer_id: str) -> TransferRecord | None:
        """One transfer, or None."""
        found = await self._transfers("WHERE id=?", (transfer_id,))
        return found[0] if found else None

    async def transfers_in(self, *statuses: str) -> list[TransferRecord]:
        """Transfers in any of ``statuses``, oldest first."""
        marks = ",".join("?" * len(statuses))
        return await self._transfers(f"WHERE status IN ({marks}) ORDER BY created_at", statuses)

    async def all_transfers(self) -> list[TransferRecord]:
        """Every transfer, oldest first (for the audit and ``ecashbot wallet history``)."""
        return await self._transfers("ORDER BY created_at", ())

    async def _transfers(self, where: str, args: Sequence[Any]) -> list[TransferRecord]:
        def q() -> list[TransferRecord]:
            assert self._db is not None
            rows = self._db.execute(
                f"SELECT {_TRANSFER_COLUMNS} FROM transfers {where}", tuple(args)
            ).fetchall()
            return [_row_transfer(r) for r in rows]

        return await self._run(q)

    async def proof_spends(self) -> dict[str, str]:
        """Y -> the transfer that spent (or is spending, or sent) the proof."""

        def q() -> dict[str, str]:
            assert self._db is not None
            rows = self._db.execute(
                "SELECT y, spent_by FROM proofs WHERE spent_by IS NOT NULL"
            ).fetchall()
            return {str(y): str(t) for y, t in rows}

        return await self._run(q)


#: proofs reserved for a payment: its own (from its swap), or stock reserved for it
_RESERVED_FOR = "state='reserved' AND (for_payment=? OR (for_payment IS NULL AND payment_id=?))"
#: the state a transfer's inputs come from, and go back to if it fails, by kind
_FREE_STATE = {"sweep": "locked"}


def _row_proof(r: Sequence[Any]) -> Proof:
    amount, keyset_id, secret, c, e, s, rr = r
    return Proof(
        amount=int(amount),
        keyset_id=str(keyset_id),
        secret=str(secret),
        C=str(c),
        dleq=DLEQ(e=e, s=s, r=rr) if e and s else None,
    )


# -- Lightning invoices and transfers out: rows and helpers ------------------------------

_INVOICE_COLUMNS = (
    "quote_id, mint, unit, amount_sat, request, expiry, transport, reply_to, status, "
    "payment_id, created_at"
)


def _row_invoice(r: Sequence[Any]) -> InvoiceRecord:
    return InvoiceRecord(
        quote_id=r[0],
        mint=r[1],
        unit=r[2],
        amount_sat=r[3],
        request=r[4],
        expiry=r[5],
        transport=r[6],
        reply_to=r[7],
        status=r[8],
        payment_id=r[9],
        created_at=r[10],
    )


def _upsert_invoice(db: sqlite3.Connection, rec: InvoiceRecord, now: float) -> None:
    db.execute(
        f"INSERT INTO invoices({_INVOICE_COLUMNS}, updated_at) VALUES(?,?,?,?,?,?,?,?,?,?,?,?) "
        "ON CONFLICT(quote_id) DO UPDATE SET status=excluded.status, "
        "payment_id=excluded.payment_id, updated_at=excluded.updated_at",
        (
            rec.quote_id,
            rec.mint,
            rec.unit,
            rec.amount_sat,
            rec.request,
            rec.expiry,
            rec.transport,
            rec.reply_to,
            rec.status,
            rec.payment_id,
            rec.created_at or now,
            now,
        ),
    )


_TRANSFER_COLUMNS = (
    "id, kind, mint, unit, status, input_ys, input_sat, input_fee_sat, amount_sat, "
    "fee_reserve_sat, keyset_id, counter_start, amounts, destination, quote_id, "
    "lightning_fee_sat, change_sat, token, preimage, created_at"
)
_TRANSFER_NCOLS = 20


def _transfer_row(t: TransferRecord) -> tuple[Any, ...]:
    return (
        t.id,
        t.kind,
        t.mint,
        t.unit,
        t.status,
        json.dumps(t.input_ys),
        t.input_sat,
        t.input_fee_sat,
        t.amount_sat,
        t.fee_reserve_sat,
        t.keyset_id,
        t.counter_start,
        json.dumps(t.amounts),
        t.destination,
        t.quote_id,
        t.lightning_fee_sat,
        t.change_sat,
        t.token,
        t.preimage,
        t.created_at,
    )


def _row_transfer(r: Sequence[Any]) -> TransferRecord:
    return TransferRecord(
        id=r[0],
        kind=r[1],
        mint=r[2],
        unit=r[3],
        status=r[4],
        input_ys=json.loads(r[5]),
        input_sat=r[6],
        input_fee_sat=r[7],
        amount_sat=r[8],
        fee_reserve_sat=r[9],
        keyset_id=r[10],
        counter_start=r[11],
        amounts=json.loads(r[12]),
        destination=r[13],
        quote_id=r[14],
        lightning_fee_sat=r[15],
        change_sat=r[16],
        token=r[17],
        preimage=r[18],
        created_at=r[19],
    )


def _insert_proofs(
    db: sqlite3.Connection,
    mint: str,
    unit: str,
    proofs: Sequence[Proof],
    state: str,
    origin: str,
    spent_by: str | None,
    now: float,
) -> None:
    db.executemany(
        "INSERT INTO proofs(y, mint, unit, keyset_id, amount, secret, c, dleq_e, dleq_s, "
        "dleq_r, state, payment_id, spent_by, updated_at) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
                state,
                origin,
                spent_by,
                now,
            )
            for p in proofs
        ],
    )
