"""The load generators: a paid chat request through the bot, the same question sent
straight to the emulator with google-genai, and a minimal raw ``/v1/swap`` client."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

import aiohttp
from google import genai
from google.genai import types

from mint_client import crypto
from mint_client.protocol import MintAPI
from mint_client.tokens import expand_keyset_ids, parse_token

MODEL = "gemini-2.5-flash"


@dataclass
class Reply:
    """One paid request as the client saw it."""

    status: int
    ttft_s: float | None  # streaming: first content delta; non-streaming: whole answer
    total_s: float
    change: bool  # the answer carried change (header or final SSE chunk)


async def ask_bot(
    session: aiohttp.ClientSession, url: str, question: str, token: str, *, stream: bool
) -> Reply:
    """POST /v1/chat/completions with ``X-Cashu``; read the answer to its end."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "stream": stream}
    started = time.perf_counter()
    ttft: float | None = None
    change = False
    async with session.post(
        f"{url}/v1/chat/completions", json=body, headers={"X-Cashu": token}
    ) as resp:
        if not stream or resp.status != 200:
            data = await resp.read()
            elapsed = time.perf_counter() - started
            change = "X-Cashu" in resp.headers or b"cashuB" in data
            return Reply(resp.status, elapsed, elapsed, change)
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - started
            if "payment" in chunk:
                change = bool(chunk["payment"].get("change_token") or chunk["payment"])
        return Reply(resp.status, ttft, time.perf_counter() - started, change)


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


class RawSwapper:
    """The least a wallet does to redeem a token: parse, blind, ``POST /v1/swap``, unblind.

    Outputs are split as the bot splits a payment (``change_friendly_split``), so the mint
    signs as many outputs for this client as for the bot.
    """

    def __init__(self, session: aiohttp.ClientSession, mint_url: str) -> None:
        self.api = MintAPI(session, mint_url, timeout_s=60)
        self._keyset_ids: list[str] = []
        self._active = ""
        self._keys: dict[int, str] = {}

    async def load(self) -> None:
        """Fetch the mint's keysets and the active keyset's keys once."""
        keysets = await self.api.keysets()
        self._keyset_ids = [k.id for k in keysets]
        self._active = next(k.id for k in keysets if k.active and k.unit == "sat")
        self._keys = await self.api.keys(self._active)

    async def swap(self, token_text: str) -> float:
        """Redeem one token; seconds taken."""
        started = time.perf_counter()
        token = expand_keyset_ids(parse_token(token_text), self._keyset_ids)
        outputs = [
            crypto.blind(secrets.token_hex(32), secrets.token_bytes(32), a, self._active, None)
            for a in crypto.change_friendly_split(token.amount)
        ]
        sigs = await self.api.swap(token.proofs, outputs)
        for out, sig in zip(outputs, sigs, strict=True):
            crypto.unblind(out, sig.C_, self._keys[sig.amount], sig.dleq)
        return time.perf_counter() - started
