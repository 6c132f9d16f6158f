"""A real redis-server of the tests' own, on a free port, without persistence.

It runs in its own process group from a temporary directory (``--save "" --appendonly
no``: nothing survives a restart, as after a crash of an unpersisted Redis). It is
stopped at teardown; one that survives anyway (pytest killed) is killed at interpreter
exit, and on Linux dies with the test process.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from tests.support.ports import free_port

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_PR_SET_PDEATHSIG = 1
_READY_LINE = b"Ready to accept connections"

# Every redis-server we started and have not reaped yet: killed at interpreter exit.
_LIVE: dict[int, subprocess.Popen[bytes]] = {}


class RedisStartError(RuntimeError):
    """redis-server did not come up; the message carries the tail of its log."""


def _kill_leftovers() -> None:
    for pid, proc in list(_LIVE.items()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)
        _LIVE.pop(pid, None)


atexit.register(_kill_leftovers)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGKILL redis-server if the test process dies without cleaning up."""
    parent = os.getppid()
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


class RedisServer:
    """One redis-server on 127.0.0.1; ``restart()`` keeps the port (the data is lost)."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self._fixed_port = port is not None
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def port(self) -> int:
        """The TCP port (chosen on the first start unless given)."""
        if self._port is None:
            raise RuntimeError("redis-server not started yet: no port chosen")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the redis-server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        """redis-server's log, appended across restarts."""
        return self.data_dir / "redis.log"

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The last bytes of the log, for error messages."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n_bytes))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    def _spawn(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisStartError("redis-server is not on PATH (.ci/run installs it)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log.write(f"\n===== start on port {self.port} =====\n".encode())
        self._log.flush()
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",  # no snapshots and no AOF: a restart starts empty
            "appendonly": "no",
            "dir": str(self.data_dir),
            "daemonize": "no",
        }
        argv = [binary]
        for name, value in options.items():
            argv += [f"--{name}", value]
        self._proc = subprocess.Popen(
            argv,
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: we kill the whole group
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        _LIVE[self._proc.pid] = self._proc

    async def start(self) -> None:
        """Start redis-server and wait until it answers PING (or raise RedisStartError)."""
        if self.running:
            raise RuntimeError(f"redis-server already running on {self.url}")
        for attempt in range(3):
            if self._port is None:
                self._port = free_port()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn()
            try:
                await self._wait_ready(log_offset)
                return
            except RedisStartError:
                port_taken = "address already in use" in self.log_tail().lower()
                await self.kill()
                if port_taken and not self._fixed_port and attempt < 2:
                    self._port = None  # lost the race for a free port: pick another one
                    continue
                raise

    async def _wait_ready(self, log_offset: int) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                raise RedisStartError(
                    f"redis-server exited with {self._proc.returncode}:\n" + self.log_tail()
                )
            # The log line proves that *our* process answers, not a stranger on the port.
            if _READY_LINE in self._log_since(log_offset) and await self._pong():
                return
            if time.monotonic() > deadline:
                raise RedisStartError(
                    f"redis-server not ready after {START_TIMEOUT_S} s:\n" + self.log_tail()
                )
            await asyncio.sleep(0.02)

    async def _pong(self) -> bool:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port), 0.5
            )
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return await asyncio.wait_for(reader.readline(), 0.5) == b"+PONG\r\n"
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _log_since(self, offset: int) -> bytes:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read()

    async def _signal_and_wait(self, sig: signal.Signals, within_s: float) -> bool:
        """Send sig to the process group; True once the process is reaped."""
        proc = self._proc
        assert proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + within_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def _forget(self) -> None:
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            _LIVE.pop(proc.pid, None)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    async def stop(self) -> None:
        """Stop redis-server: SIGTERM, then SIGKILL after a grace period; wait until reaped."""
        if self._proc is None:
            return
        self.resume()  # a paused server can't act on SIGTERM
        if not await self._signal_and_wait(signal.SIGTERM, STOP_TIMEOUT_S):
            await self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT_S)
        self._forget()

    async def kill(self) -> None:
        """SIGKILL redis-server, as a crash would, and reap it."""
        if self._proc is None:
            return
        await self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT_S)
        self._forget()

    async def restart(self) -> None:
        """Stop (if running) and start again on the same port, empty."""
        await self.stop()
        await self.start()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung Redis)."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGCONT)

    async def __aenter__(self) -> RedisServer:
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
        return f"<RedisServer 127.0.0.1:{port} {state}>"
