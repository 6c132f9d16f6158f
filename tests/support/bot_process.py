"""The bot as a real OS process (``python -m bot serve --config FILE``), for tests.

Its config is written as YAML next to its log (stdout and stderr, appended across
restarts). It runs in its own process group, without any ``ECASHBOT_`` variable of ours
(the environment would override the file), and is stopped with SIGTERM, then SIGKILL.
One that survives anyway (pytest killed) is killed at interpreter exit, and on Linux dies
with the test process.

    async with BotProcess(tmp_path / "bot-a", config) as bot:
        ...
    print(bot.log_text())
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml

from tests.support.mint import _LIVE, _die_with_parent

__all__ = ["READY_LINE", "BotProcess", "BotStartError"]

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
#: what bot/nostr.py logs (INFO) once it reads DMs
READY_LINE = "Nostr: listening as"
#: the repository root, where ``python -m bot`` finds the package
_ROOT = Path(__file__).resolve().parents[2]


class BotStartError(RuntimeError):
    """The bot did not come up; the message carries the tail of its log."""


class BotProcess:
    """One ``python -m bot serve`` process with its config file and log under ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        config: dict[str, Any],
        ready_line: str = READY_LINE,
        env: dict[str, str] | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.config = config
        self.ready_line = ready_line
        #: extra environment (e.g. ECASHBOT_FAILPOINTS), on top of ours minus ECASHBOT_*
        self.extra_env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._returncode: int | None = None

    @property
    def config_path(self) -> Path:
        """The YAML config the process reads."""
        return self.data_dir / "config.yaml"

    @property
    def log_path(self) -> Path:
        """The process's stdout and stderr."""
        return self.data_dir / "bot.log"

    @property
    def pid(self) -> int | None:
        """The process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (None while running or never started)."""
        return self._proc.poll() if self._proc is not None else self._returncode

    def log_text(self) -> str:
        """The whole log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n_chars: int = 4000) -> str:
        """The end of the log, for error messages."""
        return self.log_text()[-n_chars:] or "(no log)"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECASHBOT_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def _spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bot", "serve", "--config", str(self.config_path)],
            cwd=_ROOT,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: we signal the whole group
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        _LIVE[self._proc.pid] = self._proc

    async def start(self) -> None:
        """Start the process and wait for its ready line (or raise :class:`BotStartError`)."""
        if self.running:
            raise RuntimeError(f"bot already running (pid {self.pid})")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._spawn()
        try:
            await self._wait_ready(offset)
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self, log_offset: int) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with self.log_path.open("rb") as f:
                f.seek(log_offset)
                if self.ready_line.encode() in f.read():
                    return
            if self._proc.poll() is not None:
                raise BotStartError(f"bot exited with {self._proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BotStartError(f"bot not ready after {START_TIMEOUT_S} s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    async def _signal_and_wait(self, sig: signal.Signals, within_s: float) -> bool:
        """Send ``sig`` to the process group; True once the process is reaped."""
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

    async def stop(self) -> None:
        """SIGTERM (the bot lets paid requests settle and closes its stores), then SIGKILL
        after a grace period; returns once the process is reaped. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if not await self._signal_and_wait(signal.SIGTERM, STOP_TIMEOUT_S):
            await self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT_S)
        self._returncode = proc.returncode
        _LIVE.pop(proc.pid, None)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    async def kill(self) -> None:
        """SIGKILL the process, as a crash would, and reap it."""
        if self._proc is None:
            return
        await self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT_S)
        await self.stop()

    async def __aenter__(self) -> BotProcess:
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
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<BotProcess {self.data_dir.name} {state}>"
