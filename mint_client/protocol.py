"""The mint's HTTP API (NUT-01/02/03/07/09), spoken on one persistent aiohttp session.

Only this module talks to mints, and it refuses any URL that is not on the allow-list
it was built with: a token names its own mint, so a URL taken from a token must never
be dialled unchecked (SSRF).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from mint_client.crypto import BlindedOutput
from mint_client.errors import (
    MintBusy,
    MintError,
    MintUnavailable,
    PaymentError,
    TokenError,
    TokenSpent,
    UntrustedMint,
)
from mint_client.tokens import Proof, normalize_mint_url

log = logging.getLogger(__name__)

#: NUT error codes we act on
CODE_TOKEN_SPENT = 11001
CODE_OUTPUTS_ALREADY_SIGNED = 10002


#: items per NUT-07/NUT-09 request: nutshell refuses more than 1000
MAX_BATCH = 500


class MintRejected(TokenError):
    """The mint refused the token's proofs (invalid, unknown keyset, ...). Nothing spent."""

    code = "token_rejected"

    def __init__(self, message: str, mint_code: int | None = None) -> None:
        super().__init__(message)
        #: the mint's NUT error code (e.g. 20001 quote not paid), when it sent one
        self.mint_code = mint_code


@dataclass(frozen=True, slots=True)
class Keyset:
    """A keyset as ``GET /v1/keysets`` lists it."""

    id: str
    unit: str
    active: bool
    input_fee_ppk: int


@dataclass(frozen=True, slots=True)
class BlindSignature:
    """A mint's signature on one of our outputs, with its DLEQ when the mint sent one."""

    amount: int
    keyset_id: str
    C_: str
    dleq: tuple[str, str] | None


@dataclass(frozen=True, slots=True)
class MintCall:
    """One finished call to a mint, as reported to a :data:`MintObserver`."""

    mint: str
    #: what was asked, without ids: ``keysets``, ``keys``, ``swap``, ``checkstate``,
    #: ``restore``, ``mint/quote/bolt11``, ...
    op: str
    duration_s: float
    #: None when the mint answered with success
    error: Exception | None

    @property
    def healthy(self) -> bool:
        """The mint answered as a working mint does (a refused token counts as working)."""
        return self.error is None or isinstance(self.error, TokenError | TokenSpent | MintBusy)

    @property
    def error_code(self) -> str | None:
        """The error's stable code (``mint_unavailable``, ``token_spent``...), or None."""
        if self.error is None:
            return None
        return self.error.code if isinstance(self.error, PaymentError) else "unexpected"


#: told about every finished mint call (metrics, health); must not raise or block
MintObserver = Callable[[MintCall], None]


def _op_of(path: str) -> str:
    parts = path.removeprefix("/v1/").split("/")
    if len(parts) >= 3 and parts[1] == "quote":
        return "/".join(parts[:3])  # mint/quote/bolt11, melt/quote/bolt11 (ids dropped)
    return parts[0]  # keysets, keys (keyset id dropped), swap, checkstate, restore, mint


