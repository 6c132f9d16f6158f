"""Lightning at a trusted mint: NUT-04 mint quotes, NUT-05 melts, NUT-08 fee return, NUT-17.

The wire format only. Which outputs to send, what to record before a call and how to
resolve a lost answer is the wallet's business (:mod:`mint_client.lnwallet`). Every call
goes through a :class:`~mint_client.protocol.MintAPI` taken from the
:class:`~mint_client.protocol.MintRegistry`, so only allow-listed mints are ever dialled.
This module extends that API (same package, same session, same error mapping), which is
why it uses the API's request method directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import bolt11

from mint_client.crypto import BlindedOutput
from mint_client.errors import (
    BadInvoice,
    LightningFailed,
    MintError,
    QuoteExpired,
    QuoteNotPaid,
    QuoteUsed,
    UnknownQuote,
)
from mint_client.minting import ISSUED, PAID, UNPAID, MintQuote
from mint_client.protocol import BlindSignature, MintAPI, MintRejected, _signatures
from mint_client.tokens import Proof

log = logging.getLogger(__name__)

__all__ = [
    "ISSUED",
    "PAID",
    "PENDING",
    "UNPAID",
    "LightningAPI",
    "MeltQuote",
    "MintQuote",
    "blank_outputs",
    "invoice_amount_msat",
    "valid_quote_id",
]

#: NUT-05 melt quote state while the Lightning payment is in flight
PENDING = "PENDING"

#: NUT error codes of quotes (NUT-04/05 error tables)
CODE_QUOTE_NOT_PAID = 20001
CODE_QUOTE_ISSUED = 20002
CODE_LIGHTNING_FAILED = 20004

#: a quote id as a mint makes it (nutshell: a UUID; cdk: a UUID; others: hex or base64url)
_QUOTE_ID = re.compile(r"[A-Za-z0-9_\-]{8,128}")

#: how often a quote is polled when the mint offers no NUT-17 websocket (or it broke), s
DEFAULT_POLL_S = 2.0


def valid_quote_id(text: str) -> bool:
    """True for a string that can be a mint's quote id (checked before any mint is asked)."""
    return bool(_QUOTE_ID.fullmatch(text))


def invoice_amount_msat(request: str) -> int:
    """The amount of a bolt11 invoice in msat; :class:`BadInvoice` if it has none."""
    try:
        decoded = bolt11.decode(request.strip())
    except Exception as exc:  # the decoder raises several types for bad input
        raise BadInvoice(f"not a bolt11 invoice: {type(exc).__name__}") from None
    if decoded.amount_msat is None or int(decoded.amount_msat) <= 0:
        raise BadInvoice("the invoice has no amount; ask for one with an amount")
    return int(decoded.amount_msat)


def invoice_description_hash(request: str) -> str | None:
    """The ``h`` tag (description hash, hex) of a bolt11 invoice, if it has one."""
    decoded = bolt11.decode(request.strip())
    h = decoded.description_hash
    return str(h) if h else None


def blank_outputs(fee_reserve_sat: int) -> int:
    """NUT-08: how many blank outputs let the mint return any overpaid fee up to the reserve."""
    if fee_reserve_sat <= 0:
        return 0
    return max(math.ceil(math.log2(fee_reserve_sat)), 1)


@dataclass(frozen=True, slots=True)
class MeltQuote:
    """A NUT-05 melt quote: pay ``request`` for ``amount`` + at most ``fee_reserve``."""

    quote: str
    amount: int
    fee_reserve: int
    unit: str
    state: str
    expiry: int | None
    request: str | None = None
    preimage: str | None = None
    #: NUT-08 fee return: the mint's signatures on our blank outputs, in their order
    change: tuple[BlindSignature, ...] = ()

    def expired(self, now: float | None = None) -> bool:
        """True once the quote's expiry has passed (a melt would be refused)."""
        return self.expiry is not None and self.expiry <= (now or time.time())


def _state(data: dict[str, Any]) -> str:
    state = data.get("state")
    if isinstance(state, str):
        return state.upper()
    # before NUT-04/05 had "state", mints said "paid": bool
    return PAID if data.get("paid") else UNPAID


def _mint_quote(data: Any, unit: str) -> MintQuote:
    if not isinstance(data, dict) or not isinstance(data.get("quote"), str):
        raise MintError("mint sent a malformed mint quote")
    expiry = data.get("expiry")
    amount = data.get("amount")
    if not isinstance(amount, int) or amount <= 0:
        raise MintError("mint quote without an amount")
    return MintQuote(
        quote=data["quote"],
        request=str(data.get("request") or ""),
        amount=amount,
        unit=str(data.get("unit") or unit),
        state=_state(data),
        expiry=expiry if isinstance(expiry, int) else None,
    )


