"""``ecashbot ask``: a small client that pays a bot with a Cashu token and prints its answer.

Over HTTP it streams ``POST /v1/chat/completions`` with the token in ``X-Cashu`` and
prints the answer as it comes; over Nostr (``--nostr``) it sends a NIP-17 DM with the
question and the token and waits for the answer DM and the change DM. Either way it
ends with the same two lines, so a script can read them::

    change: cashuB...            (or "change: none")
    receipt: MODEL: 9 tokens in, 40 out; charged 0 sat, mint fee 1 sat, change 998 sat ...

Exit status: 0 answered, 1 anything else (refused, payment required, refunded, timeout).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import IO, Any

import aiohttp
from nostr_sdk import (
    ClientBuilder,
    Filter,
    Keys,
    Kind,
    PublicKey,
    RelayUrl,
    ReqTarget,
    SignerAuthenticator,
    Timestamp,
    UnwrappedGift,
    nip17_make_private_msg,
    uniffi_set_event_loop,
)

from mint_client.errors import PaymentError
from mint_client.requests import decode_payment_request
from mint_client.tokens import find_token

__all__ = ["AskResult", "ask_http", "ask_nostr", "parse_receipt_line"]

KIND_GIFT_WRAP = 1059
KIND_PRIVATE_MSG = 14
#: NIP-59 backdates gift wraps by up to two days: read that far back
WRAP_LOOKBACK_S = 2 * 86400 + 3600
#: the header a bot may send to say what answered (e.g. "Gemini emulator")
MODEL_SOURCE_HEADER = "X-Ecashbot-Model-Source"

_RECEIPT = re.compile(
    r"^-- (?P<model>.+): (?P<input>\d+) tokens in, (?P<output>\d+) out; "
    r"charged (?P<charged>\d+) sat, mint fee (?P<fee>\d+) sat, change (?P<change>\d+) sat\s*$",
    re.MULTILINE,
)
_PART = re.compile(r"^\((\d+)/(\d+)\) ")


@dataclass(frozen=True, slots=True)
class AskResult:
    """An answered (or refunded) question: the answer, where the money went, the change."""

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    charged_sat: int
    fee_sat: int
    change_sat: int
    change: str | None
    #: what the token was worth; None when the transport does not say (Nostr)
    paid_sat: int | None = None
    cost_msat: int | None = None
    request_id: str | None = None
    #: what answered, when the bot says (e.g. "Gemini emulator")
    source: str | None = None
    refunded: bool = False

    def receipt(self) -> str:
        """One line: the bot's receipt plus what the transport told us besides."""
        model = f"{self.model} ({self.source})" if self.source else self.model
        line = (
            f"{model}: {self.input_tokens} tokens in, {self.output_tokens} out; "
            f"charged {self.charged_sat} sat, mint fee {self.fee_sat} sat, "
            f"change {self.change_sat} sat"
        )
        extra = []
        if self.paid_sat is not None:
            extra.append(f"paid {self.paid_sat} sat")
        if self.cost_msat is not None:
            extra.append(f"cost {self.cost_msat} msat")
        if self.request_id:
            extra.append(f"request {self.request_id}")
        if self.refunded:
            extra.append("REFUNDED")
        return line + (f" ({', '.join(extra)})" if extra else "")


def _print_end(result: AskResult, out: IO[str]) -> None:
    print(f"change: {result.change or 'none'}", file=out)
    print(f"receipt: {result.receipt()}", file=out, flush=True)


def _describe_request(creq: str) -> str:
    try:
        req = decode_payment_request(creq)
    except PaymentError:
        return ""
    mints = ", ".join(req.mints) if req.mints else "any"
    return f" in {req.unit or 'sat'} ecash from: {mints}"


# --- HTTP ---------------------------------------------------------------------------------


def _error_exit(status: int, body: Any, out: IO[str]) -> int:
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        print(f"error: HTTP {status}: {str(body)[:500]}", file=out, flush=True)
        return 1
    if status == 402:
        creq = str(err.get("payment_request", ""))
        print(
            f"payment required: {err.get('amount_sat')} sat{_describe_request(creq)}",
            file=out,
        )
        print(f"payment request: {creq}", file=out)
        print(
            "Pay it with a Cashu wallet, or ask again with --token cashuB... worth at least "
            "that much.",
            file=out,
            flush=True,
        )
        return 1
    print(f"error: HTTP {status} {err.get('code')}: {err.get('message')}", file=out)
    if err.get("token_untouched"):
        print("Your token was not spent: you can still use it.", file=out)
    payment = body.get("payment") if isinstance(body, dict) else None
    if isinstance(payment, dict) and payment.get("change"):
        print(f"change: {payment['change']}", file=out)
    out.flush()
    return 1


