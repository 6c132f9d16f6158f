"""New ecash from a mint (NUT-04): quote an invoice, wait until it is paid, mint proofs.

This is the user's side, not the bot's wallet: ``ecashbot dev`` uses it as a faucet at
its FakeWallet mint (whose invoices count as paid) to hand out funded test tokens. The
secrets are random, not derived from a seed, since nobody needs to restore them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from mint_client.crypto import BlindedOutput, blind, split_amount, unblind, verify_signature_dleq
from mint_client.errors import InvalidDLEQ, MintError
from mint_client.protocol import BlindSignature, Keyset, MintAPI, _signatures
from mint_client.tokens import Proof, Token, encode_token

#: NUT-04 quote states
UNPAID = "UNPAID"
PAID = "PAID"
ISSUED = "ISSUED"

# secp256k1's group order: a blinding factor must be a non-zero scalar below it
_CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@dataclass(frozen=True, slots=True)
class MintQuote:
    """A NUT-04 mint quote: pay ``request`` (a bolt11 invoice), then mint ``amount``."""

    quote: str
    request: str
    amount: int
    unit: str
    state: str
    expiry: int | None


class MintingAPI(MintAPI):
    """A mint's API plus the NUT-04 calls that make new ecash (bolt11)."""

    async def mint_quote(self, amount: int, unit: str = "sat") -> MintQuote:
        """``POST /v1/mint/quote/bolt11``: an invoice for ``amount`` ``unit``."""
        if amount <= 0:
            raise ValueError("amount must be positive")
        data = await self._call("POST", "/v1/mint/quote/bolt11", {"amount": amount, "unit": unit})
        return _quote(data, amount, unit)

    async def mint_quote_state(self, quote: MintQuote) -> MintQuote:
        """``GET /v1/mint/quote/bolt11/{id}``: the quote as the mint sees it now."""
        data = await self._call("GET", f"/v1/mint/quote/bolt11/{quote.quote}")
        return _quote(data, quote.amount, quote.unit)

    async def mint(self, quote: MintQuote, outputs: list[BlindedOutput]) -> list[BlindSignature]:
        """``POST /v1/mint/bolt11``: the mint signs ``outputs`` for a paid quote."""
        data = await self._call(
            "POST",
            "/v1/mint/bolt11",
            {"quote": quote.quote, "outputs": [o.to_mint_json() for o in outputs]},
        )
        return _signatures(data["signatures"], len(outputs))


def _quote(data: Any, amount: int, unit: str) -> MintQuote:
    if not isinstance(data, dict) or "quote" not in data:
        raise MintError("mint sent a malformed mint quote")
    state = data.get("state")
    if not isinstance(state, str):  # before NUT-04's "state", mints said "paid": bool
        state = PAID if data.get("paid") else UNPAID
    expiry = data.get("expiry")
    return MintQuote(
        quote=str(data["quote"]),
        request=str(data.get("request", "")),
        amount=int(data.get("amount") or amount),
        unit=str(data.get("unit") or unit),
        state=state.upper(),
        expiry=int(expiry) if isinstance(expiry, int) else None,
    )


def _random_r() -> bytes:
    while True:
        r = secrets.token_bytes(32)
        if 0 < int.from_bytes(r, "big") < _CURVE_ORDER:
            return r


async def wait_paid(
    api: MintingAPI, quote: MintQuote, *, within_s: float, poll_s: float = 0.2
) -> MintQuote:
    """Poll the quote until its invoice is paid; :class:`MintError` after ``within_s``."""
    deadline = time.monotonic() + within_s
    while quote.state == UNPAID:
        if time.monotonic() > deadline:
            raise MintError(f"the invoice of mint quote {quote.quote} was not paid in {within_s} s")
        await asyncio.sleep(poll_s)
        quote = await api.mint_quote_state(quote)
    if quote.state != PAID:
        raise MintError(f"mint quote {quote.quote} is {quote.state}, not PAID")
    return quote


async def mint_proofs(api: MintingAPI, quote: MintQuote, keyset: Keyset) -> list[Proof]:
    """Mint a paid quote into proofs of ``keyset`` (powers of two), checking each DLEQ."""
    keys = await api.keys(keyset.id)
    outputs: list[BlindedOutput] = []
    for amount in split_amount(quote.amount):
        if amount not in keys:
            raise MintError(f"keyset {keyset.id} has no key for amount {amount}")
        outputs.append(blind(secrets.token_hex(32), _random_r(), amount, keyset.id, None))
    proofs: list[Proof] = []
    for out, sig in zip(outputs, await api.mint(quote, outputs), strict=True):
        if sig.amount != out.amount:
            raise MintError(f"mint signed {sig.amount} for an output of {out.amount}")
        A = keys[out.amount]
        if sig.dleq is not None and not verify_signature_dleq(out, sig.C_, *sig.dleq, A):
            raise InvalidDLEQ("the mint's DLEQ on a new proof does not verify")
        proofs.append(unblind(out, sig.C_, A, sig.dleq))
    return proofs


async def active_keyset(api: MintAPI, unit: str) -> Keyset:
    """The mint's active keyset of ``unit`` with the lowest input fee."""
    active = [k for k in await api.keysets() if k.active and k.unit == unit]
    if not active:
        raise MintError(f"mint {api.url} has no active keyset for unit {unit}")
    return min(active, key=lambda k: k.input_fee_ppk)


async def mint_token(
    session: aiohttp.ClientSession,
    mint_url: str,
    amount: int,
    *,
    unit: str = "sat",
    memo: str | None = None,
    timeout_s: float = 20.0,
    wait_paid_s: float = 60.0,
) -> str:
    """Mint ``amount`` ``unit`` as a ``cashuB`` token, once the mint's invoice is paid.

    For a FakeWallet mint (``ecashbot dev``, tests) the invoice pays itself; for a real
    mint someone must pay ``MintQuote.request`` within ``wait_paid_s``.
    """
    api = MintingAPI(session, mint_url, timeout_s=timeout_s)
    keyset = await active_keyset(api, unit)
    quote = await wait_paid(api, await api.mint_quote(amount, unit), within_s=wait_paid_s)
    proofs = await mint_proofs(api, quote, keyset)
    return encode_token(Token(mint=api.url, unit=unit, proofs=tuple(proofs), memo=memo))
