"""The one paid-request pipeline. Every transport feeds it; money logic lives only here.

    accept payment -> quote -> cap -> answer -> settle -> change

:meth:`Pipeline.start` does every check that spends nothing (size, model, token format,
allow-list, unit, keysets, DLEQ, amount) and raises a :class:`PaymentError` if one
fails: the payer keeps their token. Then the token is redeemed and the answer runs in a
task of its own, so a client that goes away mid-answer can't interrupt the money: the
payment is always settled, and its change or refund is always made and recorded.
From the moment the token is redeemed, the payer gets either the answer and its change,
or a refund token; never an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bot import failpoints
from bot.config import Config, ModelConfig
from bot.errors import (
    BadRequest,
    ChangeNotFound,
    ChangePending,
    MalformedToken,
    PaymentError,
    PaymentRequired,
    RateLimited,
    RequestTooLarge,
    ServiceUnavailable,
    TokenSpent,
    Underpaid,
    UnknownModel,
)
from bot.llm.gemini import Generation, Message, UpstreamError, Usage
from bot.metrics import Metrics
from bot.state import Reservation, State, StateUnavailable, UsageEvent
from mint_client.errors import QuoteNotPaid, QuoteUsed, SwapPending
from mint_client.lnwallet import IncomingQuote, LightningWallet, quote_key
from mint_client.protocol import MintRegistry
from mint_client.requests import P2PKLock, PaymentRequest, Transport, encode_payment_request
from mint_client.store import InvoiceRecord, PaymentRecord
from mint_client.tokens import Token, parse_token
from mint_client.wallet import Incoming, token_hash
from pricing import (
    Quote,
    Settlement,
    estimate_input_tokens,
    input_fee_sat,
    quote,
    refund,
    required_sat,
    settle,
)

log = logging.getLogger("ecashbot.pipeline")


class LLM(Protocol):
    """What the pipeline needs of a model (bot.llm.gemini.Gemini is the real one)."""

    label: str

    def stream(self, gen: Generation) -> AsyncIterator[str | Usage]:
        """Text deltas, then the final usage; raises UpstreamError."""
        ...

    async def generate(self, gen: Generation) -> tuple[str, Usage]:
        """The whole answer and its usage; raises UpstreamError."""
        ...


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A question, as any transport hands it to the pipeline."""

    messages: tuple[Message, ...]
    model: str | None = None
    max_tokens: int | None = None
    stream: bool = False


@dataclass(frozen=True, slots=True)
class Receipt:
    """How one paid request ended. ``change_token`` is the change, or the refund."""

    request_id: str
    model: str
    settlement: Settlement
    change_token: str | None
    usage: Usage | None
    error: str | None = None

    @property
    def refunded(self) -> bool:
        """True when the answer failed and everything but the mint fee came back."""
        return self.error is not None


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the answer."""

    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of every paid request."""

    receipt: Receipt


Event = TextDelta | Finished


@dataclass(frozen=True, slots=True)
class QuotePayment:
    """A payment by Lightning: the NUT-04 quote id of a paid invoice (``X-Cashu-Quote``)."""

    quote_id: str


@dataclass(frozen=True, slots=True)
class Pickup:
    """A payment's change fetched again; ``spent`` when the payer already received it."""

    record: PaymentRecord
    spent: bool


#: how long a redeemed token's claim is kept (replays are refused by the mint after that)
TOKEN_CLAIM_TTL_S = 7 * 86400
#: how long the claims of a locked token with no refund path are kept: for good (ten years)
LOCKED_CLAIM_TTL_S = 10 * 365 * 86400
#: how long a token's claim holds before its redeem is journalled: a crash in between
#: (rare, milliseconds) must not lock the payer out of their own token for a week
TOKEN_CLAIM_PENDING_TTL_S = 60


@dataclass(slots=True)
class _Prepared:
    request_id: str
    chat: ChatRequest
    model: str
    model_cfg: ModelConfig
    incoming: Incoming | IncomingQuote
    quote: Quote
    transport: str
    #: replay claims: ``token:<hash>``, or ``y:<Y>`` per proof of a locked token
    claim_keys: tuple[str, ...]
    reservation: Reservation | None
    reply_to: str | None


