"""Direct messages as text: what a DM asks for, and how the bot's replies read. Pure.

The Nostr transport decrypts and sends; this module only reads and writes the text, so
the same rules hold for NIP-17 and NIP-04 and can be tested without a relay.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from bot.errors import PaymentError, PaymentRequired
from mint_client.requests import PaymentPayload, parse_payment_payload
from mint_client.tokens import find_token

#: a NIP-17 gift wrap is ~2.3x its text and relays commonly cap events at 64 KiB
MAX_PART_BYTES = 24_000


@dataclass(frozen=True, slots=True)
class DMRequest:
    """What one DM asks for."""

    #: "ask" (a question, maybe paid), "invoice" (pay it by Lightning), "help", "price",
    #: "change"
    command: str
    question: str
    model: str | None = None
    #: a cashuA/cashuB token found in the text
    token: str | None = None
    #: a NUT-18 payment sent by a wallet paying our payment request
    payload: PaymentPayload | None = None
    #: ``/invoice N``: the Lightning invoice asked for, sat (None: what the question needs)
    invoice_sat: int | None = None


def parse_dm(text: str) -> DMRequest:
    """Read a DM: commands, a token anywhere in the text, or a NUT-18 payment payload.

    Raises a :class:`~mint_client.errors.TokenError` for a payment payload that looks like
    one but does not parse.
    """
    stripped = text.strip()
    if stripped.startswith("{") and '"proofs"' in stripped:
        payload = parse_payment_payload(stripped)
        return DMRequest(command="ask", question=(payload.memo or "").strip(), payload=payload)
    model: str | None = None
    found = find_token(stripped)
    token, rest = found if found else (None, stripped)
    words = rest.split(maxsplit=1)
    head = words[0].lower() if words else ""
    if head in ("/help", "help", "/start"):
        return DMRequest(command="help", question="", token=token)
    if head in ("/price", "/prices", "/pricing"):
        return DMRequest(command="price", question="", token=token)
    if head == "/change":
        return DMRequest(command="change", question="", token=token)
    if head == "/invoice":
        parts = rest.split(maxsplit=2)
        if len(parts) > 1 and parts[1].isdigit():
            question = parts[2] if len(parts) > 2 else ""
            return DMRequest(
                command="invoice", question=question.strip(), invoice_sat=int(parts[1])
            )
        return DMRequest(command="invoice", question=rest[len(words[0]) :].strip())
    if head == "/model":
        parts = rest.split(maxsplit=2)
        model = parts[1] if len(parts) > 1 else None
        rest = parts[2] if len(parts) > 2 else ""
    return DMRequest(command="ask", question=rest.strip(), model=model, token=token)


def split_message(text: str, max_bytes: int = MAX_PART_BYTES) -> list[str]:
    """Split a long answer into numbered parts that each fit one relay event."""
    if len(text.encode("utf-8")) <= max_bytes:
        return [text]
    room = max_bytes - 16  # for the "(12/34) " prefix
    chunks: list[str] = []
    rest = text
    while rest:
        cut = _cut(rest, room)
        chunks.append(rest[:cut])
        rest = rest[cut:]
    n = len(chunks)
    return [f"({i}/{n}) {c}" for i, c in enumerate(chunks, 1)]


def _cut(text: str, max_bytes: int) -> int:
    """Index to cut ``text`` at, within ``max_bytes`` UTF-8 bytes, at a newline or space if near."""
    if len(text.encode("utf-8")) <= max_bytes:
        return len(text)
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits
        mid = (lo + hi + 1) // 2
        if len(text[:mid].encode("utf-8")) <= max_bytes:
            lo = mid
        else:
            hi = mid - 1
    for sep in ("\n", " "):
        at = text.rfind(sep, lo // 2, lo)
        if at > 0:
            return at + 1
    return max(lo, 1)


def receipt_line(
    *,
    input_tokens: int,
    output_tokens: int,
    charged_sat: int,
    fee_sat: int,
    change_sat: int,
    model: str,
) -> str:
    """The short receipt that goes with every answer."""
    return (
        f"-- {model}: {input_tokens} tokens in, {output_tokens} out; charged {charged_sat} sat, "
        f"mint fee {fee_sat} sat, change {change_sat} sat"
    )


def price_text(
    *,
    models: dict[str, tuple[int, int, int]],
    mints: list[str],
    default_model: str,
    bot_name: str,
) -> str:
    """The price list and how to pay: for /help, /price and unpaid DMs."""
    lines = [
        f"{bot_name} answers questions with Google Gemini for Cashu ecash: no account, "
        "you pay per question and get your change back.",
        "",
        "How to pay: send your question together with a Cashu token (cashuB...) in one "
        "message, pay the payment request below with a Cashu wallet, or pay the Lightning "
        "invoice the bot sends for a question without a token. The payment sets the "
        "longest answer you can get; what the answer didn't use comes back as a token.",
        "",
        "Prices (msat per 1000 tokens, in / out; thinking counts as output):",
    ]
    for name, (inp, out, req) in models.items():
        flat = f" + {req} msat per question" if req else ""
        mark = " (default)" if name == default_model else ""
        lines.append(f"  {name}{mark}: {inp} / {out}{flat}")
    lines += [
        "",
        "Accepted mints:",
        *[f"  {m}" for m in mints],
        "",
        "Commands: /help, /price, /model NAME <question>, /invoice [SAT] <question> (pay by "
        "Lightning), /change (your recent change again)",
    ]
    return "\n".join(lines)


def error_text(exc: PaymentError) -> str:
    """The one DM text of each refusal, saying whether the token was spent."""
    text = exc.message
    if isinstance(exc, PaymentRequired):
        return (
            f"{text}\n\nPay {exc.amount_sat} sat with this payment request, or send the "
            f"question again with a token:\n{exc.payment_request}"
        )
    if exc.token_untouched and exc.code not in ("bad_request", "unknown_model"):
        text += "\nYour token was not spent: you can still use it."
    return text


def payload_json(payload: PaymentPayload) -> str:
    """A NUT-18 payment payload as JSON (for tests and wallets)."""
    return json.dumps(
        {
            "id": payload.id,
            "memo": payload.memo,
            "mint": payload.mint,
            "unit": payload.unit,
            "proofs": [
                {
                    "amount": p.amount,
                    "id": p.keyset_id,
                    "secret": p.secret,
                    "C": p.C,
                    **({"dleq": {"e": p.dleq.e, "s": p.dleq.s, "r": p.dleq.r}} if p.dleq else {}),
                }
                for p in payload.proofs
            ],
        }
    )
