"""Lightning addresses (LUD-16) and LNURL-pay (LUD-06): an invoice for ``name@host``.

``name@host`` -> ``GET https://host/.well-known/lnurlp/name`` (a ``payRequest``) ->
``GET <callback>?amount=<msat>`` -> ``{"pr": "lnbc..."}``. The invoice is checked before
anyone pays it: its amount must be the one asked for, and a description hash, when it
has one, must be the hash of the metadata. Plain ``http://`` is accepted only for
127.0.0.1 and localhost (a test or a local service); everything else must be https.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp

from mint_client.errors import BadInvoice, WalletError
from mint_client.lightning import invoice_amount_msat, invoice_description_hash

_NAME = re.compile(r"[a-z0-9\-_.+]+")
_HOST = re.compile(r"[a-z0-9\-.]+(:[0-9]{1,5})?|\[[0-9a-f:]+\](:[0-9]{1,5})?")
#: the largest LNURL document read, bytes
MAX_BODY_BYTES = 64_000


class LnurlError(WalletError):
    """The Lightning address or its LNURL service did not give a usable invoice."""


def _local(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def address_url(address: str) -> str:
    """The LUD-16 well-known URL of ``name@host``; :class:`LnurlError` if it is no address."""
    name, _, host = address.strip().lower().partition("@")
    if not _NAME.fullmatch(name) or not _HOST.fullmatch(host):
        raise LnurlError(f"{address!r} is not a Lightning address (name@host)")
    scheme = "http" if _local(host) else "https"
    return f"{scheme}://{host}/.well-known/lnurlp/{name}"


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and _local(parts.netloc)):
        return url
    raise LnurlError(f"the LNURL service named an unsafe callback URL: {url[:100]}")


async def _get_json(session: aiohttp.ClientSession, url: str, timeout_s: float) -> Any:
    try:
        async with session.get(
            url, timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False
        ) as resp:
            body = await resp.content.read(MAX_BODY_BYTES + 1)
            status = resp.status
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise LnurlError(f"the LNURL service did not answer: {type(exc).__name__}") from exc
    if len(body) > MAX_BODY_BYTES:
        raise LnurlError("the LNURL service sent too much")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise LnurlError(f"the LNURL service sent no JSON (HTTP {status})") from exc
    if isinstance(data, dict) and str(data.get("status", "")).upper() == "ERROR":
        raise LnurlError(f"the LNURL service says: {str(data.get('reason'))[:200]}")
    if status != 200 or not isinstance(data, dict):
        raise LnurlError(f"the LNURL service answered HTTP {status}")
    return data


async def fetch_invoice(
    session: aiohttp.ClientSession,
    address: str,
    amount_msat: int,
    *,
    comment: str | None = None,
    timeout_s: float = 20.0,
) -> str:
    """A bolt11 invoice for exactly ``amount_msat`` from the Lightning address ``address``."""
    pay = await _get_json(session, address_url(address), timeout_s)
    if pay.get("tag") != "payRequest":
        raise LnurlError("the address does not serve an LNURL-pay request")
    callback, metadata = pay.get("callback"), pay.get("metadata")
    low, high = pay.get("minSendable"), pay.get("maxSendable")
    if not isinstance(callback, str) or not isinstance(metadata, str):
        raise LnurlError("the LNURL-pay request lacks its callback or metadata")
    if not isinstance(low, int) or not isinstance(high, int):
        raise LnurlError("the LNURL-pay request lacks its amount limits")
    if not low <= amount_msat <= high:
        raise LnurlError(f"the address takes {low}..{high} msat, not {amount_msat} msat")
    params: dict[str, str | int] = {"amount": amount_msat}
    allowed = pay.get("commentAllowed")
    if comment and isinstance(allowed, int) and allowed > 0:
        params["comment"] = comment[:allowed]
    url = _check_url(callback)
    url += ("&" if urlsplit(url).query else "?") + urlencode(params)
    answer = await _get_json(session, url, timeout_s)
    pr = answer.get("pr")
    if not isinstance(pr, str) or not pr:
        raise LnurlError("the LNURL service sent no invoice")
    try:
        got = invoice_amount_msat(pr)
        h = invoice_description_hash(pr)
    except BadInvoice as exc:
        raise LnurlError(f"the LNURL service sent a bad invoice: {exc.message}") from exc
    if got != amount_msat:
        raise LnurlError(f"the invoice is for {got} msat, not the {amount_msat} msat asked for")
    if h is not None and h != hashlib.sha256(metadata.encode("utf-8")).hexdigest():
        raise LnurlError("the invoice's description hash does not match the address's metadata")
    return pr
