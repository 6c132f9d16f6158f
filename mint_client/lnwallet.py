"""The bot's wallet with Lightning: paid invoices in (NUT-04), the operator's money out.

**In.** A payer pays an invoice the bot asked its mint for (a NUT-04 mint quote) and names
the quote instead of sending a token. The quote is minted into deterministic (NUT-13)
outputs, split like a redeemed token's (:func:`~mint_client.crypto.change_friendly_split`),
so the one pipeline settles it and makes change from the payment's own proofs. The
payment is journalled before the mint is called; a lost answer is resolved from the
quote's state (ISSUED: NUT-09 restore; PAID: the same outputs again).

**Out.** :meth:`LightningWallet.send_token` hands free ecash out as a token and
:meth:`LightningWallet.pay_invoice` melts it (NUT-05), with NUT-08 blank outputs for the
unused fee reserve. Every transfer is journalled and its inputs set aside before the mint
is called; a melt whose outcome is unknown is resolved from its quote's state before
anything is retried, and one the mint refused because the quote drifted (fee reserve,
expiry) is quoted again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from mint_client import crypto
from mint_client.errors import (
    BadInvoice,
    FeeTooHigh,
    InsufficientFunds,
    LightningFailed,
    MeltFailed,
    MeltPending,
    MintBusy,
    MintError,
    MintUnavailable,
    PaymentError,
    QuoteError,
    QuoteExpired,
    QuoteNotPaid,
    QuoteUsed,
    TokenSpent,
    UnknownQuote,
    WalletError,
)
from mint_client.lightning import (
    ISSUED,
    PAID,
    PENDING,
    UNPAID,
    LightningAPI,
    MeltQuote,
    MintQuote,
    blank_outputs,
    invoice_amount_msat,
    valid_quote_id,
)
from mint_client.protocol import BlindSignature, MintRejected
from mint_client.store import (
    InvoiceRecord,
    PaymentRecord,
    StoreError,
    TransferRecord,
)
from mint_client.tokens import Proof, Token, encode_token
from mint_client.wallet import Incoming, RecoveryReport, Wallet
from pricing import input_fee_sat

log = logging.getLogger(__name__)

#: tries of one mint call while the mint says it is busy (same outputs each time)
ATTEMPTS = 5
RETRY_BASE_S = 0.25
#: re-plans of a transfer when a concurrent one took a chosen proof first
PLAN_ATTEMPTS = 3

Pairs = list[tuple[crypto.BlindedOutput, BlindSignature]]


def quote_key(quote_id: str) -> str:
    """The ``token_hash`` of a payment made by a paid invoice (its replay-claim key too)."""
    return f"quote:{quote_id}"


def quote_of(rec: PaymentRecord) -> str | None:
    """The quote id of a payment made by a paid invoice; None for a token payment."""
    return rec.token_hash.removeprefix("quote:") if rec.token_hash.startswith("quote:") else None


@dataclass(frozen=True, slots=True)
class IncomingQuote:
    """A paid invoice (NUT-04 mint quote) that passed every check short of minting it."""

    mint: str
    quote: MintQuote
    #: minting costs no input fee
    fee_sat: int = 0

    @property
    def amount_sat(self) -> int:
        """What the invoice paid."""
        return self.quote.amount

    @property
    def token_hash(self) -> str:
        """The payment's key in the record and in the replay claims."""
        return quote_key(self.quote.quote)


@dataclass(frozen=True, slots=True)
class Balance:
    """What the wallet holds in one keyset of one mint (sat)."""

    mint: str
    keyset_id: str
    #: the bot's own, spendable
    free_sat: int
    #: payments in flight (their change is made from these)
    reserved_sat: int
    #: set aside for transfers out in flight, or locked to the bot awaiting its sweep
    pending_sat: int


