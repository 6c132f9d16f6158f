"""What the benchmark run and its soak process share: logging, the bot's config, tokens."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench._clients import Minter

PAID_SAT = 64  # one proof of 64 sat per token; swapped into 7 outputs by the bot
MB = 1024 * 1024
#: config overrides from ``--set key.path=value`` (YAML values), applied to every bot
OVERRIDES: dict[str, Any] = {}
#: the operator token of the bots (``/metrics`` needs it)
OPERATOR_TOKEN = "bench-operator-token"

#: header lines our clients accept from the bot: change in ``X-Cashu`` can be longer than
#: aiohttp's default limit (8190 bytes); how often it is, the results tell
HEADER_LIMIT = 1 << 16
#: aiohttp's (and many proxies') default limit of one header line, bytes
DEFAULT_HEADER_LIMIT = 8190

_PREFIX = "bench"


def set_log_prefix(prefix: str) -> None:
    """Name this process in its progress lines (``bench``, ``soak``)."""
    global _PREFIX
    _PREFIX = prefix


def log(msg: str) -> None:
    """Progress on stderr, with the wall clock."""
    print(f"[{_PREFIX} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def apply_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with every ``--set`` override applied (in place)."""
    for dotted, value in OVERRIDES.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return cfg


def bot_config(wallet_dir: Path, mint_url: str, emulator_url: str, port: int) -> dict[str, Any]:
    """The HTTP bot: defaults, except rate limits raised far above any load here (and an
    operator token, for ``/metrics``)."""
    return apply_overrides(
        {
            "mints": [mint_url],
            "wallet": {"path": str(wallet_dir)},
            "http": {"enabled": True, "host": "127.0.0.1", "port": port},
            "gemini": {
                "api_key": "bench-key",
                "base_url": emulator_url,
                "api_version": "v1beta",
                "timeout_s": 600,
            },
            "rate_limit": {
                "requests_capacity": 1_000_000,
                "requests_per_s": 1_000_000,
                "tokens_capacity": 10_000_000_000,
                "tokens_per_s": 1_000_000_000,
            },
            "nostr": {"enabled": False},
            "operator": {"token": OPERATOR_TOKEN},
            "log_level": "INFO",
        }
    )


async def bounded(n: int, concurrency: int, job: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """Run ``job(0..n-1)`` with at most ``concurrency`` at once; results in order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Any:
        async with gate:
            return await job(i)

    return await asyncio.gather(*(one(i) for i in range(n)))


class Tokens:
    """Funded cashuB tokens of ``PAID_SAT`` (with DLEQ), minted pre-split (see Minter)."""

    def __init__(self, minter: Minter) -> None:
        self.minter = minter

    async def take(self, n: int, amount_sat: int = PAID_SAT) -> list[str]:
        """``n`` fresh tokens of ``amount_sat``."""
        return await self.minter.tokens(amount_sat, n)
