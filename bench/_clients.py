"""The load generators: a paid chat request through the bot, the same question sent
straight to the emulator with google-genai, a minimal raw ``/v1/swap`` client, and the
wallet side of tokens locked to the bot (NUT-11 P2PK, with NUT-12 DLEQ)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
from google import genai
from google.genai import types

from mint_client import crypto
from mint_client.errors import MintBusy
from mint_client.minting import MintingAPI, wait_paid
from mint_client.protocol import MintAPI
from mint_client.tokens import Proof, Token, encode_token, expand_keyset_ids, parse_token

MODEL = "gemini-2.5-flash"
T = TypeVar("T")


@dataclass
class Reply:
    """One paid request as the client saw it."""

    status: int
    ttft_s: float | None  # streaming: first content delta; non-streaming: whole answer
    total_s: float
    change: bool  # the answer carried change (header or final SSE chunk)
    change_bytes: int = 0  # length of the change token (the X-Cashu header, non-streaming)


async def ask_bot(
    session: aiohttp.ClientSession, url: str, question: str, token: str, *, stream: bool
) -> Reply:
    """POST /v1/chat/completions with ``X-Cashu``; read the answer to its end."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "stream": stream}
    started = time.perf_counter()
    ttft: float | None = None
    change = False
    size = 0
    async with session.post(
        f"{url}/v1/chat/completions", json=body, headers={"X-Cashu": token}
    ) as resp:
        if not stream or resp.status != 200:
            data = await resp.read()
            elapsed = time.perf_counter() - started
            header = resp.headers.get("X-Cashu", "")
            change = bool(header) or b"cashuB" in data
            return Reply(resp.status, elapsed, elapsed, change, len(header))
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - started
            if "payment" in chunk:
                token = chunk["payment"].get("change") or chunk["payment"].get("change_token")
                change = bool(token or chunk["payment"])
                size = len(token) if isinstance(token, str) else 0
        return Reply(resp.status, ttft, time.perf_counter() - started, change, size)


def sdk_client(emulator_url: str) -> genai.Client:
    """google-genai pointed at the emulator, as the bot's own client is."""
    return genai.Client(
        api_key="bench-key",
        http_options=types.HttpOptions(base_url=emulator_url, api_version="v1beta"),
    )


async def ask_direct(client: genai.Client, question: str) -> float:
    """Stream the question straight from the emulator; seconds to the first text."""
    started = time.perf_counter()
    ttft: float | None = None
    stream = await client.aio.models.generate_content_stream(model=MODEL, contents=question)
    async for chunk in stream:
        if ttft is None and chunk.text:
            ttft = time.perf_counter() - started
    if ttft is None:
        raise RuntimeError("the emulator sent no text")
    return ttft


#: a busy mint (nutshell's SQLite lock) is asked again as the bot does it: 0.25 s, 0.5 s, ...
BUSY_ATTEMPTS = 5
BUSY_BASE_S = 0.25


async def busy_retry(call: Callable[[], Awaitable[T]], retried: list[int]) -> T:
    """``call()``, repeated while the mint says it is busy (nothing was done then); each
    repeat is counted in ``retried[0]``."""
    for attempt in range(BUSY_ATTEMPTS):
        try:
            return await call()
        except MintBusy:
            if attempt + 1 == BUSY_ATTEMPTS:
                raise
            retried[0] += 1
            await asyncio.sleep(BUSY_BASE_S * 2**attempt)
    raise AssertionError("unreachable")