class MintAPI:
    """The API of one trusted mint. Cheap to create; share the session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        timeout_s: float,
        observer: MintObserver | None = None,
    ) -> None:
        self.url = normalize_mint_url(url)
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._observer = observer

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        """One request, timed and reported to the observer (if any)."""
        if self._observer is None:
            return await self._request(method, path, body)
        started = time.monotonic()
        try:
            data = await self._request(method, path, body)
        except Exception as exc:
            self._report(path, started, exc)
            raise
        self._report(path, started, None)
        return data

    def _report(self, path: str, started: float, error: Exception | None) -> None:
        assert self._observer is not None
        call = MintCall(self.url, _op_of(path), time.monotonic() - started, error)
        try:
            self._observer(call)
        except Exception:  # an observer's bug must never fail a mint call (money moved)
            log.exception("mint call observer failed")

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with self._session.request(
                method, self.url + path, json=body, timeout=self._timeout
            ) as resp:
                try:
                    data = await resp.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError) as exc:
                    raise MintError(f"mint sent a non-JSON answer (HTTP {resp.status})") from exc
                if resp.status >= 400:
                    _raise_for_mint_error(resp.status, data)
                return data
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            raise MintUnavailable(f"mint {self.url} unreachable: {type(exc).__name__}") from exc

    async def keysets(self) -> list[Keyset]:
        """All keysets of the mint (NUT-02)."""
        data = await self._call("GET", "/v1/keysets")
        return [
            Keyset(
                id=str(k["id"]),
                unit=str(k.get("unit", "sat")),
                active=bool(k.get("active", True)),
                input_fee_ppk=int(k.get("input_fee_ppk", 0) or 0),
            )
            for k in data["keysets"]
        ]

    async def keys(self, keyset_id: str) -> dict[int, str]:
        """The public keys of one keyset, amount -> compressed hex (NUT-01)."""
        data = await self._call("GET", f"/v1/keys/{keyset_id}")
        for ks in data["keysets"]:
            if ks["id"] == keyset_id:
                return {int(a): str(k) for a, k in ks["keys"].items()}
        raise MintError(f"mint did not return keyset {keyset_id}")

    async def swap(
        self, inputs: Sequence[Proof], outputs: Sequence[BlindedOutput]
    ) -> list[BlindSignature]:
        """NUT-03 swap: the mint spends ``inputs`` and signs ``outputs``, atomically."""
        data = await self._call(
            "POST",
            "/v1/swap",
            {
                "inputs": [p.to_mint_json() for p in inputs],
                "outputs": [o.to_mint_json() for o in outputs],
            },
        )
        return _signatures(data["signatures"], len(outputs))

    async def check_state(self, ys: Iterable[str]) -> dict[str, str]:
        """NUT-07: Y -> "UNSPENT" | "PENDING" | "SPENT" (in batches the mint accepts)."""
        all_ys = list(ys)
        states: dict[str, str] = {}
        for i in range(0, len(all_ys), MAX_BATCH):
            data = await self._call("POST", "/v1/checkstate", {"Ys": all_ys[i : i + MAX_BATCH]})
            states.update({str(s["Y"]): str(s["state"]) for s in data["states"]})
        return states

    async def restore(
        self, outputs: Sequence[BlindedOutput]
    ) -> list[tuple[BlindedOutput, BlindSignature]]:
        """NUT-09: the signatures the mint already made on any of ``outputs``."""
        by_b = {o.B_: o for o in outputs}
        found: list[tuple[BlindedOutput, BlindSignature]] = []
        for i in range(0, len(outputs), MAX_BATCH):
            batch = outputs[i : i + MAX_BATCH]
            data = await self._call(
                "POST", "/v1/restore", {"outputs": [o.to_mint_json() for o in batch]}
            )
            sigs = _signatures(data.get("signatures", []), None)
            for out, sig in zip(data.get("outputs", []), sigs, strict=True):
                o = by_b.get(str(out["B_"]))
                if o is not None:
                    found.append((o, sig))
        return found


def _signatures(raw: Any, expected: int | None) -> list[BlindSignature]:
    sigs = [
        BlindSignature(
            amount=int(s["amount"]),
            keyset_id=str(s["id"]),
            C_=str(s["C_"]),
            dleq=(str(s["dleq"]["e"]), str(s["dleq"]["s"])) if s.get("dleq") else None,
        )
        for s in raw
    ]
    if expected is not None and len(sigs) != expected:
        raise MintError(f"mint returned {len(sigs)} signatures for {expected} outputs")
    return sigs


#: nutshell's words when its database lock timed out: nothing was done, try again
_TRANSIENT = re.compile(r"failed to acquire database lock|database is locked", re.IGNORECASE)


def _raise_for_mint_error(status: int, data: Any) -> None:
    detail = str(data.get("detail", data)) if isinstance(data, dict) else str(data)
    code = data.get("code") if isinstance(data, dict) else None
    code = code if isinstance(code, int) else None
    if code == CODE_TOKEN_SPENT or "already spent" in detail.lower():
        raise TokenSpent("this token was already spent")
    if status >= 500:
        raise MintUnavailable(f"mint error (HTTP {status}): {detail[:200]}")
    if _TRANSIENT.search(detail):
        raise MintBusy(f"the mint is busy: {detail[:200]}", mint_code=code)
    if status in (400, 422):
        raise MintRejected(f"the mint rejected the token: {detail[:200]}", mint_code=code)
    raise MintError(f"mint error (HTTP {status}): {detail[:200]}", mint_code=code)


class MintRegistry:
    """The allow-listed mints, each with cached keysets and keys. The SSRF gate."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        mint_urls: Iterable[str],
        *,
        timeout_s: float,
        observer: MintObserver | None = None,
    ) -> None:
        self._apis = {
            normalize_mint_url(u): MintAPI(session, u, timeout_s=timeout_s, observer=observer)
            for u in mint_urls
        }
        self._keysets: dict[str, list[Keyset]] = {}
        self._keys: dict[tuple[str, str], dict[int, str]] = {}
        self._lock = asyncio.Lock()

    @property
    def urls(self) -> list[str]:
        """The trusted mint URLs, normalized, in config order."""
        return list(self._apis)

    def api(self, mint_url: str) -> MintAPI:
        """The API of a trusted mint; :class:`UntrustedMint` for anything else."""
        api = self._apis.get(normalize_mint_url(mint_url))
        if api is None:
            raise UntrustedMint(
                f"mint {mint_url[:200]} is not accepted here; accepted: {', '.join(self._apis)}"
            )
        return api

    def check_trusted(self, mint_url: str) -> str:
        """Normalize ``mint_url`` and refuse it unless it is on the allow-list."""
        return self.api(mint_url).url

    async def keysets(self, mint_url: str, *, refresh: bool = False) -> list[Keyset]:
        """Keysets of a trusted mint, cached; ``refresh`` re-reads them (new keyset seen)."""
        api = self.api(mint_url)
        if refresh or api.url not in self._keysets:
            async with self._lock:
                if refresh or api.url not in self._keysets:
                    self._keysets[api.url] = await api.keysets()
        return self._keysets[api.url]

    async def keys(self, mint_url: str, keyset_id: str) -> dict[int, str]:
        """Public keys of one keyset of a trusted mint, cached (keys never change)."""
        api = self.api(mint_url)
        cached = self._keys.get((api.url, keyset_id))
        if cached is None:
            cached = await api.keys(keyset_id)
            self._keys[(api.url, keyset_id)] = cached
        return cached

    async def active_keyset(self, mint_url: str, unit: str) -> Keyset:
        """The keyset new outputs go to: active, of ``unit``, lowest fee first."""
        for refresh in (False, True):
            active = [
                k
                for k in await self.keysets(mint_url, refresh=refresh)
                if k.active and k.unit == unit
            ]
            if active:
                return min(active, key=lambda k: k.input_fee_ppk)
        raise MintError(f"mint {mint_url} has no active keyset for unit {unit}")