def _result_from_final(final: dict[str, Any], text: str, source: str | None) -> AskResult:
    payment = final.get("payment") or {}
    usage = final.get("usage") or {}
    return AskResult(
        text=text,
        model=str(final.get("model", "?")),
        input_tokens=int(usage.get("prompt_tokens", 0)),
        output_tokens=int(usage.get("completion_tokens", 0)),
        charged_sat=int(payment.get("charged_sat", 0)),
        fee_sat=int(payment.get("fee_sat", 0)),
        change_sat=int(payment.get("change_sat", 0)),
        change=payment.get("change") or None,
        paid_sat=int(payment.get("paid_sat", 0)),
        cost_msat=int(payment.get("cost_msat", 0)),
        request_id=payment.get("request_id"),
        source=source,
        refunded=bool(payment.get("refunded", False)),
    )


async def ask_http(
    url: str,
    question: str,
    token: str | None,
    *,
    out: IO[str],
    model: str | None = None,
    max_tokens: int | None = None,
    timeout_s: float = 300.0,
) -> tuple[int, AskResult | None]:
    """Ask over HTTP, streaming: print the answer as it comes, then change and receipt.

    Returns the exit status and the result (None when nothing was answered or refunded).
    """
    body: dict[str, Any] = {"messages": [{"role": "user", "content": question}], "stream": True}
    request_id: str | None = None
    if model:
        body["model"] = model
    if max_tokens:
        body["max_tokens"] = max_tokens
    headers = {"X-Cashu": token} if token else {}
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=10)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(endpoint, json=body, headers=headers) as resp,
        ):
            if resp.status != 200 or not resp.content_type.startswith("text/event-stream"):
                raw = await resp.read()
                try:
                    data = json.loads(raw)
                except ValueError:
                    data = raw.decode(errors="replace")
                return _error_exit(resp.status, data, out), None
            source = resp.headers.get(MODEL_SOURCE_HEADER)
            request_id = resp.headers.get("X-Request-Id")
            parts: list[str] = []
            final: dict[str, Any] | None = None
            async for raw_line in resp.content:
                line = raw_line.decode().strip()
                if not line.startswith("data:"):
                    continue
                data_text = line[len("data:") :].strip()
                if data_text == "[DONE]":
                    break
                chunk = json.loads(data_text)
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        parts.append(piece)
                        print(piece, end="", file=out, flush=True)
                if "payment" in chunk:
                    final = chunk
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"\nerror: {endpoint}: {type(exc).__name__}: {exc}", file=out, flush=True)
        _print_pickup_hint(url, request_id, out)
        return 1, None
    if parts:
        print("\n", file=out)  # end the answer's line, then one blank line
    if final is None:
        print("error: the stream ended without a receipt", file=out, flush=True)
        _print_pickup_hint(url, request_id, out)
        return 1, None
    result = _result_from_final(final, "".join(parts), source)
    if result.refunded:
        err = final.get("error") or {}
        message = str(err.get("message", "the model failed"))
        if result.change:  # the bot's message carries the token: it is printed below
            message = message.replace(f": {result.change}", "").replace(result.change, "")
        print(f"refunded: {message}", file=out)
    _print_end(result, out)
    return (1 if result.refunded else 0), result


def _print_pickup_hint(url: str, request_id: str | None, out: IO[str]) -> None:
    """After a broken answer: where the bot keeps the change of a paid request."""
    if request_id:
        print(
            f"The bot keeps the change of request {request_id}: curl -sS -X POST "
            f"{url.rstrip('/')}/v1/change -H 'X-Request-Id: {request_id}'",
            file=out,
            flush=True,
        )


# --- Nostr --------------------------------------------------------------------------------


def _last_receipt(text: str) -> re.Match[str] | None:
    matches = list(_RECEIPT.finditer(text))
    return matches[-1] if matches else None


def parse_receipt_line(text: str) -> dict[str, str] | None:
    """The fields of the bot's DM receipt line ("-- MODEL: N tokens in, ..."), if any."""
    m = _last_receipt(text)
    return m.groupdict() if m else None


class _Conversation:
    """The bot's DMs in answer to one question, until the answer and change are in."""

    def __init__(self) -> None:
        self.parts: dict[int, str] = {}
        self.n_parts: int | None = None
        self.change: str | None = None
        self.notices: list[str] = []
        self.expect_token = False

    def add(self, text: str) -> None:
        stripped = text.strip()
        found = find_token(stripped)
        if found is not None and not found[1] and stripped.startswith("cashu"):
            self.change = found[0]
            return
        m = _PART.match(text)
        if m:
            self.n_parts = int(m.group(2))
            self.parts[int(m.group(1))] = text[m.end() :]
        elif parse_receipt_line(text) is not None:
            self.n_parts, self.parts = 1, {1: text}
        else:
            self.notices.append(text)
            if "come back in the next message" in text:
                self.expect_token = True

    @property
    def answer(self) -> str | None:
        if self.n_parts is None or len(self.parts) < self.n_parts:
            return None
        return "".join(self.parts[i] for i in sorted(self.parts))

    def done(self) -> bool:
        answer = self.answer
        if answer is not None:
            fields = parse_receipt_line(answer)
            return fields is None or int(fields["change"]) == 0 or self.change is not None
        if self.expect_token:
            return self.change is not None
        return bool(self.notices)


