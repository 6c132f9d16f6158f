"""The Nostr transport: DMs (NIP-17 gift wraps, NIP-04) in, answers and change out.

It only translates: a DM becomes a :class:`~bot.pipeline.ChatRequest` plus its payment,
and the pipeline's answer, receipt and change become DMs, in the scheme the question
came in. Each DM is handled once across relays, processes and restarts (a persistent
claim on its id); forged or undecryptable events are dropped; every reply goes through
a durable outbox so a relay outage can't lose it. NIP-61 nutzaps to the bot's advertised
lock key are taken in as tips (see :mod:`bot.nutzap`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from nostr_sdk import (
    Client,
    ClientBuilder,
    Event,
    EventBuilder,
    EventId,
    Filter,
    Keys,
    Kind,
    Nip19Profile,
    Nip44Version,
    NostrSdkError,
    PublicKey,
    RelayOptions,
    RelayUrl,
    ReqTarget,
    SignerAuthenticator,
    Tag,
    Timestamp,
    UnwrappedGift,
    nip17_make_private_msg,
    nip44_encrypt,
    uniffi_set_event_loop,
)

from bot.config import Config
from bot.dm import DMRequest, error_text, parse_dm, price_text, receipt_line, split_message
from bot.errors import (
    PaymentError,
    PaymentRequired,
    RateLimited,
    RequestTooLarge,
    ServiceUnavailable,
)
from bot.llm.gemini import Message
from bot.nutzap import KIND_NUTZAP, KIND_WALLET_HISTORY, history_content, history_tags, parse_nutzap
from bot.outbox import Outbox
from bot.pipeline import Answer, ChatRequest, Pipeline, QuotePayment
from mint_client.errors import MintError, QuoteUsed
from mint_client.requests import Transport, decode_payment_request, payload_to_token
from mint_client.store import InvoiceRecord, PaymentRecord
from mint_client.tokens import Token

log = logging.getLogger("ecashbot.nostr")

KIND_DM_NIP04 = 4
KIND_SEAL = 13
KIND_PRIVATE_MSG = 14
KIND_GIFT_WRAP = 1059
KIND_DM_RELAYS = 10050
KIND_NUTZAP_INFO = 10019
#: how long a question waits for the payment of the request we answered it with
PENDING_QUESTION_TTL_S = 3600
#: unpaid Lightning invoices one sender may have waiting at once
MAX_WAITING_INVOICES = 5


class Claims(Protocol):
    """Replay protection: the first claimer of a key wins (bot.state implements it)."""

    async def claim(self, key: str, ttl_s: int) -> bool:
        """True for the first claimer of ``key`` until ``ttl_s`` passes."""
        ...

    async def release(self, key: str) -> None:
        """Give ``key`` up: its next claimer wins."""
        ...


@dataclass(frozen=True, slots=True)
class IncomingDM:
    """A decrypted, authenticated DM."""

    #: the id of the message itself: the rumor's for NIP-17 (one rumor may come in
    #: several wraps), the event's for NIP-04
    event_id: str
    sender: str
    text: str
    scheme: str  # "nip17" | "nip04"


def _reply_tags(event_id: str) -> list[Tag]:
    """The ``e`` tag of a reply to the DM ``event_id``; none when it is not an event id
    (a reply resent after a restart knows only its request)."""
    try:
        return [Tag.event(EventId.parse(event_id))]
    except NostrSdkError:
        return []


def _unwrap(keys: Keys, event: Event) -> IncomingDM | None:
    """Decrypt a gift wrap or a NIP-04 DM; None when it is not a valid DM to us."""
    kind = event.kind().as_u16()
    if kind == KIND_GIFT_WRAP:
        # from_gift_wrap checks the seal's signature and that the seal's author is
        # the rumor's author: a forged sender raises here
        gift = UnwrappedGift.from_gift_wrap(keys, event)
        rumor = gift.rumor()
        if rumor.kind().as_u16() != KIND_PRIVATE_MSG:
            return None
        if rumor.author().to_hex() != gift.sender().to_hex():
            return None
        rumor_id = rumor.id()
        if rumor_id is None:
            rumor_id = rumor.ensure_id().id()
        return IncomingDM(
            event_id=rumor_id.to_hex(),
            sender=gift.sender().to_hex(),
            text=rumor.content(),
            scheme="nip17",
        )
    if kind == KIND_DM_NIP04:
        if not event.verify():
            return None
        return IncomingDM(
            event_id=event.id().to_hex(),
            sender=event.author().to_hex(),
            text=keys.nip04_decrypt(event.author(), event.content()),
            scheme="nip04",
        )
    return None


class NostrTransport:
    """Reads DMs addressed to the bot and answers them through the pipeline."""

    def __init__(self, cfg: Config, pipeline: Pipeline, claims: Claims, outbox: Outbox) -> None:
        assert cfg.nostr.nsec is not None
        self.cfg = cfg
        self.ncfg = cfg.nostr
        self.pipeline = pipeline
        self.claims = claims
        self.outbox = outbox
        self.keys = Keys.parse(cfg.nostr.nsec)
        self.pubkey = self.keys.public_key().to_hex()
        self.client: Client | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: dict[str, int] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        #: questions waiting for the payment of a NUT-18 request we sent:
        #: request id -> (sender, model, question, when)
        self._pending: OrderedDict[str, tuple[str, str | None, str, float]] = OrderedDict()
        #: questions waiting for their Lightning invoice to be paid: quote id -> sender
        self._invoices: dict[str, str] = {}
        self._wake_outbox = asyncio.Event()

    @property
    def npub(self) -> str:
        """The bot's public key, bech32."""
        return str(self.keys.public_key().to_bech32())

    def nprofile(self) -> str:
        """The bot's nprofile (pubkey + relays), the target of its NUT-18 requests."""
        relays = [RelayUrl.parse(u) for u in self.ncfg.relays]
        return str(Nip19Profile(self.keys.public_key(), relays).to_bech32())

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, publish the profile, DM relay list and NIP-61 lock key, read DMs."""
        uniffi_set_event_loop(asyncio.get_running_loop())
        client = (
            ClientBuilder()
            .notification_channel_size(65_536)
            .authenticator(SignerAuthenticator(self.keys))
            .build()
        )
        # reconnect quickly after a relay outage (the SDK's default waits 10 s and more)
        opts = (
            RelayOptions()
            .retry_interval(timedelta(seconds=self.ncfg.reconnect_s))
            .adjust_retry_interval(False)
        )
        for url in self.ncfg.relays:
            await client.add_relay(RelayUrl.parse(url), opts=opts)
        await client.connect(timedelta(seconds=5))
        self.client = client
        notifications = client.notifications()  # before subscribe, so nothing is missed
        since = Timestamp.from_secs(int(time.time()) - self.ncfg.lookback_s)
        me = self.keys.public_key()
        filters = [
            Filter().kind(Kind(KIND_GIFT_WRAP)).pubkey(me).since(since),
            Filter().kind(Kind(KIND_DM_NIP04)).pubkey(me).since(since),
        ]
        nutzap_info = self._nutzap_info()
        if nutzap_info is not None:
            # we advertise a lock key (kind 10019): nutzaps to us are ours to take in
            filters.append(Filter().kind(Kind(KIND_NUTZAP)).pubkey(me).since(since))
        await client.subscribe(ReqTarget.auto(filters), id="ecashbot-dms")
        self._spawn(self._read(notifications))
        self._spawn(self._outbox_loop())
        await self._publish_profile(nutzap_info)
        log.info("Nostr: listening as %s on %s", self.npub, ", ".join(self.ncfg.relays))

    async def stop(self) -> None:
        """Stop reading, let replies in flight go out, disconnect."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.shutdown()
            self.client = None

    async def relay_status(self) -> dict[str, str]:
        """Each relay's connection state as the SDK sees it: ``connected``, ``connecting``,
        ``disconnected``, ... (``stopped`` while the transport is not running)."""
        client = self.client
        if client is None:
            return {url: "stopped" for url in self.ncfg.relays}
        relays = await client.relays()
        return {str(url): relay.status().name.lower() for url, relay in relays.items()}

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_profile(self, nutzap_info: Event | None) -> None:
        about = self._prices()
        profile = EventBuilder(
            Kind(0), json.dumps({"name": self.ncfg.name, "about": about, "bot": True})
        ).finalize(self.keys)
        relays = (
            EventBuilder(Kind(KIND_DM_RELAYS), "")
            .tags([Tag.parse(["relay", u]) for u in self.ncfg.relays])
            .finalize(self.keys)
        )
        events = [profile, relays]
        if nutzap_info is not None:
            events.append(nutzap_info)
        for ev in events:
            await self._publish(ev, recipient="", carries_change=False)

    def _nutzap_info(self) -> Event | None:
        """NIP-61 kind 10019: our relays, mints and the P2PK key to lock tokens to.

        The lock key is not the Nostr key (NIP-61 forbids that); None when the bot
        accepts no locked tokens.
        """
        lock_pubkey = self.pipeline.lock_pubkey
        if lock_pubkey is None:
            return None
        if lock_pubkey[2:].lower() == self.pubkey:
            log.error("Nostr: the P2PK lock key is the Nostr key; not advertising it (NIP-61)")
            return None
        tags = [["relay", u] for u in self.ncfg.relays]
        tags += [["mint", m, self.cfg.unit] for m in self.cfg.mints]
        tags.append(["pubkey", lock_pubkey])
        return (
            EventBuilder(Kind(KIND_NUTZAP_INFO), "")
            .tags([Tag.parse(t) for t in tags])
            .finalize(self.keys)
        )

    # -- receiving ----------------------------------------------------------------------

    async def _read(self, notifications: object) -> None:
        stream = notifications
        while True:
            n = await stream.next()  # type: ignore[attr-defined]
            if n is None or n.is_shutdown():
                return
            if n.is_new_event():
                self._spawn(self._handle_event(n.event))

    def _seen_before(self, event_id: str) -> bool:
        """A per-process memory in front of the persistent claim (cheap for relay echoes)."""
        if event_id in self._seen:
            return True
        self._seen[event_id] = None
        if len(self._seen) > 100_000:
            self._seen.popitem(last=False)
        return False

    async def _handle_event(self, event: Event) -> None:
        event_id = event.id().to_hex()
        if self._seen_before(event_id):
            return
        if event.kind().as_u16() == KIND_NUTZAP:
            await self._handle_nutzap(event)
            return
        try:
            dm = await asyncio.to_thread(_unwrap, self.keys, event)
        except Exception as exc:
            log.warning(
                "Nostr: dropped event %s: cannot open it (%s)", event_id[:12], type(exc).__name__
            )
            return
        if dm is None:
            log.warning("Nostr: dropped event %s: not a valid DM to us", event_id[:12])
            return
        try:
            first = await self.claims.claim(f"nostr:{event_id}", self.ncfg.lookback_s + 86400)
        except Exception:
            log.exception("Nostr: state unavailable; DM %s not handled", event_id[:12])
            await self._reply(
                dm,
                "The bot is unavailable right now (its state store is "
                "down). Nothing was charged; please try again in a minute.",
            )
            return
        if not first:
            return
        if dm.event_id != event_id:
            # the same rumor may come in another wrap: claim the message itself too
            try:
                if not await self.claims.claim(
                    f"nostr:{dm.event_id}", self.ncfg.lookback_s + 86400
                ):
                    return
            except Exception:
                log.exception("Nostr: state unavailable; DM %s not handled", event_id[:12])
                return
        await self._handle_dm(dm)

    async def _handle_nutzap(self, event: Event) -> None:
        """Take a NIP-61 nutzap in as a tip; mark it redeemed (kind 7376).

        Nothing is said to a nutzap the bot can't take (another mint, another key, spent,
        malformed): its proofs stay with their sender, who sees no "redeemed" mark.
        """
        event_id = event.id().to_hex()
        if not event.verify():
            log.warning("Nostr: dropped nutzap %s: bad signature", event_id[:12])
            return
        sender = event.author().to_hex()
        try:
            nutzap = parse_nutzap(
                event_id,
                sender,
                event.content(),
                [t.to_vec() for t in event.tags()],
                recipient=self.pubkey,
            )
        except PaymentError as exc:
            log.warning("Nostr: dropped nutzap %s: %s", event_id[:12], exc.message)
            return
        claim = f"nostr:{event_id}"
        try:
            if not await self.claims.claim(claim, self.ncfg.lookback_s + 86400):
                return
        except Exception:
            log.exception("Nostr: state unavailable; nutzap %s not taken now", event_id[:12])
            return
        try:
            rec = await self.pipeline.take_tip(
                nutzap.token,
                # one journal entry per attempt: one the mint failed stays as "failed"
                tip_id=f"nutzap-{event_id}-{uuid.uuid4().hex[:8]}",
                payer=f"npub:{sender}",
                reply_to=f"nip17:{sender}",
            )
        except PaymentError as exc:
            log.warning("Nostr: nutzap %s not taken: %s", event_id[:12], exc.message)
            if exc.token_untouched and isinstance(
                exc, (MintError, ServiceUnavailable, RateLimited)
            ):
                # the mint or the state store was down, or the sender over their rate:
                # not taken now, not refused for good (a restart's look back retries it)
                with contextlib.suppress(Exception):
                    await self.claims.release(claim)
            return
        log.info(
            "Nostr: nutzap %s from %s: %d sat taken in",
            event_id[:12],
            sender[:12],
            rec.charged_sat or 0,
        )
        content = await asyncio.to_thread(
            nip44_encrypt,
            self.keys.secret_key(),
            self.keys.public_key(),
            history_content(rec.charged_sat or 0, rec.unit),
            Nip44Version.V2,
        )
        receipt = (
            EventBuilder(Kind(KIND_WALLET_HISTORY), content)
            .tags([Tag.parse(t) for t in history_tags(nutzap)])
            .finalize(self.keys)
        )
        await self._publish(receipt, recipient="", carries_change=False)

    async def _handle_dm(self, dm: IncomingDM) -> None:
        try:
            req = parse_dm(dm.text)
        except PaymentError as exc:
            await self._reply(dm, error_text(exc))
            return
        if req.command in ("help", "price"):
            await self._reply(dm, await self._price_reply())
            return
        if req.command == "change":
            await self._resend_change(dm)
            return
        if len(req.question) > self.ncfg.max_message_chars:
            await self._reply(
                dm,
                error_text(
                    RequestTooLarge(
                        f"your question is {len(req.question)} characters; the limit is "
                        f"{self.ncfg.max_message_chars}"
                    )
                ),
            )
            return
        if self._active.get(dm.sender, 0) >= self.ncfg.max_concurrent_per_sender:
            self.pipeline.metrics.refused("nostr", RateLimited.code)
            await self._reply(
                dm,
                error_text(
                    RateLimited(
                        "you have too many questions in flight; wait for an answer, then ask "
                        "again.",
                        retry_after_s=30,
                    )
                ),
            )
            return
        self._active[dm.sender] = self._active.get(dm.sender, 0) + 1
        try:
            await self._ask(dm, req)
        finally:
            self._active[dm.sender] -= 1
            if not self._active[dm.sender]:
                del self._active[dm.sender]

    def _model_name(self, model: str) -> str:
        """The model as the receipt names it, with who answered when it is not Gemini."""
        label = self.pipeline.llm.label
        return model if label == "Gemini" else f"{model} ({label})"

    def _prices(self) -> str:
        return price_text(
            models={
                n: (m.input_msat_per_1k, m.output_msat_per_1k, m.request_msat)
                for n, m in self.cfg.models.items()
            },
            mints=self.cfg.mints,
            default_model=self.cfg.default_model,
            bot_name=self.ncfg.name,
        )

    async def _price_reply(self) -> str:
        text = self._prices()
        typical = ChatRequest(messages=(Message("user", "x" * 300),))
        try:
            amount = await self.pipeline.price_of(typical)
        except PaymentError:
            return text
        creq = self.pipeline.payment_request(
            amount, description="ecashbot question", transports=self._transports()
        )
        return f"{text}\n\nA typical answer costs about {amount} sat. Payment request:\n{creq}"

    async def _resend_change(self, dm: IncomingDM) -> None:
        """`/change`: what a crash kept from the sender (answer, change or refund, with what
        it is), then the change tokens of their recent payments that are still unspent."""
        since = time.time() - self.cfg.wallet.change_pickup_ttl_s
        recs = await self.pipeline.wallet.store.payments_for(f"{dm.scheme}:{dm.sender}", since)
        tokens: list[str] = []
        delivered = 0
        for rec in recs:
            if (
                rec.delivered_at is None
                and rec.status in ("settled", "refunded")
                and not self.pipeline.in_flight(rec.id)
                and (rec.change_token or rec.answer is not None)
            ):
                await self.deliver_recovered(rec)
                delivered += 1
                continue
            if not rec.change_token:
                continue
            try:
                got = await self.pipeline.pickup(token=None, request_id=rec.id)
            except PaymentError:
                continue
            if not got.spent:
                tokens.append(rec.change_token)
        if not tokens:
            if not delivered:
                await self._reply(dm, "No unspent change is kept for you.")
            return
        await self._reply(
            dm, f"Here is the change of {len(tokens)} recent payment(s), one token per message."
        )
        for t in tokens:
            await self._reply(dm, t, carries_change=True)

    async def deliver_recovered(self, rec: PaymentRecord) -> None:
        """Send an answer, change or refund that a crash kept from its payer; mark it delivered."""
        if not rec.reply_to or not (rec.change_token or rec.answer):
            return
        scheme, _, sender = rec.reply_to.partition(":")
        dm = IncomingDM(event_id=rec.id, sender=sender, text="", scheme=scheme)
        if rec.status == "refunded" and rec.transport == "nutzap":
            await self._reply(
                dm,
                "Sorry: your nutzap was interrupted while the bot took it in (the bot "
                f"restarted). Its {rec.change_sat} sat come back in the next message.",
            )
        elif rec.status == "refunded":
            await self._reply(
                dm,
                "Sorry: your question was interrupted before it was answered (the bot "
                f"restarted). Nothing was charged: your {rec.change_sat} sat come back in the "
                f"next message. (request {rec.id[:12]})",
            )
        elif rec.answer is not None:
            line = (
                f"-- sent again after a restart: charged {rec.charged_sat} sat, mint fee "
                f"{rec.fee_sat} sat, change {rec.change_sat} sat"
            )
            for part in split_message(f"{rec.answer}\n\n{line}"):
                await self._reply(dm, part)
        if rec.change_token:
            await self._reply(dm, rec.change_token, carries_change=True)
        await self.pipeline.wallet.store.mark_delivered(rec.id)

    def _transports(self) -> list[Transport]:
        return [Transport(type="nostr", target=self.nprofile(), tags=(("n", "17"),))]

    async def _ask(self, dm: IncomingDM, req: DMRequest) -> None:
        payment: str | Token | None = None
        question, model = req.question, req.model
        if req.command == "invoice":
            pass  # pay by Lightning even if the text holds a token
        elif req.payload is not None:
            payment = payload_to_token(req.payload)
            waiting = self._pending.pop(req.payload.id or "", None)
            if (
                waiting is not None
                and waiting[0] == dm.sender
                and time.time() - waiting[3] < PENDING_QUESTION_TTL_S
                and not question
            ):
                _, model, question, _ = waiting
        elif req.token is not None:
            payment = req.token
        if not question and req.command == "invoice":
            await self._reply(dm, "Send /invoice [SAT] <your question>, in one message.")
            return
        if not question:
            await self._reply(
                dm,
                "Send your question together with the token in one message. "
                + ("Your token was not spent: you can still use it." if payment else ""),
            )
            return
        chat = ChatRequest(messages=(Message("user", question),), model=model)
        try:
            answer = await self.pipeline.start(
                chat,
                payment,
                transport="nostr",
                payer=f"npub:{dm.sender}",
                reply_to=f"{dm.scheme}:{dm.sender}",
                request_transports=self._transports(),
            )
        except PaymentRequired as exc:
            self._remember_question(exc, dm.sender, question, model)
            if not payment:
                await self._offer_invoice(dm, req, chat, exc)
                return
            await self._reply(dm, error_text(exc))
            return
        except PaymentError as exc:
            await self._reply(dm, error_text(exc))
            return
        await self._send_answer(dm, answer)

    async def _offer_invoice(
        self, dm: IncomingDM, req: DMRequest, chat: ChatRequest, exc: PaymentRequired
    ) -> None:
        """A question without a token: the prices, a payment request, and an invoice."""
        intro = f"{self._prices()}\n\n{error_text(exc)}"
        lcfg = self.cfg.lightning
        amount = req.invoice_sat or lcfg.default_invoice_sat or exc.amount_sat
        waiting = sum(1 for s in self._invoices.values() if s == dm.sender)
        if req.invoice_sat is not None:
            least = await self.pipeline.price_of(chat, self.cfg.limits.min_output_tokens)
            if amount < least:
                await self._reply(
                    dm,
                    f"{amount} sat is too little for this question: "
                    f"ask for an invoice of at least {least} sat.",
                )
                return
        if not lcfg.invoices or waiting >= MAX_WAITING_INVOICES:
            await self._reply(dm, intro)
            return
        try:
            invoice = await self.pipeline.invoice(
                amount,
                transport="nostr",
                reply_to=f"{dm.scheme}:{dm.sender}",
                description=f"{self.ncfg.name}: one question",
            )
        except PaymentError as err:
            await self._reply(dm, f"{intro}\n\n{error_text(err)}")
            return
        if invoice is None:
            await self._reply(dm, intro)
            return
        self._invoices[invoice.quote_id] = dm.sender
        self._spawn(self._await_invoice(dm, invoice, chat))
        minutes = max(1, round(((invoice.expiry or time.time() + 3600) - time.time()) / 60))
        await self._reply(
            dm,
            f"{intro}\n\nOr pay the Lightning invoice in the next message ({invoice.amount_sat} "
            f"sat, valid for {minutes} min): the answer comes as soon as it is paid, with "
            "what it didn't use back as a Cashu token.",
        )
        await self._reply(dm, invoice.request)

    async def _await_invoice(
        self, dm: IncomingDM, invoice: InvoiceRecord, chat: ChatRequest
    ) -> None:
        """Answer the question once its invoice is paid; an unpaid one expires silently."""
        try:
            paid = await self.pipeline.wait_invoice(invoice)
        except Exception:
            log.exception("Nostr: waiting for invoice %s failed", invoice.quote_id[:12])
            return  # if it gets paid, recovery refunds it (lightning.refund_unused_after_s)
        finally:
            self._invoices.pop(invoice.quote_id, None)
        if not paid:
            log.info("Nostr: invoice %s expired unpaid", invoice.quote_id[:12])
            return
        try:
            answer = await self.pipeline.start(
                chat,
                QuotePayment(invoice.quote_id),
                transport="nostr",
                payer=f"npub:{dm.sender}",
                reply_to=f"{dm.scheme}:{dm.sender}",
                request_transports=self._transports(),
            )
        except QuoteUsed:
            return  # answered, or refunded, by another process
        except PaymentError as exc:
            await self._refund_invoice(dm, invoice, exc)
            return
        await self._send_answer(dm, answer)

    async def _refund_invoice(
        self, dm: IncomingDM, invoice: InvoiceRecord, exc: PaymentError
    ) -> None:
        """A paid invoice whose question can't be answered now: all its sats go back."""
        try:
            rec = await self.pipeline.refund_invoice(
                invoice.quote_id, transport="nostr", reply_to=f"{dm.scheme}:{dm.sender}"
            )
        except PaymentError as err:
            log.warning("Nostr: refund of invoice %s postponed: %s", invoice.quote_id[:12], err)
            return  # recovery refunds it later
        if rec is None or not rec.change_token:
            return
        await self._reply(
            dm,
            f"Your invoice was paid, but the question can't be answered now ({exc.message}). "
            f"Its {rec.change_sat} sat come back in the next message.",
        )
        await self._reply(dm, rec.change_token, carries_change=True)
        await self.pipeline.wallet.store.mark_delivered(rec.id)

    async def _send_answer(self, dm: IncomingDM, answer: Answer) -> None:
        """The answer with its receipt, then the change token in a DM of its own."""
        text, receipt = await answer.result()
        s = receipt.settlement
        if receipt.refunded:
            await self._reply(
                dm,
                f"Sorry, the model failed ({receipt.error}). Nothing was charged: your "
                f"{s.change_sat} sat come back in the next message (the mint kept its fee of "
                # the request id keeps two such notices apart: clients drop a DM whose
                # text and second are the same as another's (same rumor id)
                f"{s.fee_sat} sat). (request {receipt.request_id[:12]})",
            )
        else:
            line = receipt_line(
                input_tokens=s.input_tokens,
                output_tokens=s.output_tokens,
                charged_sat=s.charged_sat,
                fee_sat=s.fee_sat,
                change_sat=s.change_sat,
                model=self._model_name(receipt.model),
            )
            for part in split_message(f"{text}\n\n{line}"):
                await self._reply(dm, part)
        if receipt.change_token:
            await self._reply(dm, receipt.change_token, carries_change=True)
        await self.pipeline.wallet.store.mark_delivered(receipt.request_id)

    def _remember_question(
        self, exc: PaymentRequired, sender: str, question: str, model: str | None
    ) -> None:
        try:
            req_id = decode_payment_request(exc.payment_request).id
        except PaymentError:
            return
        if req_id:
            self._pending[req_id] = (sender, model, question, time.time())
            while len(self._pending) > 10_000:
                self._pending.popitem(last=False)

    # -- sending ------------------------------------------------------------------------

    async def _reply(self, dm: IncomingDM, text: str, *, carries_change: bool = False) -> None:
        receiver = PublicKey.parse(dm.sender)
        # a reply names the question (an "e" tag): clients thread it, and two replies with
        # the same text in the same second to two questions stay two messages (a NIP-17
        # rumor's id covers its tags; clients drop a second rumor with the same id)
        reply_to = _reply_tags(dm.event_id)
        if dm.scheme == "nip17":
            event = await asyncio.to_thread(
                nip17_make_private_msg, self.keys, receiver, text, None, reply_to
            )
        else:
            event = (
                EventBuilder(Kind(KIND_DM_NIP04), self.keys.nip04_encrypt(receiver, text))
                .tags([Tag.public_key(receiver), *reply_to])
                .finalize(self.keys)
            )
        await self._publish(event, recipient=dm.sender, carries_change=carries_change)

    async def _publish(self, event: Event, *, recipient: str, carries_change: bool) -> None:
        """Write to the outbox, then try to send; the outbox loop retries failures."""
        event_id = event.id().to_hex()
        ttl = self.ncfg.change_reply_ttl_s if carries_change else self.ncfg.reply_ttl_s
        await self.outbox.add(
            event_id, event.as_json(), recipient, carries_change=carries_change, ttl_s=ttl
        )
        if not await self._send(event):
            self._wake_outbox.set()

    async def _send(self, event: Event) -> bool:
        client = self.client
        if client is None:
            return False
        event_id = event.id().to_hex()
        try:
            out = await client.send_event(event)
        except Exception as exc:
            log.info("Nostr: send of %s failed (%s); will retry", event_id[:12], exc)
            await self.outbox.mark_attempt(event_id)
            return False
        if out.success:
            await self.outbox.mark_sent(event_id)
            return True
        await self.outbox.mark_attempt(event_id)
        return False

    async def _outbox_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_outbox.wait(), self.ncfg.retry_interval_s)
            self._wake_outbox.clear()
            try:
                for lost in await self.outbox.expire():
                    level = logging.ERROR if lost.carries_change else logging.WARNING
                    log.log(
                        level,
                        "Nostr: reply %s to %s expired unsent%s",
                        lost.event_id[:12],
                        lost.recipient[:12],
                        " (it carried change: see the wallet's payment record)"
                        if lost.carries_change
                        else "",
                    )
                for item in await self.outbox.unsent():
                    await self._send(Event.from_json(item.event_json))
            except Exception:
                log.exception("Nostr: outbox pass failed")


async def run_transport(
    cfg: Config, pipeline: Pipeline, claims: Claims, outbox: Outbox
) -> Callable[[], Awaitable[None]]:
    """Start the transport; returns its stop function."""
    transport = NostrTransport(cfg, pipeline, claims, outbox)
    await transport.start()
    return transport.stop
