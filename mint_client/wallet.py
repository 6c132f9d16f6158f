"""Tokens in, change out: checking a payment, redeeming it with one swap, making change.

A payment is swapped into the bot's own deterministic (NUT-13) outputs, split so that
any change amount can be paid back from the payment's *own* proofs (see
:func:`mint_client.crypto.change_friendly_split`). So making change needs no second
swap and no second fee, and concurrent payments never compete for the same proofs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mint_client import crypto, keyfile
from mint_client.errors import (
    InvalidDLEQ,
    LockRefused,
    MintBusy,
    MintError,
    MintUnavailable,
    SwapPending,
    TokenSpent,
    UnknownKeyset,
    UnsupportedToken,
)
from mint_client.p2pk import Lock, LockKey, check_lock, parse_lock, witness
from mint_client.protocol import BlindSignature, Keyset, MintRegistry, MintRejected
from mint_client.store import PaymentRecord, ProofStore, StoreError
from mint_client.tokens import Proof, Token, encode_token, expand_keyset_ids
from pricing import input_fee_sat

log = logging.getLogger(__name__)

#: swaps tried while the mint reports a passing failure (a locked database), with
#: exponential back-off from the base: 0.25 + 0.5 + 1 + 2 s at most
SWAP_ATTEMPTS = 5
SWAP_RETRY_BASE_S = 0.25


@dataclass
class RecoveryReport:
    """What a recovery pass did."""

    #: refunded payments whose refund must reach the payer (DM) or wait for pickup
    refunded: list[PaymentRecord] = field(default_factory=list)
    #: payments that never took the payer's token: its replay claim can be released
    released: list[PaymentRecord] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Incoming:
    """A token that passed every check that needs no spending: ready to redeem."""

    token: Token
    mint: str
    fee_sat: int
    token_hash: str
    #: every proof is locked to the bot's key (NUT-11) with a valid DLEQ: it can be
    #: taken with no mint call
    locked: bool = False
    #: the earliest ``locktime`` among locked proofs (their refund path opens then)
    locktime: int | None = None

    @property
    def amount_sat(self) -> int:
        """Face value of the token."""
        return self.token.amount


def _value(incoming: Incoming) -> int:
    """What a payment is worth to the bot: its face value less the mint's fee (> 0)."""
    value = incoming.amount_sat - incoming.fee_sat
    if value <= 0:
        raise UnsupportedToken("the token is worth no more than the mint's fee")
    return value


def token_hash(proofs: Sequence[Proof]) -> str:
    """A stable id of a payment token: sha256 over its sorted proof Ys."""
    return hashlib.sha256("".join(sorted(p.Y() for p in proofs)).encode()).hexdigest()


def load_or_create_seed(path: Path) -> bytes:
    """The wallet's NUT-13 seed, kept in ``<path>/seed`` (created once, mode 0600)."""
    return keyfile.load_or_create(path, "seed", 64)