async def ask_nostr(
    relays: Sequence[str],
    to: str,
    question: str,
    token: str | None,
    *,
    out: IO[str],
    model: str | None = None,
    nsec: str | None = None,
    timeout_s: float = 120.0,
) -> tuple[int, AskResult | None]:
    """Ask by NIP-17 DM on ``relays``; print the answer DM, then change and receipt.

    Sent from a new throw-away key unless ``nsec`` is given.
    """
    uniffi_set_event_loop(asyncio.get_running_loop())
    keys = Keys.parse(nsec) if nsec else Keys.generate()
    bot = PublicKey.parse(to)
    client = (
        ClientBuilder()
        .notification_channel_size(65_536)
        .authenticator(SignerAuthenticator(keys))
        .build()
    )
    try:
        for url in relays:
            await client.add_relay(RelayUrl.parse(url))
        await client.connect(timedelta(seconds=5))
        notifications = client.notifications()  # before subscribe, so nothing is missed
        started = int(time.time())
        since = Timestamp.from_secs(started - WRAP_LOOKBACK_S)
        await client.subscribe(
            ReqTarget.auto(
                [Filter().kind(Kind(KIND_GIFT_WRAP)).pubkey(keys.public_key()).since(since)]
            ),
            id="ecashbot-ask",
        )
        text = question if not model else f"/model {model} {question}"
        if token:
            text = f"{text}\n{token}"
        event = await asyncio.to_thread(nip17_make_private_msg, keys, bot, text)
        sent = await client.send_event(event)
        if not sent.success:
            failed = "; ".join(f"{u}: {why}" for u, why in sent.failed.items())
            print(f"error: no relay took the DM ({failed})", file=out, flush=True)
            return 1, None
        convo = _Conversation()
        seen: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while not convo.done():
            left = deadline - time.monotonic()
            if left <= 0:
                if convo.answer is not None:  # answered, but the change DM is missing
                    _, result = _print_conversation(convo, out)
                    # a throw-away key is worth showing: only it can ask for this change
                    who = "your key" if nsec else f"this key: {keys.secret_key().to_bech32()}"
                    print(
                        f"error: the change did not arrive within {timeout_s:.0f} s; DM the "
                        f"bot /change from {who}",
                        file=out,
                        flush=True,
                    )
                    return 1, result
                print(f"error: no complete answer within {timeout_s:.0f} s", file=out)
                for notice in convo.notices:
                    print(notice, file=out)
                out.flush()
                return 1, None
            try:
                n = await asyncio.wait_for(notifications.next(), left)
            except TimeoutError:
                continue
            if n is None or n.is_shutdown():
                print("error: the relay connection closed", file=out, flush=True)
                return 1, None
            if not n.is_new_event() or n.event.kind().as_u16() != KIND_GIFT_WRAP:
                continue
            try:
                gift = await asyncio.to_thread(UnwrappedGift.from_gift_wrap, keys, n.event)
            except Exception:
                continue  # not for us, or forged
            rumor = gift.rumor()
            if (
                gift.sender().to_hex() != bot.to_hex()
                or rumor.kind().as_u16() != KIND_PRIVATE_MSG
                or rumor.created_at().as_secs() < started - 5  # an older conversation
            ):
                continue
            rumor_id = (rumor.id() or rumor.ensure_id().id()).to_hex()
            if rumor_id not in seen:  # the same DM may come from several relays
                seen.add(rumor_id)
                convo.add(rumor.content())
    finally:
        try:
            await client.shutdown()
        except Exception:
            pass  # best effort at exit
    return _print_conversation(convo, out)


def _print_conversation(convo: _Conversation, out: IO[str]) -> tuple[int, AskResult | None]:
    answer = convo.answer
    for notice in convo.notices:
        print(notice, file=out)
    if answer is None:
        if convo.change:
            print(f"change: {convo.change}", file=out)
        out.flush()
        return 1, None
    m = _last_receipt(answer)
    if m is None:
        print(answer, file=out, flush=True)
        return 1, None
    fields = m.groupdict()
    text = answer[: m.start()].rstrip()
    model, source = fields["model"], None
    if model.endswith(")") and " (" in model:  # "MODEL (Gemini emulator)"
        model, source = model[:-1].split(" (", 1)
    result = AskResult(
        text=text,
        model=model,
        input_tokens=int(fields["input"]),
        output_tokens=int(fields["output"]),
        charged_sat=int(fields["charged"]),
        fee_sat=int(fields["fee"]),
        change_sat=int(fields["change"]),
        change=convo.change,
        paid_sat=int(fields["charged"]) + int(fields["fee"]) + int(fields["change"]),
        source=source,
    )
    print(f"{text}\n", file=out)
    _print_end(result, out)
    return 0, result
