"""A real nutshell mint (FakeWallet backend) in a subprocess, for tests.

The mint reads its settings from the environment only: it runs from an empty directory
with HOME pointed at another empty one, so neither ``./.env`` nor ``~/.cashu/.env`` is
read, and it gets a minimal environment instead of ours. Its keys come from
``MINT_PRIVATE_KEY`` and its keysets (with their fee) from the database, so a restart on
the same data directory serves the same keyset ids and the same fee.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import aiohttp

from tests.support.ports import free_port, port_is_listening

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1

# Every mint process we started and have not reaped yet: killed at interpreter exit.
_LIVE: dict[int, subprocess.Popen[bytes]] = {}


class MintStartError(RuntimeError):
    """The mint did not come up; the message carries the tail of its log."""


def _kill_leftovers() -> None:
    for pid, proc in list(_LIVE.items()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)
        _LIVE.pop(pid, None)


atexit.register(_kill_leftovers)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGKILL the mint if the test process dies without cleaning up."""
    parent = os.getppid()
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


class MintProcess:
    """One nutshell mint on 127.0.0.1, FakeWallet backend (every invoice counts as paid)."""

    def __init__(
        self,
        data_dir: Path,
        input_fee_ppk: int = 0,
        port: int | None = None,
        private_key: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.input_fee_ppk = input_fee_ppk
        self.private_key = private_key or secrets.token_hex(32)
        self._fixed_port = port is not None
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # --- where things are ---------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port (chosen on the first start unless given)."""
        if self._port is None:
            raise RuntimeError("mint not started yet: no port chosen")
        return self._port

    @property
    def url(self) -> str:
        """The mint's base URL, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The mint's process id (also its process group id) while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the mint process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def db_dir(self) -> Path:
        """The mint's SQLite database directory (kept across restarts)."""
        return self.data_dir / "db"

    @property
    def log_path(self) -> Path:
        """The mint's stdout+stderr, appended across restarts."""
        return self.data_dir / "mint.log"

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The last bytes of the mint's log, for error messages."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n_bytes))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    # --- lifecycle ----------------------------------------------------------------------

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

    def _spawn(self) -> None:
        for sub in ("db", "home", "cwd"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log.write(f"\n===== start on port {self.port} =====\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cashu.mint"],
            cwd=self.data_dir / "cwd",
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: we kill the whole group
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        _LIVE[self._proc.pid] = self._proc

    async def start(self) -> None:
        """Start the mint and wait until ``GET /v1/info`` answers (or raise MintStartError)."""
        if self.running:
            raise RuntimeError(f"mint already running on {self.url}")
        for attempt in range(3):
            if self._port is None:
                self._port = free_port()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn()
            try:
                await self._wait_ready(log_offset)
                return
            except MintStartError:
                port_taken = "address already in use" in self.log_tail().lower()
                await self.kill()
                if port_taken and not self._fixed_port and attempt < 2:
                    self._port = None  # lost the race for a free port: pick another one
                    continue
                raise

    async def _wait_ready(self, log_offset: int) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        ready_line = f"running on http://127.0.0.1:{self.port}".encode()
        # Short timeouts: a socket that accepts but never answers must not hide an exit.
        timeout = aiohttp.ClientTimeout(total=0.5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if self._proc.poll() is not None:
                    raise MintStartError(
                        f"mint exited with {self._proc.returncode} during start:\n"
                        + self.log_tail()
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with session.get(f"{self.url}/v1/info") as resp:
                        # The log line proves that *our* process answers, not a stranger.
                        if resp.status == 200 and ready_line in self._log_since(log_offset):
                            return
                if time.monotonic() > deadline:
                    raise MintStartError(
                        f"mint not ready after {START_TIMEOUT_S} s on {self.url}:\n"
                        + self.log_tail()
                    )
                await asyncio.sleep(0.1)

    def _log_since(self, offset: int) -> bytes:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read()

    async def _signal_and_wait(self, sig: signal.Signals, within_s: float) -> bool:
        """Send sig to the mint's process group; True once the process is reaped."""
        proc = self._proc
        assert proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + within_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def _forget(self) -> None:
        proc = self._proc
        if proc is not None:
            # Anything left in its process group (there should be nothing) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            _LIVE.pop(proc.pid, None)
        if self._log is not None:
            self._log.close()
            self._log = None

    async def stop(self) -> None:
        """Stop the mint: SIGTERM, then SIGKILL after a grace period; wait until reaped."""
        if self._proc is None:
            return
        if not await self._signal_and_wait(signal.SIGTERM, STOP_TIMEOUT_S):
            await self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT_S)
        self._forget()

    async def kill(self) -> None:
        """SIGKILL the mint, as a crash would, and reap it."""
        if self._proc is None:
            return
        await self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT_S)
        self._forget()

    async def restart(self) -> None:
        """Stop (if running) and start again: same port, database and keys."""
        await self.stop()
        await self.start()

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

    async def __aenter__(self) -> MintProcess:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        port = self._port if self._port is not None else "?"
        return f"<MintProcess 127.0.0.1:{port} fee={self.input_fee_ppk}ppk {state}>"