def select_inputs(
    proofs: Sequence[Proof], need: Callable[[list[Proof]], int]
) -> list[Proof] | None:
    """Proofs covering ``need(chosen)`` (which grows with the inputs' fees); None if short.

    Largest first without overshooting, then the smallest proof that covers the rest, so
    that few inputs are used and little is overpaid.
    """
    rest = sorted(proofs, key=lambda p: p.amount, reverse=True)
    chosen: list[Proof] = []
    total = 0
    for p in list(rest):
        if total + p.amount <= need([*chosen, p]):
            chosen.append(p)
            total += p.amount
            rest.remove(p)
            if total == need(chosen):
                return chosen
    while total < need(chosen):
        if not rest:
            return None
        cover = [p for p in rest if total + p.amount >= need([*chosen, p])]
        p = min(cover, key=lambda q: q.amount) if cover else rest[0]
        chosen.append(p)
        total += p.amount
        rest.remove(p)
    return chosen


class LightningWallet(Wallet):
    """The bot's wallet, with invoices as payments and the operator's transfers out."""

    def lightning(self, mint: str) -> LightningAPI:
        """NUT-04/05/17 at a trusted mint (:class:`UntrustedMint` for any other)."""
        return LightningAPI(self.mints.api(mint))

    # -- in: invoices as payments -------------------------------------------------------

    async def create_invoice(
        self,
        amount_sat: int,
        *,
        transport: str,
        reply_to: str | None = None,
        mint: str | None = None,
        description: str | None = None,
    ) -> InvoiceRecord:
        """A Lightning invoice for ``amount_sat`` at ``mint`` (default: the first), recorded."""
        url = self.mints.check_trusted(mint or self.mints.urls[0])
        q = await self.lightning(url).mint_quote(amount_sat, self.unit, description)
        rec = InvoiceRecord(
            quote_id=q.quote,
            mint=url,
            unit=self.unit,
            amount_sat=q.amount,
            request=q.request,
            expiry=q.expiry,
            transport=transport,
            reply_to=reply_to,
        )
        await self.store.add_invoice(rec)
        return rec

    async def quote_state(self, quote_id: str) -> tuple[str, MintQuote]:
        """(mint, quote) for a quote id: ours from the record, else any trusted mint's."""
        if not valid_quote_id(quote_id):
            raise UnknownQuote("that is not a quote id")
        known = await self.store.invoice(quote_id)
        for mint in [known.mint] if known else self.mints.urls:
            try:
                return mint, await self.lightning(mint).mint_quote_state(quote_id, self.unit)
            except UnknownQuote:
                continue
        raise UnknownQuote(f"no accepted mint knows the quote {quote_id[:64]}")

    async def inspect_quote(self, quote_id: str) -> IncomingQuote:
        """Every check short of minting: a known quote, PAID, not issued, not expired."""
        mint, q = await self.quote_state(quote_id)
        if q.unit != self.unit:
            raise QuoteError(f"the invoice is in {q.unit!r}; pay in {self.unit!r}")
        if q.state == ISSUED:
            raise QuoteUsed(
                "this invoice was already used (for an earlier question, or refunded: "
                "POST /v1/change with X-Cashu-Quote returns what is kept for it)"
            )
        if q.state != PAID:
            raise QuoteNotPaid(
                f"the invoice is not paid yet (the mint says {q.state}); pay it, then send "
                "the quote id again"
            )
        if q.expiry is not None and q.expiry <= time.time():
            raise QuoteExpired("the invoice's quote expired before it was used")
        return IncomingQuote(mint=mint, quote=q)

    async def redeem(
        self,
        incoming: Incoming | IncomingQuote,
        payment_id: str,
        transport: str,
        reply_to: str | None = None,
        amounts: list[int] | None = None,
    ) -> list[Proof]:
        """Redeem a token (NUT-03 swap) or mint a paid invoice (NUT-04); proofs reserved."""
        if isinstance(incoming, IncomingQuote):
            return await self._mint_in(incoming, payment_id, transport, reply_to)
        return await super().redeem(incoming, payment_id, transport, reply_to, amounts)

    async def _mint_in(
        self, incoming: IncomingQuote, payment_id: str, transport: str, reply_to: str | None
    ) -> list[Proof]:
        mint, q = incoming.mint, incoming.quote
        keyset = await self.mints.active_keyset(mint, self.unit)
        amounts = crypto.change_friendly_split(q.amount)
        start = await self.store.reserve_counters(keyset.id, len(amounts))
        outputs = self._outputs(keyset.id, start, amounts)
        known = await self.store.invoice(q.quote)
        await self.store.begin_quote_payment(
            PaymentRecord(
                id=payment_id,
                transport=transport,
                mint=mint,
                unit=self.unit,
                token_hash=incoming.token_hash,
                input_ys=[],
                paid_sat=q.amount,
                fee_sat=0,
                keyset_id=keyset.id,
                counter_start=start,
                amounts=amounts,
                status="redeeming",
                charged_sat=None,
                change_sat=None,
                change_token=None,
                reply_to=reply_to,
            ),
            known
            or InvoiceRecord(
                quote_id=q.quote,
                mint=mint,
                unit=self.unit,
                amount_sat=q.amount,
                request=q.request,
                expiry=q.expiry,
                transport=transport,
                reply_to=reply_to,
            ),
        )
        pairs = await self._mint_outputs(payment_id, mint, q.quote, outputs)
        proofs = await self._unblind(mint, pairs)
        await self.store.add_redeemed_proofs(payment_id, mint, self.unit, proofs)
        return proofs

    async def _mint_outputs(
        self, payment_id: str, mint: str, quote_id: str, outputs: list[crypto.BlindedOutput]
    ) -> Pairs:
        """``POST /v1/mint/bolt11``, repeated (same outputs) while the mint is busy."""
        api = self.lightning(mint)
        for attempt in range(ATTEMPTS):
            try:
                return list(zip(outputs, await api.mint(quote_id, outputs), strict=True))
            except MintBusy:
                if attempt + 1 == ATTEMPTS:
                    break
                await asyncio.sleep(RETRY_BASE_S * 2**attempt)
            except QuoteError:
                if attempt == 0:
                    await self.store.set_payment_status(payment_id, "failed")
                    raise
                break  # after a lost answer, a refusal may mean it was done: resolve
            except MintError:
                break
        return await self._resolve_mint(payment_id, mint, quote_id, outputs)

    async def _resolve_mint(
        self, payment_id: str, mint: str, quote_id: str, outputs: list[crypto.BlindedOutput]
    ) -> Pairs:
        """A mint call whose answer was lost: the quote's state says what happened."""
        api = self.lightning(mint)
        try:
            state = (await api.mint_quote_state(quote_id, self.unit)).state
            if state == ISSUED:
                restored = await self.mints.api(mint).restore(outputs)
                if len(restored) == len(outputs):
                    log.info("payment %s: mint answer lost, outputs restored", payment_id)
                    by_b = {o.B_: (o, s) for o, s in restored}
                    return [by_b[o.B_] for o in outputs]
                if not restored:
                    await self.store.set_payment_status(payment_id, "failed")
                    raise QuoteUsed("the invoice's ecash was issued to someone else")
            elif state == PAID:  # the mint never did it: the same outputs once more
                try:
                    sigs = await api.mint(quote_id, outputs)
                except QuoteError:
                    await self.store.set_payment_status(payment_id, "failed")
                    raise
                return list(zip(outputs, sigs, strict=True))
            elif state == UNPAID:
                await self.store.set_payment_status(payment_id, "failed")
                raise QuoteNotPaid("the invoice is not paid")
            else:  # PENDING: being minted right now; ask again later
                log.info("payment %s: the quote is %s at the mint", payment_id, state)
        except QuoteError:
            raise
        except MintError as exc:
            log.warning("payment %s: mint outcome unknown (%s)", payment_id, exc.message)
        raise MintUnavailable(
            "the mint did not answer; your payment is pending and will be resolved"
        )

    async def _finish_redeem(self, rec: PaymentRecord) -> bool:
        """Resolve an interrupted mint of a paid invoice too (tokens: as the base does)."""
        quote_id = quote_of(rec)
        if quote_id is None:
            return await super()._finish_redeem(rec)
        outputs = self._outputs(rec.keyset_id, rec.counter_start, rec.amounts)
        try:
            pairs = await self._resolve_mint(rec.id, rec.mint, quote_id, outputs)
        except PaymentError as exc:
            log.info("payment %s: invoice not minted (%s)", rec.id, exc.message)
            return False
        proofs = await self._unblind(rec.mint, pairs)
        await self.store.add_redeemed_proofs(rec.id, rec.mint, rec.unit, proofs)
        log.info("payment %s: paid invoice minted after an interruption", rec.id)
        return True

    async def wait_paid(
        self, invoice: InvoiceRecord, *, poll_s: float = 2.0, deadline: float | None = None
    ) -> bool:
        """Wait (NUT-17, or polling) until the invoice is paid: True, or False at its expiry."""
        end = deadline or float(invoice.expiry or time.time() + 3600)
        q = await self.lightning(invoice.mint).wait_mint_quote(
            invoice.quote_id, self.unit, deadline=end, poll_s=poll_s
        )
        return q is not None and q.state in (PAID, ISSUED)

    # -- the operator's money: balance, tokens out, Lightning out ------------------------

    async def balances(self) -> list[Balance]:
        """Free, reserved and pending sat by mint and keyset."""
        groups: dict[tuple[str, str], dict[str, int]] = {}
        for mint, keyset_id, state, sat in await self.store.proof_totals():
            groups.setdefault((mint, keyset_id), {})[state] = sat
        return [
            Balance(
                mint=mint,
                keyset_id=keyset_id,
                free_sat=s.get("held", 0),
                reserved_sat=s.get("reserved", 0),
                pending_sat=s.get("spending", 0) + s.get("locked", 0),
            )
            for (mint, keyset_id), s in sorted(groups.items())
            if s.get("held", 0) or s.get("reserved", 0) or s.get("spending", 0) or s.get("locked")
        ]

    async def free_sat(self, mint: str) -> int:
        """Free (held) sat at one mint."""
        return sum(p.amount for p in await self.store.held_proofs(mint, self.unit))

    async def _mints_by_free(self) -> list[str]:
        free = await self.store.balances("held")
        return sorted((m for m in self.mints.urls if free.get(m)), key=lambda m: -free[m])

    async def _fees(self, mint: str) -> dict[str, int]:
        return {k.id: k.input_fee_ppk for k in await self.mints.keysets(mint)}

    async def send_token(self, amount_sat: int, *, mint: str | None = None) -> TransferRecord:
        """Hand ``amount_sat`` of free ecash out as a cashuB token (in the returned record).

        Proofs that add up exactly go out as they are (no fee); otherwise one swap makes
        the exact amount, its input fee paid from the wallet.
        """
        if amount_sat <= 0:
            raise WalletError("the amount must be positive")
        mints = [self.mints.check_trusted(mint)] if mint else await self._mints_by_free()
        last: InsufficientFunds | None = None
        for url in mints:
            try:
                return await self._send_at(url, amount_sat)
            except InsufficientFunds as exc:
                last = exc
        raise last or InsufficientFunds(
            f"the wallet holds no free ecash for {amount_sat} sat", need_sat=amount_sat, have_sat=0
        )

    async def _send_at(self, mint: str, amount_sat: int) -> TransferRecord:
        fees = await self._fees(mint)
        for _ in range(PLAN_ATTEMPTS):
            held = await self.store.held_proofs(mint, self.unit)
            exact = crypto.select_exact([p.amount for p in held], amount_sat)
            if exact is not None:
                inputs = [held[i] for i in exact]
                rec = self._transfer("send", mint, inputs, fee_sat=0, amount_sat=amount_sat)
                try:
                    await self.store.begin_transfer(rec)
                except StoreError:
                    continue
                token = encode_token(Token(mint=mint, unit=self.unit, proofs=tuple(inputs)))
                return await self.store.finish_transfer(
                    rec.id,
                    inputs_state="sent",
                    kept=[],
                    sent=[],
                    lightning_fee_sat=0,
                    change_sat=0,
                    token=token,
                )
            chosen = select_inputs(
                held, lambda ps: amount_sat + input_fee_sat([fees.get(p.keyset_id, 0) for p in ps])
            )
            if chosen is None:
                have = sum(p.amount for p in held)
                raise InsufficientFunds(
                    f"{mint} holds {have} free sat; {amount_sat} sat and the swap fee are needed",
                    need_sat=amount_sat,
                    have_sat=have,
                )
            fee = input_fee_sat([fees.get(p.keyset_id, 0) for p in chosen])
            keep = sum(p.amount for p in chosen) - amount_sat - fee
            keyset = await self.mints.active_keyset(mint, self.unit)
            amounts = crypto.split_amount(amount_sat) + crypto.split_amount(keep)
            start = await self.store.reserve_counters(keyset.id, len(amounts))
            rec = dataclasses.replace(
                self._transfer("send", mint, chosen, fee_sat=fee, amount_sat=amount_sat),
                keyset_id=keyset.id,
                counter_start=start,
                amounts=amounts,
            )
            try:
                await self.store.begin_transfer(rec)
            except StoreError:
                continue
            return await self._swap_send(rec, chosen)
        raise WalletError("other transfers keep taking the same ecash; try again")

    def _transfer(
        self,
        kind: str,
        mint: str,
        inputs: Sequence[Proof],
        *,
        fee_sat: int,
        amount_sat: int,
        fee_reserve_sat: int = 0,
        quote_id: str | None = None,
        destination: str | None = None,
    ) -> TransferRecord:
        return TransferRecord(
            id=f"{kind}-{uuid.uuid4().hex}",
            kind=kind,
            mint=mint,
            unit=self.unit,
            status="pending",
            input_ys=[p.Y() for p in inputs],
            input_sat=sum(p.amount for p in inputs),
            input_fee_sat=fee_sat,
            amount_sat=amount_sat,
            fee_reserve_sat=fee_reserve_sat,
            keyset_id="",
            counter_start=0,
            amounts=[],
            destination=destination,
            quote_id=quote_id,
        )

    async def _swap_send(self, rec: TransferRecord, inputs: Sequence[Proof]) -> TransferRecord:
        outputs = self._outputs(rec.keyset_id, rec.counter_start, rec.amounts)
        self._transfers_in_flight.add(rec.id)
        try:
            try:
                pairs: Pairs | None = await self._swap(rec.mint, inputs, outputs)
            except MintRejected as exc:
                await self.store.fail_transfer(rec.id)
                raise WalletError(f"the mint refused the swap: {exc.message}") from exc
            except (TokenSpent, MintError):
                pairs = await self._resolve_swap(rec, outputs)
            if pairs is None:
                raise MeltPending(f"the swap of {rec.id} is unresolved; recovery will finish it")
            return await self._finish_send(rec, pairs)
        finally:
            self._transfers_in_flight.discard(rec.id)

    async def _resolve_swap(
        self, rec: TransferRecord, outputs: list[crypto.BlindedOutput]
    ) -> Pairs | None:
        """A send's swap with a lost answer: NUT-07, then NUT-09. None: still unresolved."""
        api = self.mints.api(rec.mint)
        try:
            states = await api.check_state(rec.input_ys)
            if all(states.get(y) == "UNSPENT" for y in rec.input_ys):
                await self.store.fail_transfer(rec.id)
                raise WalletError("the swap did not happen; the ecash is free again")
            restored = await api.restore(outputs)
        except MintError as exc:
            log.warning("transfer %s: swap outcome unknown (%s)", rec.id, exc.message)
            return None
        if len(restored) == len(outputs):
            by_b = {o.B_: (o, s) for o, s in restored}
            return [by_b[o.B_] for o in outputs]
        log.error("transfer %s: inputs spent but outputs not found at the mint", rec.id)
        return None

    async def _finish_send(self, rec: TransferRecord, pairs: Pairs) -> TransferRecord:
        proofs = await self._unblind(rec.mint, pairs)
        n_send = len(crypto.split_amount(rec.amount_sat))
        sent, kept = proofs[:n_send], proofs[n_send:]
        token = (
            encode_token(Token(mint=rec.mint, unit=self.unit, proofs=tuple(sent))) if sent else None
        )
        return await self.store.finish_transfer(
            rec.id,
            inputs_state="spent",
            kept=kept,
            sent=sent,
            lightning_fee_sat=0,
            change_sat=sum(p.amount for p in kept),
            token=token,
        )

    async def sweep(self, mint: str, *, max_inputs: int) -> TransferRecord | None:
        """Swap locked proofs (payments taken with no mint call) into our own, in one batch.

        The outputs top the stock of small proofs up first (change for later locked
        payments comes from it). Recorded as a transfer of kind ``sweep`` (amount 0: the
        inputs' fee is paid, the rest comes back held), so a lost answer is resolved like
        any swap. None when nothing is locked at ``mint``.
        """
        if self.lock_key is None:
            return None
        locked = await self.store.locked_proofs(mint, self.unit, max_inputs)
        if not locked:
            return None
        fees = await self._fees(mint)
        fee = input_fee_sat([fees.get(p.keyset_id, 0) for p in locked])
        value = sum(p.amount for p in locked) - fee
        if value <= 0:
            return None
        keyset = await self.mints.active_keyset(mint, self.unit)
        held = [p.amount for p in await self.store.held_proofs(mint, self.unit)]
        amounts = crypto.stock_split(value, held, self.stock_sat)
        start = await self.store.reserve_counters(keyset.id, len(amounts))
        rec = dataclasses.replace(
            self._transfer("sweep", mint, locked, fee_sat=fee, amount_sat=0),
            keyset_id=keyset.id,
            counter_start=start,
            amounts=amounts,
        )
        await self.store.begin_transfer(rec)
        done = await self._swap_send(rec, self._signed(locked))
        log.info(
            "sweep %s: %d locked proofs (%d sat) swapped, fee %d sat",
            rec.id,
            len(locked),
            rec.input_sat,
            fee,
        )
        return done

    async def pay_invoice(
        self,
        request: str,
        *,
        mint: str | None = None,
        max_fee_sat: int | None = None,
        keep_sat: int = 0,
        destination: str | None = None,
    ) -> TransferRecord:
        """Pay a bolt11 invoice from free ecash by a NUT-05 melt; the record says what it cost.

        ``keep_sat`` stays free at the mint whatever the fee turns out to be; ``max_fee_sat``
        caps the mint's Lightning fee reserve. Raises :class:`MeltFailed` when the payment
        failed (the ecash is free again) and :class:`MeltPending` while it is in flight.
        """
        amount_sat = math.ceil(invoice_amount_msat(request) / 1000)
        mints = [self.mints.check_trusted(mint)] if mint else await self._mints_by_free()
        last: InsufficientFunds | None = None
        for url in mints:
            try:
                return await self._melt_at(
                    url, request, amount_sat, max_fee_sat, keep_sat, destination or request
                )
            except InsufficientFunds as exc:
                last = exc
        raise last or InsufficientFunds(
            f"the wallet holds no free ecash for {amount_sat} sat", need_sat=amount_sat, have_sat=0
        )

    async def melt_quote(self, request: str, mint: str) -> MeltQuote:
        """What paying ``request`` from ``mint`` costs (amount + fee reserve), checked."""
        amount_sat = math.ceil(invoice_amount_msat(request) / 1000)
        q = await self.lightning(mint).melt_quote(request, self.unit)
        if q.amount != amount_sat or q.unit != self.unit:
            raise BadInvoice(f"the mint quotes {q.amount} {q.unit} for a {amount_sat} sat invoice")
        if q.state != UNPAID:
            raise BadInvoice(f"the invoice is {q.state} at the mint already")
        return q

    async def _melt_at(
        self,
        mint: str,
        request: str,
        amount_sat: int,
        max_fee_sat: int | None,
        keep_sat: int,
        destination: str,
    ) -> TransferRecord:
        for attempt in range(2):
            q = await self.melt_quote(request, mint)
            if max_fee_sat is not None and q.fee_reserve > max_fee_sat:
                raise FeeTooHigh(
                    f"the mint's fee reserve is {q.fee_reserve} sat; the limit is {max_fee_sat}"
                )
            rec, inputs = await self._plan_melt(mint, q, keep_sat, destination)
            outcome = await self._melt(rec, inputs)
            if outcome is not None:
                return outcome
            log.info("transfer %s: the melt quote drifted; quoting again", rec.id)
            if attempt:
                break
        raise MeltFailed("the mint refused the payment twice (fee reserve or quote expiry)")

    async def _plan_melt(
        self, mint: str, q: MeltQuote, keep_sat: int, destination: str
    ) -> tuple[TransferRecord, list[Proof]]:
        fees = await self._fees(mint)

        def need(ps: list[Proof]) -> int:
            return q.amount + q.fee_reserve + input_fee_sat([fees.get(p.keyset_id, 0) for p in ps])

        for _ in range(PLAN_ATTEMPTS):
            held = await self.store.held_proofs(mint, self.unit)
            have = sum(p.amount for p in held)
            chosen = select_inputs(held, need)
            if chosen is None or have - need(chosen) < keep_sat:
                most = need(chosen or list(held)) + keep_sat
                raise InsufficientFunds(
                    f"{mint} holds {have} free sat; the payment needs {most} sat "
                    f"({q.amount} + fee reserve {q.fee_reserve} + input fee"
                    + (f" + {keep_sat} kept" if keep_sat else "")
                    + ")",
                    need_sat=most,
                    have_sat=have,
                )
            fee = input_fee_sat([fees.get(p.keyset_id, 0) for p in chosen])
            overpaid = sum(p.amount for p in chosen) - q.amount - fee
            n = blank_outputs(overpaid)
            keyset = await self.mints.active_keyset(mint, self.unit)
            start = await self.store.reserve_counters(keyset.id, n) if n else 0
            rec = dataclasses.replace(
                self._transfer(
                    "melt",
                    mint,
                    chosen,
                    fee_sat=fee,
                    amount_sat=q.amount,
                    fee_reserve_sat=q.fee_reserve,
                    quote_id=q.quote,
                    destination=destination,
                ),
                keyset_id=keyset.id,
                counter_start=start,
                amounts=[1] * n,  # NUT-08 blanks: the mint sets their amounts
            )
            try:
                await self.store.begin_transfer(rec)
            except StoreError:
                continue
            return rec, chosen
        raise WalletError("other transfers keep taking the same ecash; try again")

    async def _melt(self, rec: TransferRecord, inputs: Sequence[Proof]) -> TransferRecord | None:
        """Melt, and resolve whatever answer comes back. None: quote again (nothing spent)."""
        assert rec.quote_id is not None
        blanks = self._outputs(rec.keyset_id, rec.counter_start, rec.amounts)
        api = self.lightning(rec.mint)
        self._transfers_in_flight.add(rec.id)
        try:
            for attempt in range(ATTEMPTS):
                try:
                    result = await api.melt(rec.quote_id, inputs, blanks, self.unit)
                except LightningFailed as exc:
                    state = await self._resolve_melt(rec, blanks)
                    if state == "failed":
                        raise MeltFailed(f"{exc.message}; the ecash is free again") from exc
                    if isinstance(state, TransferRecord):
                        return state
                    raise MeltPending(
                        "the payment's outcome is unknown; recovery will finish it"
                    ) from exc
                except (MintRejected, TokenSpent) as exc:
                    # refused outright (fee reserve drifted, quote expired, ...): check first
                    state = await self._resolve_melt(rec, blanks)
                    if isinstance(state, TransferRecord):
                        return state
                    if state == "failed":
                        if attempt == 0 and isinstance(exc, MintRejected):
                            return None
                        raise MeltFailed(f"the mint refused the payment: {exc.message}") from exc
                    raise MeltPending(
                        "the payment's outcome is unknown; recovery will finish it"
                    ) from exc
                except MintError as exc:
                    # busy, or the answer was lost: the quote's state says whether to retry
                    state = await self._resolve_melt(rec, blanks, release=False)
                    if isinstance(state, TransferRecord):
                        return state
                    if state == "unpaid" and attempt + 1 < ATTEMPTS:
                        log.info("transfer %s: melt retried after %s", rec.id, exc.message)
                        await asyncio.sleep(RETRY_BASE_S * 2**attempt)
                        continue
                    raise MeltPending(
                        "the payment's outcome is unknown; recovery will finish it"
                    ) from exc
                if result.state == PAID:
                    return await self._finish_melt(rec, blanks, result)
                state = await self._resolve_melt(rec, blanks)
                if isinstance(state, TransferRecord):
                    return state
                if state == "failed":
                    raise MeltFailed("the Lightning payment failed; the ecash is free again")
                raise MeltPending("the Lightning payment is pending; recovery will finish it")
            raise MeltPending("the mint stayed busy; recovery will finish the payment")
        finally:
            self._transfers_in_flight.discard(rec.id)

    async def _resolve_melt(
        self, rec: TransferRecord, blanks: list[crypto.BlindedOutput], *, release: bool = True
    ) -> TransferRecord | str:
        """Read a melt's outcome from its quote: the done record, ``failed``, ``unpaid``
        (nothing happened, inputs still set aside: ``release=False``) or ``pending``."""
        assert rec.quote_id is not None
        api = self.lightning(rec.mint)
        try:
            q = await api.melt_quote_state(rec.quote_id, self.unit)
            if q.state == PAID:
                return await self._finish_melt(rec, blanks, q)
            if q.state == PENDING:
                return "pending"
            states = await self.mints.api(rec.mint).check_state(rec.input_ys)
        except MintError as exc:
            log.warning("transfer %s: melt outcome unknown (%s)", rec.id, exc.message)
            return "pending"
        if not all(states.get(y) == "UNSPENT" for y in rec.input_ys):
            if all(states.get(y) == "SPENT" for y in rec.input_ys):
                log.error("transfer %s: quote unpaid but its inputs are spent", rec.id)
            return "pending"
        if not release:
            return "unpaid"
        await self.store.fail_transfer(rec.id)
        return "failed"

    async def _finish_melt(
        self, rec: TransferRecord, blanks: list[crypto.BlindedOutput], q: MeltQuote
    ) -> TransferRecord:
        """The invoice is paid: keep the NUT-08 fee return and close the record."""
        pairs: Pairs = list(zip(blanks, q.change, strict=False))
        if not pairs and blanks:  # the answer carried no change: ask for it (NUT-09)
            pairs = await self.mints.api(rec.mint).restore(blanks)
        change = await self._unblind(
            rec.mint, [(dataclasses.replace(o, amount=s.amount), s) for o, s in pairs]
        )
        change_sat = sum(p.amount for p in change)
        overpaid = rec.input_sat - rec.amount_sat - rec.input_fee_sat
        done = await self.store.finish_transfer(
            rec.id,
            inputs_state="spent",
            kept=change,
            sent=[],
            lightning_fee_sat=overpaid - change_sat,
            change_sat=change_sat,
            preimage=q.preimage,
        )
        log.info(
            "transfer %s: paid %d sat by Lightning from %s; fees %d sat, change %d sat",
            rec.id,
            done.amount_sat,
            rec.mint,
            done.fee_sat,
            change_sat,
        )
        return done

    # -- recovery -----------------------------------------------------------------------

    async def recover(self, *, busy: Collection[str], min_age_s: float) -> RecoveryReport:
        """The base recovery of payments, then of transfers out a crash left pending."""
        report = await super().recover(busy=busy, min_age_s=min_age_s)
        await self.recover_transfers(min_age_s=min_age_s)
        return report

    async def recover_transfers(self, *, min_age_s: float) -> list[TransferRecord]:
        """Finish or undo pending transfers out; returns those finished now."""
        finished: list[TransferRecord] = []
        now = time.time()
        for rec in await self.store.transfers_in("pending"):
            if rec.id in self._transfers_in_flight or now - rec.created_at < min_age_s:
                continue
            outputs = self._outputs(rec.keyset_id, rec.counter_start, rec.amounts)
            try:
                if rec.kind == "melt":
                    state = await self._resolve_melt(rec, outputs)
                    if isinstance(state, TransferRecord):
                        finished.append(state)
                elif rec.amounts:  # a send by swap
                    pairs = await self._resolve_swap(rec, outputs)
                    if pairs is not None:
                        finished.append(await self._finish_send(rec, pairs))
                else:  # a send of proofs as they were, interrupted before its token existed
                    await self.store.fail_transfer(rec.id)
            except (MintError, WalletError, StoreError) as exc:
                log.warning("transfer %s: recovery postponed (%s)", rec.id, exc)
        return finished
