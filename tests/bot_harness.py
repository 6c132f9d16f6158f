"""Start the bot in-process against a real mint and the Gemini emulator, as a user would."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from bot.config import Config, load_config
from bot.daemon import Daemon, running


def bot_config(
    wallet_dir: Path, mint_urls: list[str], emulator_url: str, **overrides: Any
) -> Config:
    """A config for tests: free HTTP port, the emulator as Gemini, short timeouts."""
    base: dict[str, Any] = {
        "mints": mint_urls,
        "wallet": {"path": str(wallet_dir)},
        "http": {"port": 0},
        "gemini": {
            "api_key": "test-key",
            "base_url": emulator_url,
            "api_version": "v1beta",
            "timeout_s": 10,
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_config(None, **base)


@contextlib.asynccontextmanager
async def bot(cfg: Config) -> AsyncIterator[Daemon]:
    """The whole daemon, listening on a free port."""
    async with running(cfg) as daemon:
        yield daemon


async def ask(
    url: str,
    question: str,
    token: str | None,
    *,
    model: str | None = None,
    max_tokens: int | None = None,
    stream: bool = False,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """POST a chat completion; returns (status, headers, JSON body or SSE events)."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": question}]}
    if model:
        body["model"] = model
    if max_tokens:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
    h = dict(headers or {})
    if token is not None:
        h["X-Cashu"] = token
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/chat/completions", json=body, headers=h) as r,
    ):
        if stream and r.status == 200:
            events: list[Any] = []
            async for line in r.content:
                text = line.decode().strip()
                if text.startswith("data: "):
                    data = text[len("data: ") :]
                    events.append(data if data == "[DONE]" else json.loads(data))
            return r.status, dict(r.headers), events
        return r.status, dict(r.headers), await r.json()