class Wallet:
    """The bot's wallet: redeems payments at trusted mints and makes their change."""

    def __init__(
        self,
        store: ProofStore,
        mints: MintRegistry,
        seed: bytes,
        unit: str,
        lock_key: LockKey | None = None,
        min_lock_s: int = 3600,
        takes_locked: bool = True,
        stock_sat: int = 4096,
    ) -> None:
        self.store = store
        self.mints = mints
        self._seed = seed
        self.unit = unit
        #: the key tokens may be locked to (NUT-11); None: locked tokens are refused
        self.lock_key = lock_key
        #: a lock's refund path must stay shut this long after the token arrives, seconds
        self.min_lock_s = min_lock_s
        #: take tokens locked to ``lock_key`` (False: the key only signs sweeps of those
        #: taken before)
        self.takes_locked = takes_locked and lock_key is not None
        #: the small proofs kept for locked payments' change, sat (see crypto.stock_targets)
        self.stock_sat = stock_sat
        #: transfers out (and sweeps) this process is carrying out: recovery leaves them alone
        self._transfers_in_flight: set[str] = set()

    async def inspect(self, token: Token) -> Incoming:
        """Every check short of spending: trusted mint, unit, keysets, fee, DLEQ.

        The allow-list is checked first, so an untrusted mint is never contacted.
        """
        mint = self.mints.check_trusted(token.mint)
        if token.unit != self.unit:
            raise UnsupportedToken(f"unit {token.unit!r} not accepted; pay in {self.unit!r}")
        if not token.proofs:
            raise UnsupportedToken("the token holds no proofs")
        if len({p.secret for p in token.proofs}) != len(token.proofs):
            raise UnsupportedToken("the token holds the same proof twice")
        locks = self._locks(token.proofs)
        keysets = await self.mints.keysets(mint)
        try:
            token = expand_keyset_ids(token, [k.id for k in keysets])
        except UnknownKeyset:
            keysets = await self.mints.keysets(mint, refresh=True)
            token = expand_keyset_ids(token, [k.id for k in keysets])
        by_id: dict[str, Keyset] = {k.id: k for k in keysets}
        offline = all(lk is not None for lk in locks)
        for p, lock in zip(token.proofs, locks, strict=True):
            ks = by_id[p.keyset_id]
            if ks.unit != self.unit:
                raise UnsupportedToken(f"keyset {p.keyset_id} is for unit {ks.unit!r}")
            if lock is not None and p.dleq is None:
                if lock.locktime is not None:
                    # its sender can take it back once the locktime passes: refused, theirs
                    raise LockRefused(
                        "a locked token must carry the mint's DLEQ proofs (NUT-12): without "
                        "them the bot can't check it offline; send it again with DLEQ"
                    )
                # nobody but the bot can ever spend it: refusing would strand the money,
                # so it is swapped at the mint (which checks it), like an unlocked token
                offline = False
            if p.dleq is not None:
                keys = await self.mints.keys(mint, p.keyset_id)
                A = keys.get(p.amount)
                if A is None:
                    raise UnsupportedToken(f"keyset {p.keyset_id} has no key for {p.amount}")
                if not crypto.verify_proof_dleq(p, A):
                    raise InvalidDLEQ("a proof's DLEQ does not verify: not signed by this mint")
        fee = input_fee_sat([by_id[p.keyset_id].input_fee_ppk for p in token.proofs])
        locktimes = [lk.locktime for lk in locks if lk is not None and lk.locktime is not None]
        return Incoming(
            token=token,
            mint=mint,
            fee_sat=fee,
            token_hash=token_hash(token.proofs),
            locked=offline,
            locktime=min(locktimes) if locktimes else None,
        )

    def _locks(self, proofs: Sequence[Proof]) -> list[Lock | None]:
        """Each proof's lock (None: a plain bearer proof); LockRefused for one we can't take."""
        now = time.time()
        if self.lock_key is None or not self.takes_locked:
            if any(parse_lock(p.secret) is not None for p in proofs):
                raise LockRefused("locked tokens are not accepted here; send an unlocked token")
            return [None] * len(proofs)
        key = self.lock_key.pubkey
        return [check_lock(p.secret, key, now=now, min_lock_s=self.min_lock_s) for p in proofs]

    def _signed(self, proofs: Sequence[Proof]) -> list[Proof]:
        """The proofs, those locked to us with their NUT-11 witness (our signature)."""
        out: list[Proof] = []
        for p in proofs:
            if self.lock_key is not None and parse_lock(p.secret) is not None:
                p = dataclasses.replace(p, witness=witness(self.lock_key.sign(p.secret)))
            out.append(p)
        return out

    async def accept_locked(
        self,
        incoming: Incoming,
        payment_id: str,
        transport: str,
        reply_to: str | None = None,
    ) -> bool:
        """Take a locked payment with no mint call, if the stock can make its change.

        The proofs are kept ``locked`` (a sweep swaps them later), and stock proofs from
        which any change up to ``paid - fee`` can be made are reserved for the payment.
        False when the stock is too small: the caller redeems (swaps) instead. Replay
        protection is the caller's (the proofs' Ys claimed in the shared state); the store
        refuses a proof it already holds, too.
        """
        if not incoming.locked:
            raise MintError("accept_locked needs a token locked to the bot")
        _value(incoming)
        rec = self._record(
            incoming, payment_id, transport, reply_to, status="redeemed", locked=True
        )
        try:
            return await self.store.begin_locked_payment(rec, incoming.token.proofs)
        except StoreError as exc:
            raise TokenSpent("this locked token was already paid to the bot") from exc

    def _record(
        self,
        incoming: Incoming,
        payment_id: str,
        transport: str,
        reply_to: str | None,
        *,
        status: str,
        keyset_id: str = "",
        counter_start: int = 0,
        amounts: Sequence[int] = (),
        locked: bool = False,
    ) -> PaymentRecord:
        """The journal's first line of a payment by token (swapped or taken locked)."""
        return PaymentRecord(
            id=payment_id,
            transport=transport,
            mint=incoming.mint,
            unit=self.unit,
            token_hash=incoming.token_hash,
            input_ys=[p.Y() for p in incoming.token.proofs],
            paid_sat=incoming.amount_sat,
            fee_sat=incoming.fee_sat,
            keyset_id=keyset_id,
            counter_start=counter_start,
            amounts=list(amounts),
            status=status,
            charged_sat=None,
            change_sat=None,
            change_token=None,
            reply_to=reply_to,
            locked=locked,
        )

    def _outputs(
        self, keyset_id: str, counter_start: int, amounts: Sequence[int]
    ) -> list[crypto.BlindedOutput]:
        """The deterministic outputs of a payment: the same again after a crash."""
        return [
            crypto.blind(
                *crypto.derive_secret(self._seed, keyset_id, counter_start + i),
                a,
                keyset_id,
                counter_start + i,
            )
            for i, a in enumerate(amounts)
        ]

    async def redeem(
        self,
        incoming: Incoming,
        payment_id: str,
        transport: str,
        reply_to: str | None = None,
        amounts: list[int] | None = None,
    ) -> list[Proof]:
        """Swap the payment into our own proofs (one NUT-03 swap). Returns them, reserved.

        ``amounts``: the outputs' denominations (default: change-friendly, see the module).

        The payment and the counters it uses are committed before the swap is sent. If
        the answer is lost, the inputs' state (NUT-07) and a restore (NUT-09) tell what
        happened; unresolved, the payment stays ``redeeming`` for recovery.
        """
        mint = incoming.mint
        value = _value(incoming)
        keyset = await self.mints.active_keyset(mint, self.unit)
        if amounts is None:
            amounts = crypto.change_friendly_split(value)
        elif sum(amounts) != value:
            raise MintError(f"outputs of {sum(amounts)} sat for a payment worth {value}")
        start = await self.store.reserve_counters(keyset.id, len(amounts))
        outputs = self._outputs(keyset.id, start, amounts)
        rec = self._record(
            incoming,
            payment_id,
            transport,
            reply_to,
            status="redeeming",
            keyset_id=keyset.id,
            counter_start=start,
            amounts=amounts,
        )
        input_ys = rec.input_ys
        inputs = self._signed(incoming.token.proofs)
        await self.store.begin_payment(rec)
        pairs: list[tuple[crypto.BlindedOutput, BlindSignature]] | None = None
        for attempt in range(SWAP_ATTEMPTS):
            try:
                pairs = await self._swap(mint, inputs, outputs, retry=attempt > 0)
            except (TokenSpent, MintRejected):
                await self.store.set_payment_status(payment_id, "failed")
                raise
            except MintError as exc:
                pairs = await self._resolve_lost_swap(payment_id, mint, input_ys, outputs, exc)
                if pairs is None:
                    # the inputs are unspent: the mint did nothing. A dropped connection
                    # (a keep-alive the mint closed) is worth another try, same outputs.
                    if type(exc) is MintUnavailable and attempt + 1 < SWAP_ATTEMPTS:
                        log.info("payment %s: swap not done (%s); retried", payment_id, exc)
                        await asyncio.sleep(SWAP_RETRY_BASE_S * 2**attempt)
                        continue
                    await self.store.set_payment_status(payment_id, "failed")
                    raise
            break
        assert pairs is not None
        proofs = await self._unblind(mint, pairs)
        await self.store.add_redeemed_proofs(payment_id, mint, self.unit, proofs)
        return proofs

    async def _swap(
        self,
        mint: str,
        inputs: Sequence[Proof],
        outputs: list[crypto.BlindedOutput],
        *,
        retry: bool = False,
    ) -> list[tuple[crypto.BlindedOutput, BlindSignature]]:
        """One NUT-03 swap, repeated (same outputs) while the mint says it is busy.

        After a first attempt (``retry``), a refusal may mean an earlier attempt did the
        work, so it is raised as :class:`MintError` for the caller to resolve by
        NUT-07/NUT-09.
        """
        api = self.mints.api(mint)
        for attempt in range(SWAP_ATTEMPTS):
            try:
                signatures = await api.swap(inputs, outputs)
                return list(zip(outputs, signatures, strict=True))
            except MintBusy:
                if attempt + 1 == SWAP_ATTEMPTS:
                    raise
                log.info("mint %s busy; swap retried (attempt %d)", mint, attempt + 2)
                await asyncio.sleep(SWAP_RETRY_BASE_S * 2**attempt)
            except (TokenSpent, MintRejected) as exc:
                if attempt == 0 and not retry:
                    raise
                raise MintError(f"swap refused on retry: {exc.message}") from exc
        raise AssertionError("unreachable")

    async def _resolve_lost_swap(
        self,
        payment_id: str,
        mint: str,
        input_ys: list[str],
        outputs: list[crypto.BlindedOutput],
        cause: MintError,
    ) -> list[tuple[crypto.BlindedOutput, BlindSignature]] | None:
        """The swap's answer was lost: did the mint do it? NUT-07, then NUT-09 restore.

        None when every input is still unspent: the mint did nothing (yet).
        """
        api = self.mints.api(mint)
        try:
            states = await api.check_state(input_ys)
        except MintError as exc:
            log.warning("payment %s: swap outcome unknown, left for recovery", payment_id)
            raise SwapPending(
                "the mint did not answer; your payment is pending and will be resolved"
            ) from exc
        if all(states.get(y) == "UNSPENT" for y in input_ys):
            return None
        restored = await api.restore(outputs)
        if len(restored) == len(outputs):
            log.info("payment %s: swap answer lost, outputs restored", payment_id)
            by_b = {o.B_: (o, s) for o, s in restored}
            return [by_b[o.B_] for o in outputs]
        if not restored and all(states.get(y) == "SPENT" for y in input_ys):
            await self.store.set_payment_status(payment_id, "failed")
            raise TokenSpent("this token was already spent")
        raise SwapPending("the mint's swap is still pending; your payment will be resolved")

    async def _unblind(
        self, mint: str, pairs: list[tuple[crypto.BlindedOutput, BlindSignature]]
    ) -> list[Proof]:
        proofs: list[Proof] = []
        for out, sig in pairs:
            if sig.amount != out.amount or sig.keyset_id != out.keyset_id:
                raise MintError("mint signed a different amount or keyset than asked")
            A = (await self.mints.keys(mint, sig.keyset_id))[sig.amount]
            if sig.dleq is not None and not crypto.verify_signature_dleq(
                out, sig.C_, sig.dleq[0], sig.dleq[1], A
            ):
                raise MintError("the mint's DLEQ proof on our output does not verify")
            proofs.append(crypto.unblind(out, sig.C_, A, sig.dleq))
        return proofs

    async def settle(
        self,
        payment_id: str,
        *,
        charged_sat: int,
        change_sat: int,
        refund: bool = False,
        answer: str | None = None,
    ) -> str | None:
        """Keep ``charged_sat`` of the payment and hand back the rest as a cashuB token.

        The change proofs are picked from the payment's own proofs, so this never
        calls the mint. Returns None when there is no change.
        """
        rec = await self.store.payment(payment_id)
        if rec is None:
            raise MintError(f"unknown payment {payment_id}")
        proofs = await self.store.proofs_of(payment_id)
        chosen = crypto.select_exact([p.amount for p in proofs], change_sat)
        if chosen is None:
            raise MintError(f"payment {payment_id}: cannot make {change_sat} sat of change")
        change = [proofs[i] for i in chosen]
        token = (
            encode_token(Token(mint=rec.mint, unit=rec.unit, proofs=tuple(change)))
            if change
            else None
        )
        await self.store.settle_payment(
            payment_id,
            status="refunded" if refund else "settled",
            charged_sat=charged_sat,
            change_ys=[p.Y() for p in change],
            change_sat=change_sat,
            change_token=token,
            answer=answer,
        )
        return token

    async def receive(
        self,
        token: Token,
        transport: str = "operator",
        *,
        payment_id: str | None = None,
        reply_to: str | None = None,
    ) -> PaymentRecord:
        """Take a token in as the bot's own money: the operator funding the change stock,
        or a nutzap (a tip).

        Redeemed like a payment (one swap into change-friendly proofs) and kept whole, so
        the audit counts it as income: ``charged = paid - fee``, no change. Proofs locked
        to the bot's key are signed for. ``payment_id`` (default ``fund-<random>``) names
        the journal entry, new for each attempt (a failed one stays journalled as such);
        should a crash fall between the swap and the books, recovery refunds it to
        ``reply_to``.
        """
        incoming = await self.inspect(token)
        payment_id = payment_id or f"fund-{uuid.uuid4().hex}"
        value = incoming.amount_sat - incoming.fee_sat
        held = [p.amount for p in await self.store.held_proofs(incoming.mint, self.unit)]
        # the stock's missing small proofs first (so concurrent locked payments find
        # change of few proofs), the rest in large ones
        await self.redeem(
            incoming,
            payment_id,
            transport,
            reply_to,
            amounts=crypto.stock_split(value, held, self.stock_sat),
        )
        await self.settle(payment_id, charged_sat=value, change_sat=0)
        rec = await self.store.payment(payment_id)
        assert rec is not None
        return rec

    async def recover(self, *, busy: Collection[str], min_age_s: float) -> RecoveryReport:
        """Finish or undo payments a crash (or a lost mint answer) left half done.

        ``redeeming``: the swap's outcome is read from the mint (NUT-07) and our outputs
        restored (NUT-09) when it happened; when it didn't, the payer still holds their
        token. ``redeemed`` without an answer: a full refund is made from the payment's
        proofs. Payments in ``busy`` (in flight here) or younger than ``min_age_s`` are
        left alone.
        """
        report = RecoveryReport()
        now = time.time()
        for rec in await self.store.payments_in("redeeming", "redeemed"):
            if rec.id in busy or now - rec.created_at < min_age_s:
                continue
            try:
                if rec.status == "redeeming" and not await self._finish_redeem(rec):
                    done = await self.store.payment(rec.id)
                    if done is not None and done.status == "failed":
                        report.released.append(done)
                    continue
                await self.settle(
                    rec.id, charged_sat=0, change_sat=rec.paid_sat - rec.fee_sat, refund=True
                )
                refunded = await self.store.payment(rec.id)
                if refunded is not None:
                    report.refunded.append(refunded)
                    log.warning(
                        "payment %s: interrupted before its answer; refunded %d sat",
                        rec.id,
                        rec.paid_sat - rec.fee_sat,
                    )
            except MintError as exc:
                log.warning("payment %s: recovery postponed (%s)", rec.id, exc.message)
        return report

    async def _finish_redeem(self, rec: PaymentRecord) -> bool:
        """Resolve a swap whose outcome we never heard. True when we now hold its proofs."""
        api = self.mints.api(rec.mint)
        outputs = self._outputs(rec.keyset_id, rec.counter_start, rec.amounts)
        states = await api.check_state(rec.input_ys)
        if all(states.get(y) == "UNSPENT" for y in rec.input_ys):
            await self.store.set_payment_status(rec.id, "failed")
            log.info("payment %s: swap never happened; the payer keeps the token", rec.id)
            return False
        restored = await api.restore(outputs)
        if len(restored) == len(outputs):
            by_b = {o.B_: (o, s) for o, s in restored}
            proofs = await self._unblind(rec.mint, [by_b[o.B_] for o in outputs])
            await self.store.add_redeemed_proofs(rec.id, rec.mint, rec.unit, proofs)
            log.info("payment %s: swap had happened; outputs restored", rec.id)
            return True
        if not restored and all(states.get(y) == "SPENT" for y in rec.input_ys):
            await self.store.set_payment_status(rec.id, "failed")
            log.warning("payment %s: token spent elsewhere, not by us", rec.id)
            return False
        return False  # pending at the mint: try again later

    async def balance_sat(self) -> dict[str, int]:
        """What the bot holds (earned), by mint."""
        return await self.store.balances("held")