def _melt_quote(data: Any, unit: str) -> MeltQuote:
    if not isinstance(data, dict) or not isinstance(data.get("quote"), str):
        raise MintError("mint sent a malformed melt quote")
    amount, reserve = data.get("amount"), data.get("fee_reserve")
    if not isinstance(amount, int) or not isinstance(reserve, int) or amount <= 0 or reserve < 0:
        raise MintError("mint sent a melt quote without amount or fee reserve")
    expiry = data.get("expiry")
    raw_change = data.get("change") or []
    return MeltQuote(
        quote=data["quote"],
        amount=amount,
        fee_reserve=reserve,
        unit=str(data.get("unit") or unit),
        state=_state(data),
        expiry=expiry if isinstance(expiry, int) else None,
        request=data.get("request") if isinstance(data.get("request"), str) else None,
        preimage=data.get("payment_preimage") or None,
        change=tuple(_signatures(raw_change, None)),
    )


def _detail(exc: MintRejected) -> str:
    return exc.message.removeprefix("the mint rejected the token: ")


class LightningAPI:
    """NUT-04/05/17 calls at one trusted mint, on the registry's session."""

    def __init__(self, api: MintAPI) -> None:
        self.api = api

    @property
    def url(self) -> str:
        """The mint's normalized URL."""
        return self.api.url

    # -- NUT-04: a Lightning invoice in, ecash out ------------------------------------

    async def mint_quote(
        self, amount_sat: int, unit: str, description: str | None = None
    ) -> MintQuote:
        """``POST /v1/mint/quote/bolt11``: an invoice for ``amount_sat`` to be paid to the mint."""
        if amount_sat <= 0:
            raise ValueError("amount must be positive")
        body: dict[str, Any] = {"amount": amount_sat, "unit": unit}
        if description:
            body["description"] = description
        try:
            data = await self.api._call("POST", "/v1/mint/quote/bolt11", body)
        except MintRejected as exc:
            # a mint without a description-capable backend refuses the description
            if description is None:
                raise MintError(f"the mint refused an invoice: {_detail(exc)}") from exc
            return await self.mint_quote(amount_sat, unit)
        quote = _mint_quote(data, unit)
        if quote.amount != amount_sat or quote.unit != unit or not quote.request:
            raise MintError("the mint's quote is not for the amount and unit asked")
        return quote

    async def mint_quote_state(self, quote_id: str, unit: str) -> MintQuote:
        """``GET /v1/mint/quote/bolt11/{id}``; :class:`UnknownQuote` if the mint has none."""
        try:
            data = await self.api._call("GET", f"/v1/mint/quote/bolt11/{quote_id}")
        except MintRejected as exc:
            if "not found" in _detail(exc).lower() or exc.mint_code in (0, None):
                raise UnknownQuote(f"the mint knows no quote {quote_id[:64]}") from exc
            raise MintError(f"the mint refused the quote: {_detail(exc)}") from exc
        return _mint_quote(data, unit)

    async def mint(self, quote_id: str, outputs: Sequence[BlindedOutput]) -> list[BlindSignature]:
        """``POST /v1/mint/bolt11``: the mint signs ``outputs`` (summing to the quote's amount)."""
        try:
            data = await self.api._call(
                "POST",
                "/v1/mint/bolt11",
                {"quote": quote_id, "outputs": [o.to_mint_json() for o in outputs]},
            )
        except MintRejected as exc:
            detail = _detail(exc)
            low = detail.lower()
            if exc.mint_code == CODE_QUOTE_NOT_PAID or "not paid" in low:
                raise QuoteNotPaid("the invoice is not paid yet") from exc
            if exc.mint_code == CODE_QUOTE_ISSUED or "already issued" in low:
                raise QuoteUsed("the invoice's ecash was already issued") from exc
            if "expired" in low:
                raise QuoteExpired("the invoice's quote expired at the mint") from exc
            if "pending" in low:
                raise MintError(f"the quote is being minted right now: {detail}") from exc
            if "not found" in low:
                raise UnknownQuote(f"the mint knows no quote {quote_id[:64]}") from exc
            raise MintError(f"the mint refused to mint: {detail}") from exc
        return _signatures(data["signatures"], len(outputs))

    # -- NUT-05: ecash in, a Lightning payment out --------------------------------------

    async def melt_quote(self, request: str, unit: str) -> MeltQuote:
        """``POST /v1/melt/quote/bolt11``: what paying ``request`` costs (amount + fee reserve)."""
        try:
            data = await self.api._call(
                "POST", "/v1/melt/quote/bolt11", {"request": request, "unit": unit}
            )
        except MintRejected as exc:
            raise BadInvoice(f"the mint won't pay this invoice: {_detail(exc)}") from exc
        return _melt_quote(data, unit)

    async def melt_quote_state(self, quote_id: str, unit: str) -> MeltQuote:
        """``GET /v1/melt/quote/bolt11/{id}``: UNPAID, PENDING or PAID (with NUT-08 change)."""
        try:
            data = await self.api._call("GET", f"/v1/melt/quote/bolt11/{quote_id}")
        except MintRejected as exc:
            raise MintError(f"the mint refused the melt quote: {_detail(exc)}") from exc
        return _melt_quote(data, unit)

    async def melt(
        self, quote_id: str, inputs: Sequence[Proof], outputs: Sequence[BlindedOutput], unit: str
    ) -> MeltQuote:
        """``POST /v1/melt/bolt11``: spend ``inputs`` to pay the quote's invoice.

        ``outputs`` are NUT-08 blanks (amount 1 on the wire; the mint sets the amounts of
        those it signs for the overpaid fee). :class:`LightningFailed` when the mint says
        the payment failed (inputs unspent); any other refusal is a :class:`MintRejected`
        whose ``mint_code`` tells why.
        """
        body = {
            "quote": quote_id,
            "inputs": [p.to_mint_json() for p in inputs],
            "outputs": [{"amount": 1, "id": o.keyset_id, "B_": o.B_} for o in outputs],
        }
        try:
            data = await self.api._call("POST", "/v1/melt/bolt11", body)
        except MintRejected as exc:
            if exc.mint_code == CODE_LIGHTNING_FAILED or "payment failed" in exc.message.lower():
                raise LightningFailed(f"the Lightning payment failed: {_detail(exc)}") from exc
            raise
        return _melt_quote(data, unit)

    # -- NUT-17: wait for a quote to be paid --------------------------------------------

    async def supports_ws(self, kind: str = "bolt11_mint_quote") -> bool:
        """True when ``GET /v1/info`` lists NUT-17 with ``kind`` for bolt11 in our unit."""
        try:
            info = await self.api._call("GET", "/v1/info")
        except MintError:
            return False
        nut17 = (info.get("nuts") or {}).get("17") if isinstance(info, dict) else None
        if not isinstance(nut17, dict):
            return False
        return any(
            isinstance(s, dict) and kind in (s.get("commands") or [])
            for s in nut17.get("supported") or []
        )

    async def wait_mint_quote(
        self, quote_id: str, unit: str, *, deadline: float, poll_s: float = DEFAULT_POLL_S
    ) -> MintQuote | None:
        """Wait until the quote is no longer UNPAID; None at ``deadline`` (epoch s).

        Listens on the mint's NUT-17 websocket when it has one, and polls as well (every
        ``poll_s`` without a websocket, less often with one), so a lost notification or
        a broken socket costs at most one poll interval.
        """
        if await self.supports_ws():
            with contextlib.suppress(
                aiohttp.ClientError, OSError, TimeoutError, ValueError, MintError
            ):
                return await self._wait_ws(quote_id, unit, deadline=deadline, poll_s=poll_s)
        return await self._wait_poll(quote_id, unit, deadline=deadline, poll_s=poll_s)

    async def _wait_poll(
        self, quote_id: str, unit: str, *, deadline: float, poll_s: float
    ) -> MintQuote | None:
        while True:
            try:
                quote = await self.mint_quote_state(quote_id, unit)
                if quote.state != UNPAID:
                    return quote
            except MintError as exc:
                log.info("quote %s: state check failed (%s)", quote_id[:12], exc.message)
            left = deadline - time.time()
            if left <= 0:
                return None
            await asyncio.sleep(min(poll_s, left))

    async def _wait_ws(
        self, quote_id: str, unit: str, *, deadline: float, poll_s: float
    ) -> MintQuote | None:
        ws_url = "ws" + self.url.removeprefix("http") + "/v1/ws"
        session = self.api._session
        sub_id = uuid.uuid4().hex
        async with session.ws_connect(ws_url, heartbeat=30) as ws:
            await ws.send_str(
                json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": 0,
                        "method": "subscribe",
                        "params": {
                            "kind": "bolt11_mint_quote",
                            "subId": sub_id,
                            "filters": [quote_id],
                        },
                    }
                )
            )
            # a check after subscribing: a payment made before is not notified
            quote = await self.mint_quote_state(quote_id, unit)
            while quote.state == UNPAID:
                left = deadline - time.time()
                if left <= 0:
                    return None
                try:
                    msg = await ws.receive(timeout=min(left, max(poll_s * 5, 10.0)))
                except TimeoutError:
                    quote = await self.mint_quote_state(quote_id, unit)
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise ValueError(f"websocket closed ({msg.type.name})")
                data = json.loads(msg.data)
                params = data.get("params") if isinstance(data, dict) else None
                if isinstance(params, dict) and params.get("subId") == sub_id:
                    payload = params.get("payload")
                    if isinstance(payload, dict) and payload.get("quote") == quote_id:
                        # the notification may omit fields: take the state, ask for the rest
                        if _state(payload) != UNPAID:
                            quote = await self.mint_quote_state(quote_id, unit)
            return quote
