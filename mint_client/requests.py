"""NUT-18 payment requests (``creqA...``) and the payments wallets send in answer.

A request goes out in an HTTP 402 ``X-Cashu`` header (NUT-24) or a Nostr DM; a
wallet paying over the ``nostr`` transport answers with a JSON payment payload, not a
token string. Pure: no I/O.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass

import cbor2

from mint_client.errors import MalformedPaymentRequest, MalformedToken, UnsupportedToken
from mint_client.tokens import (
    MAX_AMOUNT,
    Proof,
    Token,
    _b64decode,
    _cbor_loads,
    _get,
    _mint_url,
    _proof_from_json,
    _text,
)

#: Transport types of NUT-18.
NOSTR = "nostr"
POST = "post"

_PUBKEY_HEX = re.compile(r"0[23][0-9a-fA-F]{64}")

Tags = tuple[tuple[str, ...], ...]


@dataclass(frozen=True, slots=True)
class Transport:
    """Where to send the payment: ``nostr`` (an nprofile, tag ``("n", "17")``) or ``post`` (URL)."""

    type: str
    target: str
    tags: Tags = ()


@dataclass(frozen=True, slots=True)
class P2PKLock:
    """The payment must be locked to ``pubkey`` (NUT-10 ``P2PK`` spending condition)."""

    pubkey: str
    tags: Tags = ()


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    """A NUT-18 payment request. ``None`` and empty fields are left out of the encoding."""

    id: str | None = None
    amount: int | None = None
    unit: str | None = "sat"
    single_use: bool | None = None
    mints: tuple[str, ...] = ()
    description: str | None = None
    transports: tuple[Transport, ...] = ()
    lock: P2PKLock | None = None


@dataclass(frozen=True, slots=True)
class PaymentPayload:
    """A payment a wallet sends for a request (NUT-18 ``PaymentRequestPayload``)."""

    id: str | None
    memo: str | None
    mint: str
    unit: str
    proofs: tuple[Proof, ...]


def encode_payment_request(req: PaymentRequest) -> str:
    """``creqA`` + base64url(CBOR), without padding; ``None`` and empty fields omitted."""
    obj: dict[str, object] = {}
    if req.id is not None:
        obj["i"] = req.id
    if req.amount is not None:
        obj["a"] = req.amount
    if req.unit is not None:
        obj["u"] = req.unit
    if req.single_use is not None:
        obj["s"] = req.single_use
    if req.mints:
        obj["m"] = list(req.mints)
    if req.description is not None:
        obj["d"] = req.description
    if req.transports:
        transports: list[dict[str, object]] = []
        for t in req.transports:
            item: dict[str, object] = {"t": t.type, "a": t.target}
            if t.tags:
                item["g"] = [list(tag) for tag in t.tags]
            transports.append(item)
        obj["t"] = transports
    if req.lock is not None:
        nut10: dict[str, object] = {"k": "P2PK", "d": req.lock.pubkey}
        if req.lock.tags:
            nut10["t"] = [list(tag) for tag in req.lock.tags]
        obj["nut10"] = nut10
    return "creqA" + base64.urlsafe_b64encode(cbor2.dumps(obj)).decode("ascii").rstrip("=")


def decode_payment_request(text: str, *, max_len: int = 16_000) -> PaymentRequest:
    """Decode a ``creqA`` request; :class:`MalformedPaymentRequest` if it isn't one.

    Unknown fields are ignored (the format grows); a lock other than P2PK, or a
    ``creqB`` (NUT-26) request, is an :class:`UnsupportedToken`.
    """
    if not isinstance(text, str):
        raise MalformedPaymentRequest("a payment request is text")
    if len(text) > max_len:
        raise MalformedPaymentRequest(f"the payment request is longer than {max_len} characters")
    s = text.strip()
    if s[:6].lower() == "creqb1":
        raise UnsupportedToken("creqB (NUT-26) payment requests are not supported; use creqA")
    if not s.startswith("creqA"):
        raise MalformedPaymentRequest("not a payment request: it must start with creqA")
    what, err = "the payment request", MalformedPaymentRequest
    obj = _cbor_loads(_b64decode(s[5:], what, err), what, err)
    if not isinstance(obj, dict):
        raise MalformedPaymentRequest("a payment request is a CBOR map")
    amount = _get(obj, "a")
    if amount is not None and (type(amount) is not int or not 0 < amount <= MAX_AMOUNT):
        raise MalformedPaymentRequest("the requested amount (a) must be a positive integer")
    single_use = _get(obj, "s")
    if single_use is not None and not isinstance(single_use, bool):
        raise MalformedPaymentRequest("single use (s) must be true or false")
    mints = _get(obj, "m")
    if mints is not None and not isinstance(mints, list):
        raise MalformedPaymentRequest("mints (m) must be a list of URLs")
    transports = _get(obj, "t")
    if transports is not None and not isinstance(transports, list):
        raise MalformedPaymentRequest("transports (t) must be a list")
    return PaymentRequest(
        id=_opt_text(_get(obj, "i"), "id (i)"),
        amount=amount,
        unit=_opt_text(_get(obj, "u"), "unit (u)"),
        single_use=single_use,
        mints=tuple(_req_text(m, "a mint URL (m)") for m in mints or ()),
        description=_opt_text(_get(obj, "d"), "description (d)"),
        transports=tuple(_transport(t) for t in transports or ()),
        lock=_lock(_get(obj, "nut10")),
    )


def _req_text(value: object, what: str) -> str:
    return _text(value, what, MalformedPaymentRequest)


def _opt_text(value: object, what: str) -> str | None:
    return None if value is None else _req_text(value, what)


def _tags(value: object, what: str) -> Tags:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(tag, list) for tag in value):
        raise MalformedPaymentRequest(f"{what} must be a list of lists of strings")
    return tuple(tuple(_req_text(x, what) for x in tag) for tag in value)


def _transport(value: object) -> Transport:
    if not isinstance(value, dict):
        raise MalformedPaymentRequest("a transport is a map with t, a and g")
    return Transport(
        type=_req_text(_get(value, "t"), "transport type (t)"),
        target=_req_text(_get(value, "a"), "transport target (a)"),
        tags=_tags(_get(value, "g"), "transport tags (g)"),
    )


def _lock(value: object) -> P2PKLock | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MalformedPaymentRequest("nut10 is a map with k, d and t")
    kind = _req_text(_get(value, "k"), "nut10 kind (k)")
    if kind != "P2PK":
        raise UnsupportedToken(f"a payment locked by {kind[:20]!r} is not supported, only P2PK")
    pubkey = _req_text(_get(value, "d"), "nut10 data (d)")
    if not _PUBKEY_HEX.fullmatch(pubkey):
        raise MalformedPaymentRequest("a P2PK lock's data (d) must be a compressed public key")
    return P2PKLock(pubkey=pubkey.lower(), tags=_tags(_get(value, "t"), "nut10 tags (t)"))


def parse_payment_payload(
    text: str, *, max_len: int = 64_000, max_proofs: int = 256
) -> PaymentPayload:
    """Parse the JSON a wallet sends to pay a request; :class:`MalformedToken` on any problem."""
    if not isinstance(text, str):
        raise MalformedToken("a payment is text")
    if len(text) > max_len:
        raise MalformedToken(f"the payment is longer than {max_len} characters")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise MalformedToken("the payment is not valid JSON") from None
    if not isinstance(obj, dict):
        raise MalformedToken("a payment is a JSON object with mint, unit and proofs")
    pid, memo = obj.get("id"), obj.get("memo")
    proofs = obj.get("proofs")
    if not isinstance(proofs, list) or not proofs:
        raise MalformedToken("a payment needs a non-empty list 'proofs'")
    if len(proofs) > max_proofs:
        raise MalformedToken(f"the payment holds more than {max_proofs} proofs")
    unit = _text(obj.get("unit"), "the payment's unit")
    if not unit:
        raise MalformedToken("the payment's unit is empty")
    parsed = tuple(_proof_from_json(p) for p in proofs)
    if sum(p.amount for p in parsed) > MAX_AMOUNT:
        raise MalformedToken("the payment's amounts add up to more than any real payment")
    return PaymentPayload(
        id=None if pid is None else _text(pid, "the payment's id"),
        memo=None if memo is None else (_text(memo, "the payment's memo") or None),
        mint=_mint_url(obj.get("mint")),
        unit=unit,
        proofs=parsed,
    )


def payload_to_token(p: PaymentPayload) -> Token:
    """The payment as a token, to go through the same checks as any other."""
    return Token(mint=p.mint, unit=p.unit, proofs=p.proofs, memo=p.memo)