class Minter:
    """Fresh funded tokens, fast: NUT-04 mint quotes at a FakeWallet mint (whose invoices
    count as paid), outputs already split into the tokens' denominations, one quote per
    up to ``per_request`` outputs, all quotes at once. No wallet database, no swap, no fee;
    the proofs keep the mint's DLEQ (a receiver checks it, as the bot does)."""

    def __init__(self, session: aiohttp.ClientSession, mint_url: str, per_request: int = 500):
        self.api = MintingAPI(session, mint_url, timeout_s=120)
        self.mint_url = mint_url
        self.per_request = per_request
        self._active = ""
        self._keys: dict[int, str] = {}

    async def _chunk(self, amount: int, k: int) -> list[str]:
        per_token = crypto.split_amount(amount)
        quote = await wait_paid(self.api, await self.api.mint_quote(amount * k), within_s=60)
        outputs = [
            crypto.blind(secrets.token_hex(32), secrets.token_bytes(32), a, self._active, None)
            for _ in range(k)
            for a in per_token
        ]
        sigs = await busy_retry(lambda: self.api.mint(quote, outputs), [0])
        proofs = [
            crypto.unblind(o, s.C_, self._keys[s.amount], s.dleq)
            for o, s in zip(outputs, sigs, strict=True)
        ]
        size = len(per_token)
        return [
            encode_token(Token(mint=self.mint_url, unit="sat", proofs=tuple(proofs[i : i + size])))
            for i in range(0, len(proofs), size)
        ]

    async def tokens(self, amount: int, n: int) -> list[str]:
        """``n`` distinct tokens of exactly ``amount`` sat each."""
        if not self._active:
            keysets = await self.api.keysets()
            self._active = next(k.id for k in keysets if k.active and k.unit == "sat")
            self._keys = await self.api.keys(self._active)
        per = max(1, self.per_request // len(crypto.split_amount(amount)))
        sizes = [min(per, n - i) for i in range(0, n, per)]
        chunks = await asyncio.gather(*(self._chunk(amount, k) for k in sizes))
        return [t for chunk in chunks for t in chunk]


class RawSwapper:
    """The least a wallet does to redeem a token: parse, blind, ``POST /v1/swap``, unblind.

    Outputs are split as the bot splits a payment (``change_friendly_split``), so the mint
    signs as many outputs for this client as for the bot.
    """

    def __init__(self, session: aiohttp.ClientSession, mint_url: str) -> None:
        self.api = MintAPI(session, mint_url, timeout_s=60)
        self.keyset_ids: list[str] = []
        self.active = ""
        self.keys: dict[int, str] = {}
        #: swaps asked again because the mint was busy (the time counts in the rate)
        self.retried = [0]

    async def load(self) -> None:
        """Fetch the mint's keysets and the active keyset's keys once."""
        keysets = await self.api.keysets()
        self.keyset_ids = [k.id for k in keysets]
        self.active = next(k.id for k in keysets if k.active and k.unit == "sat")
        self.keys = await self.api.keys(self.active)

    async def swap(self, token_text: str) -> float:
        """Redeem one token; seconds taken."""
        started = time.perf_counter()
        token = expand_keyset_ids(parse_token(token_text), self.keyset_ids)
        outputs = [
            crypto.blind(secrets.token_hex(32), secrets.token_bytes(32), a, self.active, None)
            for a in crypto.change_friendly_split(token.amount)
        ]
        sigs = await busy_retry(lambda: self.api.swap(token.proofs, outputs), self.retried)
        for out, sig in zip(outputs, sigs, strict=True):
            crypto.unblind(out, sig.C_, self.keys[sig.amount], sig.dleq)
        return time.perf_counter() - started


def p2pk_secret(pubkey: str) -> str:
    """A fresh NUT-10 secret locking a proof to ``pubkey`` (NUT-11, one signature, inputs).

    Serialised as nutshell's wallet does (``json.dumps`` with its default separators).
    """
    body = {"nonce": secrets.token_hex(16), "data": pubkey, "tags": [["sigflag", "SIG_INPUTS"]]}
    return json.dumps(["P2PK", body])


class Locker:
    """What a wallet does to pay with a token locked to the bot: swap its own proofs at the
    mint into outputs whose secrets are P2PK locks to the bot's key, and hand them over
    with the mint's DLEQ proofs (NUT-12), so the bot can check them with no mint call.

    Many tokens are made per swap (``batch`` inputs); each output keeps its input's amount,
    so a token of one proof becomes a locked token of one proof of the same value.
    """

    def __init__(self, swapper: RawSwapper, pubkey: str, batch: int = 100) -> None:
        self.swapper = swapper
        self.pubkey = pubkey
        self.batch = batch

    async def lock(self, tokens: list[str]) -> list[str]:
        """The ``tokens`` (ordinary, one mint) swapped into tokens locked to ``pubkey``."""
        parsed = [expand_keyset_ids(parse_token(t), self.swapper.keyset_ids) for t in tokens]
        out: list[str] = []
        for i in range(0, len(parsed), self.batch):
            out += await self._lock(parsed[i : i + self.batch])
        return out

    async def _lock(self, chunk: list[Token]) -> list[str]:
        sw = self.swapper
        inputs = [p for t in chunk for p in t.proofs]
        outputs = [
            crypto.blind(
                p2pk_secret(self.pubkey), secrets.token_bytes(32), p.amount, sw.active, None
            )
            for p in inputs
        ]
        sigs = await busy_retry(lambda: sw.api.swap(inputs, outputs), [0])
        proofs: list[Proof] = []
        for o, sig in zip(outputs, sigs, strict=True):
            if sig.dleq is None:
                raise RuntimeError("the mint sent no DLEQ: a locked token needs one")
            proofs.append(crypto.unblind(o, sig.C_, sw.keys[sig.amount], sig.dleq))
        out: list[str] = []
        k = 0
        for t in chunk:
            mine = tuple(proofs[k : k + len(t.proofs)])
            k += len(t.proofs)
            out.append(encode_token(Token(mint=t.mint, unit=t.unit, proofs=mine)))
        return out


async def scrape(session: aiohttp.ClientSession, url: str, token: str) -> dict[str, float]:
    """The bot's ``/metrics`` (Prometheus text): ``name{labels}`` -> value."""
    async with session.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET /metrics: HTTP {resp.status}")
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric_sum(metrics: dict[str, float], name: str, *labels: str) -> float:
    """The sum of ``name``'s series whose labels include every ``key="value"`` in ``labels``."""
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base == name and all(lab in rest for lab in labels):
            total += value
    return total