class _Gate:
    """Where the model's text goes: held until the payment clears, then passed on."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self._open = False
        #: every piece of the answer so far (kept with the change until delivered)
        self.parts: list[str] = []
        #: when the first text went out to the payer
        self.first_out_at: float | None = None

    def put(self, text: str) -> None:
        self.parts.append(text)
        if self._open:
            self._emit(text)

    def open(self) -> None:
        """The payment cleared: release what was held, pass on what comes."""
        self._open = True
        for text in self.parts:
            self._emit(text)

    def _emit(self, text: str) -> None:
        if self.first_out_at is None:
            self.first_out_at = time.monotonic()
        self._answer._events.put_nowait(TextDelta(text))


@dataclass(eq=False)
class Answer:
    """A paid request in flight: read its events with ``async for``."""

    request_id: str
    model: str
    quote: Quote
    _events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    _redeemed: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    receipt: Receipt | None = None

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            ev = await self._events.get()
            yield ev
            if isinstance(ev, Finished):
                return

    async def result(self) -> tuple[str, Receipt]:
        """Wait for the whole answer: its text and receipt."""
        parts: list[str] = []
        async for ev in self:
            if isinstance(ev, TextDelta):
                parts.append(ev.text)
            else:
                return "".join(parts), ev.receipt
        raise AssertionError("answer ended without a receipt")


class Pipeline:
    """Paid questions in, answers and change out."""

    def __init__(
        self,
        cfg: Config,
        wallet: LightningWallet,
        mints: MintRegistry,
        llm: LLM,
        state: State,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.wallet = wallet
        self.mints = mints
        self.llm = llm
        self.state = state
        self.metrics = metrics if metrics is not None else Metrics()
        self._tasks: set[asyncio.Task[None]] = set()
        #: payment ids being served by this process: recovery leaves them alone
        self._in_flight: set[str] = set()
        #: unused invoices already checked at their mint (quote id -> when)
        self._invoice_checked: dict[str, float] = {}

    @property
    def lock_pubkey(self) -> str | None:
        """The key payers may lock tokens to (NUT-11), advertised; None when not accepted."""
        key = self.wallet.lock_key
        return key.pubkey if key is not None and self.wallet.takes_locked else None

    # -- shared state: limits and budget, all before any money moves --------------------

    async def _take(self, bucket: str, capacity: int, per_s: float, amount: int) -> None:
        try:
            r = await self.state.take(bucket, capacity=capacity, refill_per_s=per_s, amount=amount)
        except StateUnavailable as exc:
            raise ServiceUnavailable(
                "the bot can't take payments right now (its state store is down); "
                "nothing was charged, try again shortly"
            ) from exc
        if not r.allowed:
            raise RateLimited(
                f"too many requests; try again in {max(1, round(r.retry_after_s))} s",
                retry_after_s=r.retry_after_s,
            )

    async def _reserve_budget(self, model: str, tokens: int) -> Reservation | None:
        b = self.cfg.budget
        model_limit = b.per_model.get(model)
        if b.daily_tokens is None and model_limit is None:
            return None
        try:
            res = await self.state.reserve_budget(
                model,
                tokens,
                daily_limit=b.daily_tokens if b.daily_tokens is not None else 2**62,
                model_limit=model_limit,
                safety_buffer=b.safety_buffer,
            )
        except StateUnavailable as exc:
            raise ServiceUnavailable("the bot's state store is down; nothing was charged") from exc
        if res is None:
            raise ServiceUnavailable(
                f"today's budget for {model} is used up; it resets at 00:00 UTC. "
                "Nothing was charged."
            )
        return res

    async def _undo_before_money(self, prep: _Prepared, wasted_tokens: int = 0) -> None:
        """A request refused after its claim and reservation but before redeeming.

        ``wasted_tokens``: what the model already spent on it (the fast path's overlap);
        the budget is settled to that, and the statistics count it.
        """
        try:
            await self.state.release_all(prep.claim_keys)
            if prep.reservation is not None:
                await self.state.settle_budget(prep.reservation, wasted_tokens)
        except StateUnavailable:
            log.warning("payment %s: could not release its claim", prep.request_id)

    async def _generate(self, gen: Generation, gate: _Gate, *, stream: bool) -> Usage:
        """Run the model into ``gate``; its usage (UpstreamError when it gives none)."""
        usage: Usage | None = None
        if stream:
            async for item in self.llm.stream(gen):
                if isinstance(item, str):
                    gate.put(item)
                else:
                    usage = item
        else:
            text, usage = await self.llm.generate(gen)
            gate.put(text)
        if usage is None:
            raise UpstreamError("model gave no usage")
        return usage

    async def _cancel_early(
        self, prep: _Prepared, early: asyncio.Task[Usage] | None, gate: _Gate
    ) -> int:
        """The payment failed: stop a model call the fast path started, count its cost.

        Returns the model tokens it used (from its usage when it had finished, else
        estimated from the prompt and the text that came): they are wasted, counted in
        the statistics and the budget. What the payer's request took from its rate-limit
        buckets is not given back, so payers whose payments fail are slowed down.
        """
        if early is None:
            return 0
        early.cancel()
        await asyncio.wait([early])
        if not early.cancelled() and early.exception() is None:
            u = early.result()
            wasted = u.prompt_tokens + u.output_tokens
        else:
            out_bytes = len("".join(gate.parts).encode())
            wasted = prep.quote.input_tokens_estimate + (out_bytes + 3) // 4
        self.metrics.wasted(prep.transport, prep.model, wasted)
        log.info(
            "payment %s: payment failed; model call cancelled, %d tokens wasted",
            prep.request_id,
            wasted,
        )
        try:
            await self.state.record(
                UsageEvent(
                    transport=prep.transport,
                    model=prep.model,
                    input_tokens=0,
                    output_tokens=0,
                    thinking_tokens=0,
                    charged_sat=0,
                    change_sat=0,
                    fee_sat=0,
                    refunded=False,
                    refund_sat=0,
                    failed_payment=True,
                    wasted_tokens=wasted,
                )
            )
        except StateUnavailable:
            log.warning("payment %s: wasted tokens not recorded (state down)", prep.request_id)
        return wasted

    # -- before any money moves ---------------------------------------------------------

    def _model(self, name: str | None) -> tuple[str, ModelConfig]:
        model = name or self.cfg.default_model
        model = model.removeprefix("models/")
        cfg = self.cfg.models.get(model)
        if cfg is None:
            raise UnknownModel(
                f"model {model!r} is not offered; choose one of: {', '.join(self.cfg.models)}"
            )
        return model, cfg

    def _estimate_input(self, chat: ChatRequest) -> int:
        if not chat.messages:
            raise BadRequest("the request has no messages")
        if not any(m.role == "user" and m.content.strip() for m in chat.messages):
            raise BadRequest("the request has no question (no user message)")
        chars = sum(len(m.content) for m in chat.messages)
        if chars > self.cfg.limits.max_input_chars:
            raise RequestTooLarge(
                f"the question is {chars} characters; the limit is "
                f"{self.cfg.limits.max_input_chars}"
            )
        size = sum(len(m.content.encode("utf-8")) for m in chat.messages)
        return estimate_input_tokens(size, len(chat.messages))

    def _wanted_output(self, chat: ChatRequest, model_cfg: ModelConfig) -> tuple[int, int]:
        """(the output the 402 asks to pay for, the least output a payment must buy)."""
        limits = self.cfg.limits
        want = chat.max_tokens or limits.default_output_tokens
        want = min(want, model_cfg.max_output_tokens)
        least = min(limits.min_output_tokens, want)
        return want, least

    async def price_of(self, chat: ChatRequest, output_tokens: int | None = None) -> int:
        """Sat to pay at the primary mint for ``chat`` (mint fee included, estimated)."""
        _, model_cfg = self._model(chat.model)
        est_in = self._estimate_input(chat)
        want, _ = self._wanted_output(chat, model_cfg)
        return await self._amount_with_fee(
            model_cfg, est_in, want if output_tokens is None else output_tokens
        )

    async def _amount_with_fee(self, model_cfg: ModelConfig, est_in: int, out: int) -> int:
        keyset = await self.mints.active_keyset(self.cfg.mints[0], self.cfg.unit)
        base = required_sat(
            model_cfg.price(), input_tokens_estimate=est_in, output_tokens=out, fee_sat=0
        )
        # a wallet usually pays with the binary decomposition of the amount: one
        # proof per set bit, each costing input_fee_ppk
        amount = base
        for _ in range(8):
            fee = input_fee_sat([keyset.input_fee_ppk] * max(1, amount.bit_count()))
            if base + fee == amount:
                break
            amount = base + fee
        return amount

    def payment_request(
        self, amount_sat: int, *, description: str, transports: Sequence[Transport] = ()
    ) -> str:
        """A NUT-18 payment request for ``amount_sat`` at any of our mints.

        When locked tokens are accepted, it asks for a lock to the bot's key (``nut10``):
        such a payment is answered with no mint call.
        """
        lock_pubkey = self.lock_pubkey
        return encode_payment_request(
            PaymentRequest(
                id=uuid.uuid4().hex[:16],
                amount=amount_sat,
                unit=self.cfg.unit,
                single_use=True,
                mints=tuple(self.cfg.mints),
                description=description,
                transports=tuple(transports),
                lock=None if lock_pubkey is None else P2PKLock(lock_pubkey),
            )
        )

    async def start(
        self,
        chat: ChatRequest,
        payment: str | Token | QuotePayment | None,
        *,
        transport: str,
        payer: str,
        reply_to: str | None = None,
        request_transports: Sequence[Transport] = (),
    ) -> Answer:
        """Check everything that spends nothing, redeem the token, start answering.

        Raises a :class:`PaymentError` when the request is refused; unless it is
        ``TokenSpent`` (or a pending mint answer), the payer's token was not spent.
        ``payer`` (a Nostr pubkey or a client address) keys the rate limits; ``reply_to``
        says where a refund goes if a crash interrupts the answer (None: kept for pickup).
        ``payment`` is a token, or a :class:`QuotePayment` (a paid Lightning invoice): the
        invoice is minted instead of the token swapped, and the rest is the same.
        """
        try:
            return await self._start(
                chat,
                payment,
                transport=transport,
                payer=payer,
                reply_to=reply_to,
                request_transports=request_transports,
            )
        except PaymentError as exc:
            self.metrics.refused(transport, exc.code)
            raise

    async def _start(
        self,
        chat: ChatRequest,
        payment: str | Token | QuotePayment | None,
        *,
        transport: str,
        payer: str,
        reply_to: str | None,
        request_transports: Sequence[Transport],
    ) -> Answer:
        request_id = uuid.uuid4().hex
        rl = self.cfg.rate_limit
        await self._take(f"req:{payer}", rl.requests_capacity, rl.requests_per_s, 1)
        model, model_cfg = self._model(chat.model)
        est_in = self._estimate_input(chat)
        want, least = self._wanted_output(chat, model_cfg)
        if payment is None:
            amount = await self._amount_with_fee(model_cfg, est_in, want)
            raise PaymentRequired(
                f"this answer costs up to {amount} sat (mint fee included): pay with a Cashu "
                f"token from one of: {', '.join(self.cfg.mints)}",
                amount_sat=amount,
                payment_request=self.payment_request(
                    amount, description=f"ecashbot: {model}", transports=request_transports
                ),
            )
        incoming: Incoming | IncomingQuote
        if isinstance(payment, QuotePayment):
            incoming = await self.wallet.inspect_quote(payment.quote_id)
        else:
            incoming = await self.wallet.inspect(self._token(payment))
        q = quote(
            model_cfg.price(),
            paid_sat=incoming.amount_sat,
            fee_sat=incoming.fee_sat,
            input_tokens_estimate=est_in,
            requested_max_tokens=chat.max_tokens,
        )
        if incoming.amount_sat <= incoming.fee_sat or q.max_output_tokens < least:
            need = await self._amount_with_fee(model_cfg, est_in, least)
            need = max(
                need,
                required_sat(
                    model_cfg.price(),
                    input_tokens_estimate=est_in,
                    output_tokens=least,
                    fee_sat=incoming.fee_sat,
                ),
            )
            raise Underpaid(
                f"{incoming.amount_sat} sat is too little: with the mint fee of "
                f"{incoming.fee_sat} sat it buys {q.max_output_tokens} output tokens; "
                f"pay at least {need} sat. Your token was not spent.",
                amount_sat=need,
                payment_request=self.payment_request(
                    need, description=f"ecashbot: {model}", transports=request_transports
                ),
            )
        llm_tokens = est_in + q.max_output_tokens
        await self._take(f"tok:{payer}", rl.tokens_capacity, rl.tokens_per_s, llm_tokens)
        reservation = await self._reserve_budget(model, llm_tokens)
        claim_keys = _claim_keys(incoming)
        try:
            first = await self.state.claim_all(claim_keys, TOKEN_CLAIM_PENDING_TTL_S)
        except StateUnavailable as exc:
            raise ServiceUnavailable("the bot's state store is down; nothing was charged") from exc
        if not first:
            if reservation is not None:
                await self.state.settle_budget(reservation, 0)
            if isinstance(incoming, IncomingQuote):
                raise QuoteUsed("this invoice was already used for an earlier question")
            if _locked(incoming):
                raise TokenSpent("this locked token (or a proof in it) was already paid to the bot")
            raise TokenSpent("this token was already spent on an earlier question")
        prep = _Prepared(
            request_id,
            chat,
            model,
            model_cfg,
            incoming,
            q,
            transport,
            claim_keys,
            reservation,
            reply_to,
        )
        answer = Answer(request_id=request_id, model=model, quote=q)
        task = asyncio.create_task(self._serve(prep, answer), name=f"paid-{request_id}")
        self._tasks.add(task)
        self._in_flight.add(request_id)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._in_flight.discard(request_id)

        task.add_done_callback(done)
        # the redeem runs in the task: if our caller is cancelled, the task goes on
        await asyncio.shield(answer._redeemed)
        return answer

    def _token(self, payment: str | Token) -> Token:
        if isinstance(payment, Token):
            return payment
        if len(payment) > self.cfg.http.max_token_bytes:
            raise RequestTooLarge(
                f"the token is {len(payment)} bytes; the limit is {self.cfg.http.max_token_bytes}"
            )
        return parse_token(payment, max_len=self.cfg.http.max_token_bytes)

    # -- paying by Lightning: invoices (NUT-04 quotes) that pay a question ----------------

    async def invoice(
        self,
        amount_sat: int,
        *,
        transport: str,
        reply_to: str | None = None,
        description: str = "ecashbot",
    ) -> InvoiceRecord | None:
        """A Lightning invoice for ``amount_sat`` at the first mint; None when off or failing.

        Whoever pays it names its quote id instead of a token (:class:`QuotePayment`).
        """
        if not self.cfg.lightning.invoices:
            return None
        if not 0 < amount_sat <= self.cfg.lightning.max_invoice_sat:
            raise BadRequest(
                f"an invoice can be for 1 to {self.cfg.lightning.max_invoice_sat} sat, "
                f"not {amount_sat}"
            )
        try:
            return await self.wallet.create_invoice(
                amount_sat, transport=transport, reply_to=reply_to, description=description
            )
        except PaymentError as exc:
            log.warning("no invoice for %d sat: %s", amount_sat, exc.message)
            return None

    async def wait_invoice(self, invoice: InvoiceRecord) -> bool:
        """Wait until ``invoice`` is paid (True) or its quote expires (False)."""
        return await self.wallet.wait_paid(invoice, poll_s=self.cfg.lightning.poll_interval_s)

    async def refund_invoice(
        self, quote_id: str, *, transport: str, reply_to: str | None
    ) -> PaymentRecord | None:
        """Mint a paid invoice whose question won't be answered, and keep it all as a refund.

        The refund goes out like any change (DM, or POST /v1/change with X-Cashu-Quote).
        None when another request claimed the invoice first.
        """
        incoming = await self.wallet.inspect_quote(quote_id)
        claim_key = f"token:{incoming.token_hash}"
        try:
            if not await self.state.claim(claim_key, TOKEN_CLAIM_TTL_S):
                return None
        except StateUnavailable as exc:
            raise ServiceUnavailable("the bot's state store is down") from exc
        request_id = uuid.uuid4().hex
        self._in_flight.add(request_id)
        try:
            try:
                await self.wallet.redeem(incoming, request_id, transport, reply_to=reply_to)
            except PaymentError as exc:
                if exc.token_untouched:
                    await self.state.release(claim_key)
                raise
            await self.wallet.settle(
                request_id, charged_sat=0, change_sat=incoming.amount_sat, refund=True
            )
        finally:
            self._in_flight.discard(request_id)
        log.info("invoice %s: %d sat minted and kept as a refund", quote_id, incoming.amount_sat)
        return await self.wallet.store.payment(request_id)

    async def _refund_unused_invoices(self) -> None:
        """Paid invoices nobody used (or whose question a restart lost): refund them."""
        now = time.time()
        after = self.cfg.lightning.refund_unused_after_s
        open_invoices = await self.wallet.store.invoices_in("open")
        # forget the invoices that are no longer open (expired, claimed, refunded)
        live = {inv.quote_id for inv in open_invoices}
        for quote_id in self._invoice_checked.keys() - live:
            del self._invoice_checked[quote_id]
        for inv in open_invoices:
            if inv.expiry is not None and inv.expiry <= now:
                await self.wallet.store.set_invoice_status(inv.quote_id, "expired")
                continue
            expiring = inv.expiry is not None and inv.expiry - now < 300
            checked = self._invoice_checked.get(inv.quote_id)
            if now - inv.created_at < after or (checked is not None and not expiring):
                continue
            self._invoice_checked[inv.quote_id] = now
            try:
                await self.refund_invoice(
                    inv.quote_id, transport=inv.transport, reply_to=inv.reply_to
                )
            except QuoteNotPaid:
                continue  # unpaid: it expires silently
            except QuoteUsed:
                await self.wallet.store.set_invoice_status(inv.quote_id, "claimed")
            except (PaymentError, StateUnavailable) as exc:
                log.warning("invoice %s: refund postponed (%s)", inv.quote_id, exc)
            except Exception:
                log.exception("invoice %s: refund failed; trying again later", inv.quote_id)

    # -- after the money moved ----------------------------------------------------------

    async def _serve(self, prep: _Prepared, answer: Answer) -> None:
        started = time.monotonic()
        gen = Generation(
            model=prep.model,
            messages=prep.chat.messages,
            max_output_tokens=prep.quote.max_output_tokens,
            thinking_budget=prep.model_cfg.thinking_budget,
        )
        gate = _Gate(answer)
        # the fast path: the model starts now, with the swap; nothing leaves the gate
        # before the swap clears, and a failed swap cancels the call
        early: asyncio.Task[Usage] | None = None
        if self.cfg.fast_path.overlap:
            early = asyncio.create_task(self._generate(gen, gate, stream=prep.chat.stream))
        try:
            await self._take_payment(prep)
        except BaseException as exc:
            wasted = await self._cancel_early(prep, early, gate)
            if isinstance(exc, PaymentError):
                if exc.token_untouched:
                    await self._undo_before_money(prep, wasted)
                answer._redeemed.set_exception(exc)
                return
            if not isinstance(exc, Exception):  # cancelled (shutdown): say so, then go
                answer._redeemed.set_exception(
                    SwapPending("the bot stopped while redeeming; your payment will be resolved")
                )
                raise
            log.exception("payment %s: redeem failed unexpectedly", prep.request_id)
            answer._redeemed.set_exception(
                PaymentError(f"internal error while redeeming: {type(exc).__name__}")
            )
            return
        answer._redeemed.set_result(None)
        try:
            await self.state.extend_all(prep.claim_keys, self._claim_ttl(prep.incoming))
        except StateUnavailable:
            log.warning("payment %s: token claim not extended (state down)", prep.request_id)
        failpoints.hit("after_redeem")
        gate.open()

        price = prep.model_cfg.price()
        usage: Usage | None = None
        error: str | None = None
        try:
            if early is not None:
                usage = await early
            else:
                usage = await self._generate(gen, gate, stream=prep.chat.stream)
            s = settle(
                price,
                prep.quote,
                input_tokens=usage.prompt_tokens,
                output_tokens=usage.output_tokens,
            )
        except UpstreamError as exc:
            error = exc.message
            s = refund(prep.quote)
        except Exception as exc:
            log.exception("payment %s: answer failed unexpectedly", prep.request_id)
            error = f"internal error: {type(exc).__name__}"
            s = refund(prep.quote)

        failpoints.hit("after_answer")
        try:
            token = await self.wallet.settle(
                prep.request_id,
                charged_sat=s.charged_sat,
                change_sat=s.change_sat,
                refund=error is not None,
                answer=None if error is not None else "".join(gate.parts),
            )
        except Exception:
            # the proofs stay reserved for this payment in the store; recovery makes the
            # change from them later. Say so rather than pretend.
            log.exception("payment %s: settlement failed", prep.request_id)
            token = None
            error = (error or "") + " (change could not be made now; it is kept for you)"
        failpoints.hit("after_settle")
        event = await self._account(prep, s, usage, refunded=error is not None)
        receipt = Receipt(
            request_id=prep.request_id,
            model=prep.model,
            settlement=s,
            change_token=token,
            usage=usage,
            error=error,
        )
        answer.receipt = receipt
        answer._events.put_nowait(Finished(receipt))
        self._report(
            prep,
            event,
            s,
            latency_s=time.monotonic() - started,
            ttft_s=None if gate.first_out_at is None else gate.first_out_at - started,
        )

    async def _take_payment(self, prep: _Prepared) -> None:
        """Redeem the payment: a locked token is taken with no mint call when it can be."""
        incoming = _locked(prep.incoming)
        if incoming is not None:
            if await self.wallet.accept_locked(
                incoming, prep.request_id, prep.transport, reply_to=prep.reply_to
            ):
                self.metrics.locked_payment("accepted")
                return
            # the stock of small proofs can't make its change yet: swap it, as any token
            self.metrics.locked_payment("swapped")
            log.info("payment %s: locked token swapped (stock too small)", prep.request_id)
        await self.wallet.redeem(
            prep.incoming, prep.request_id, prep.transport, reply_to=prep.reply_to
        )

    @staticmethod
    def _claim_ttl(incoming: Incoming | IncomingQuote) -> int:
        """How long a redeemed payment's replay claim is kept.

        A swapped token: a week (the mint refuses a replay anyway). A locked token's
        proofs are never shown to the mint before the bot answers, so their claims last
        until their refund path opens (and a week more), or for good when it never does.
        """
        locked = _locked(incoming)
        if locked is None:
            return TOKEN_CLAIM_TTL_S
        if locked.locktime is None:
            return LOCKED_CLAIM_TTL_S
        return max(0, locked.locktime - int(time.time())) + TOKEN_CLAIM_TTL_S

    async def _account(
        self, prep: _Prepared, s: Settlement, usage: Usage | None, *, refunded: bool
    ) -> UsageEvent:
        """Budget and statistics after the money moved: logged on failure, never refused."""
        used = usage.prompt_tokens + usage.output_tokens if usage is not None else 0
        event = UsageEvent(
            transport=prep.transport,
            model=prep.model,
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.output_tokens if usage else 0,
            thinking_tokens=usage.thoughts_tokens if usage else 0,
            charged_sat=s.charged_sat,
            change_sat=0 if refunded else s.change_sat,
            fee_sat=s.fee_sat,
            refunded=refunded,
            refund_sat=s.change_sat if refunded else 0,
        )
        try:
            if prep.reservation is not None:
                await self.state.settle_budget(prep.reservation, used)
            await self.state.record(event)
        except StateUnavailable:
            log.warning("payment %s: statistics not recorded (state down)", prep.request_id)
        return event

    def _report(
        self,
        prep: _Prepared,
        event: UsageEvent,
        s: Settlement,
        *,
        latency_s: float,
        ttft_s: float | None,
    ) -> None:
        """The one log line and the metrics of a paid request (never a token or secret)."""
        self.metrics.paid(event, paid_sat=s.paid_sat, latency_s=latency_s, ttft_s=ttft_s)
        fields = {
            "event": "paid_request",
            "request_id": prep.request_id,
            "transport": event.transport,
            "model": event.model,
            "input_tokens": event.input_tokens,
            "output_tokens": event.output_tokens,
            "paid_sat": s.paid_sat,
            "fee_sat": s.fee_sat,
            "charged_sat": event.charged_sat,
            "change_sat": s.change_sat,
            "outcome": "refunded" if event.refunded else "answered",
            "latency_ms": round(latency_s * 1000),
            "ttft_ms": None if ttft_s is None else round(ttft_s * 1000),
        }
        log.info(
            "paid request id=%s transport=%s model=%s in=%d out=%d paid=%d fee=%d "
            "charged=%d change=%d outcome=%s latency_ms=%d",
            prep.request_id,
            event.transport,
            event.model,
            event.input_tokens,
            event.output_tokens,
            s.paid_sat,
            s.fee_sat,
            event.charged_sat,
            s.change_sat,
            fields["outcome"],
            fields["latency_ms"],
            extra=fields,
        )

    # -- after a crash, and for payers who lost their change -----------------------------

    async def reclaim_locked(self, since: float) -> int:
        """Hold the replay claims of locked payments journalled since ``since`` for good.

        Run at start-up: a crash between a locked payment's journal and the extension of
        its claims (milliseconds) would leave them to lapse within a minute, and no mint
        catches a locked token's replay. Returns how many payments it covered.
        """
        recs = await self.wallet.store.locked_payments_since(since)
        for rec in recs:
            await self.state.extend_all([_y_claim(y) for y in rec.input_ys], LOCKED_CLAIM_TTL_S)
        return len(recs)

    async def take_tip(
        self, token: Token, *, tip_id: str, payer: str, reply_to: str | None
    ) -> PaymentRecord:
        """Take a tip (a NIP-61 nutzap) in as income: one swap, kept whole, no answer.

        It counts against ``payer``'s request bucket, as a question does: a flood of
        bogus nutzaps can't turn into a flood of mint calls. Its proofs' Ys are claimed
        for good first, as a locked payment's are: a proof swapped here can't come back
        as a locked payment (taken with no mint call), nor one held locked be swapped
        again as a tip. A :class:`PaymentError` refuses it; unless it says otherwise
        (``token_untouched``), the sender still holds it.
        """
        rl = self.cfg.rate_limit
        await self._take(f"req:{payer}", rl.requests_capacity, rl.requests_per_s, 1)
        keys = tuple(_y_claim(p.Y()) for p in token.proofs)
        try:
            first = await self.state.claim_all(keys, LOCKED_CLAIM_TTL_S)
        except StateUnavailable as exc:
            raise ServiceUnavailable("the bot's state store is down; nothing was taken") from exc
        if not first:
            raise TokenSpent("these proofs were already paid to the bot")
        self._in_flight.add(tip_id)
        try:
            rec = await self.wallet.receive(token, "nutzap", payment_id=tip_id, reply_to=reply_to)
        except PaymentError as exc:
            if exc.token_untouched:
                with contextlib.suppress(StateUnavailable):
                    await self.state.release_all(keys)
            raise
        finally:
            self._in_flight.discard(tip_id)
        log.info("tip %s: %d sat taken in", tip_id, (rec.charged_sat or 0))
        return rec

    def in_flight(self, request_id: str) -> bool:
        """Whether this process is still answering or settling ``request_id``."""
        return request_id in self._in_flight

    async def recover(self, min_age_s: float) -> list[PaymentRecord]:
        """Resolve interrupted payments; return those whose change must be sent again.

        Refunds interrupted answers, restores lost swaps, releases the replay claim of
        tokens that were never spent, and lists DM payments whose change or refund was
        never handed to the transport.
        """
        report = await self.wallet.recover(busy=set(self._in_flight), min_age_s=min_age_s)
        await self._refund_unused_invoices()
        for rec in report.released:
            try:
                await self.state.release(f"token:{rec.token_hash}")
            except StateUnavailable:
                log.warning("payment %s: claim not released (state down)", rec.id)
        now = time.time()
        return [
            r
            for r in await self.wallet.store.payments_in("settled", "refunded")
            if r.reply_to
            and (r.change_token or r.answer is not None)
            and r.delivered_at is None
            and r.id not in self._in_flight
            and now - r.created_at >= min_age_s
        ]

    async def pickup(
        self, *, token: str | None, request_id: str | None, quote_id: str | None = None
    ) -> Pickup:
        """The change (or refund) of an earlier payment, again (POST /v1/change).

        Found by the payment token the payer sent, the quote id of the invoice they paid,
        or the request id they were given.
        """
        rec: PaymentRecord | None = None
        if request_id:
            rec = await self.wallet.store.payment(request_id)
        elif token:
            found = await self.wallet.store.payments_by_token(
                token_hash(parse_token(token, max_len=self.cfg.http.max_token_bytes).proofs)
            )
            rec = next((r for r in found if r.status != "failed"), None)
        elif quote_id:
            found = await self.wallet.store.payments_by_token(quote_key(quote_id))
            rec = next((r for r in found if r.status != "failed"), None)
        else:
            raise BadRequest("send the payment token in X-Cashu, or the request id")
        ttl = self.cfg.wallet.change_pickup_ttl_s
        if rec is None or rec.status == "failed" or time.time() - rec.created_at > ttl:
            raise ChangeNotFound(
                "no change is kept for this payment (unknown, never redeemed, or older than "
                f"{ttl // 86400} days)"
            )
        if rec.status in ("redeeming", "redeemed"):
            raise ChangePending(
                "this payment is still being answered or resolved; ask again in a minute"
            )
        spent = False
        if rec.change_token:
            change = parse_token(rec.change_token)
            states = await self.mints.api(rec.mint).check_state(p.Y() for p in change.proofs)
            spent = bool(states) and all(v == "SPENT" for v in states.values())
        await self.wallet.store.count_pickup(rec.id)
        if rec.delivered_at is None:
            # the answer (kept because a crash came before delivery) is now delivered
            await self.wallet.store.mark_delivered(rec.id)
        return Pickup(record=rec, spent=spent)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for paid requests in flight to settle (at shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)


def _locked(incoming: Incoming | IncomingQuote) -> Incoming | None:
    """The payment, when it is a token locked to the bot (taken with no mint call)."""
    return incoming if isinstance(incoming, Incoming) and incoming.locked else None


def _y_claim(y: str) -> str:
    """The replay claim of one proof of a locked token, by its Y."""
    return f"y:{y}"


def _claim_keys(incoming: Incoming | IncomingQuote) -> tuple[str, ...]:
    """A payment's replay claims: ``token:<hash>``, or one per proof of a locked token.

    A locked token never meets the mint before it is answered: the claim of each proof is
    the only replay protection, and catches its proofs mixed into another token too.
    """
    locked = _locked(incoming)
    if locked is not None:
        return tuple(_y_claim(p.Y()) for p in locked.token.proofs)
    return (f"token:{incoming.token_hash}",)


def parse_token_or_none(text: str | None) -> str | None:
    """Normalise an X-Cashu style value: None or blank means "no payment"."""
    if text is None:
        return None
    text = text.strip()
    if not text:
        return None
    if not (text.startswith(("cashuA", "cashuB", "cashu:"))):
        raise MalformedToken("X-Cashu must hold a cashuA or cashuB token")
    return text
