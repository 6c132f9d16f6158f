"""A real nutshell mint (FakeWallet backend) in a subprocess, for tests.

The mint reads its settings from the environment only: it runs from an empty directory
with HOME pointed at another empty one, so neither ``./.env`` nor ``~/.cashu/.env`` is
read, and it gets a minimal environment instead of ours. Its keys come from
``MINT_PRIVATE_KEY`` and its keysets (with their fee) from the database, so a restart on
the same data directory serves the same keyset ids and the same fee.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

# _LIVE and _die_with_parent are re-exported: bench/ imports them from here.
from tests.support.child import _LIVE as _LIVE
from tests.support.child import ChildProcess
from tests.support.child import _die_with_parent as _die_with_parent
from tests.support.child import _kill_leftovers as _kill_leftovers
from tests.support.ports import port_is_listening

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class MintStartError(RuntimeError):
    """The mint did not come up; the message carries the tail of its log."""


class MintProcess(ChildProcess):
    """One nutshell mint on 127.0.0.1, FakeWallet backend (every invoice counts as paid)."""

    name = "mint"
    log_name = "mint.log"
    start_error = MintStartError
    start_timeout_s = START_TIMEOUT_S
    stop_timeout_s = STOP_TIMEOUT_S

    def __init__(
        self,
        data_dir: Path,
        input_fee_ppk: int = 0,
        port: int | None = None,
        private_key: str | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.input_fee_ppk = input_fee_ppk
        self.private_key = private_key or secrets.token_hex(32)

    @property
    def url(self) -> str:
        """The mint's base URL, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_dir(self) -> Path:
        """The mint's SQLite database directory (kept across restarts)."""
        return self.data_dir / "db"

    def _label(self) -> str:
        return f"{super()._label()} fee={self.input_fee_ppk}ppk"

    # --- how it runs --------------------------------------------------------------------

    def _argv(self) -> list[str]:
        return [sys.executable, "-m", "cashu.mint"]

    def _cwd(self) -> Path:
        return self.data_dir / "cwd"

    def _prepare(self) -> None:
        for sub in ("db", "home", "cwd"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)

    def _env(self) -> dict[str, str]:
        home = self.data_dir / "home"
        env = {
            key: os.environ[key]
            for key in ("PATH", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
            if key in os.environ
        }
        env.update(
            HOME=str(home),
            CASHU_DIR=str(home / ".cashu"),
            PYTHONUNBUFFERED="1",
            LOG_LEVEL="INFO",
            DEBUG="FALSE",
            MINT_BACKEND_BOLT11_SAT="FakeWallet",
            FAKEWALLET_BRR="TRUE",
            FAKEWALLET_DELAY_INCOMING_PAYMENT="1",
            MINT_PRIVATE_KEY=self.private_key,
            MINT_LISTEN_HOST="127.0.0.1",
            MINT_LISTEN_PORT=str(self.port),
            MINT_DATABASE=str(self.db_dir),
            MINT_AUTH_DATABASE=str(self.db_dir),
            MINT_INPUT_FEE_PPK=str(self.input_fee_ppk),
            MINT_RATE_LIMIT="FALSE",
            MINT_INFO_NAME="ecashbot test mint",
        )
        return env

    async def _is_ready(self, new_log: bytes) -> bool:
        """Our uvicorn logged that it runs (not a stranger's port) and /v1/info answers."""
        if f"running on http://127.0.0.1:{self.port}".encode() not in new_log:
            return False
        # A short timeout: a socket that accepts but never answers must not hide an exit.
        timeout = aiohttp.ClientTimeout(total=0.5)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(f"{self.url}/v1/info") as resp,
            ):
                return resp.status == 200
        return False

    async def wait_port_closed(self, within_s: float = 5.0) -> None:
        """Wait until nothing listens on the mint's port any more."""
        deadline = time.monotonic() + within_s
        while port_is_listening(self.port):
            if time.monotonic() > deadline:
                raise TimeoutError(f"port {self.port} still listening")
            await asyncio.sleep(0.05)

    # --- small HTTP helpers -------------------------------------------------------------

    async def get_json(self, path: str) -> Any:
        """``GET {url}{path}`` as JSON (e.g. ``/v1/keysets``)."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(f"{self.url}{path}") as resp,
        ):
            resp.raise_for_status()
            return await resp.json()

    async def keysets(self) -> list[dict[str, Any]]:
        """The mint's ``/v1/keysets`` entries (id, unit, active, input_fee_ppk)."""
        body = await self.get_json("/v1/keysets")
        keysets: list[dict[str, Any]] = body["keysets"]
        return keysets
