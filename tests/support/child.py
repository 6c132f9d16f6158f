"""A child process of the tests' own: its own process group, a log, start/stop/kill/restart.

Each child runs in a new session (so it and whatever it spawns are signalled together),
writes stdout and stderr to a log under its data directory, appended across restarts, and
is stopped with SIGTERM, then SIGKILL after a grace period. One that survives anyway
(pytest killed) is killed at interpreter exit, and on Linux dies with the test process.
Subclasses say how to run the child and when it is ready.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Self

from tests.support.ports import free_port

_PR_SET_PDEATHSIG = 1

# Every child we started and have not reaped yet: killed at interpreter exit.
_LIVE: dict[int, subprocess.Popen[bytes]] = {}


def _kill_leftovers() -> None:
    for pid, proc in list(_LIVE.items()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)
        _LIVE.pop(pid, None)


atexit.register(_kill_leftovers)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGKILL the child if the test process dies without cleaning up."""
    parent = os.getppid()
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


class ChildProcess:
    """One external process under ``data_dir``; subclasses give its argv and readiness.

    A child that listens on a port (``uses_port``) gets a free one on its first start
    unless one is given, keeps it across restarts, and, if it loses the race for that
    port ("address already in use" in its log), is started again on another one.
    """

    #: what the child is called in messages
    name: ClassVar[str] = "child"
    #: its log file, under ``data_dir``
    log_name: ClassVar[str] = "child.log"
    #: raised when it does not come up; a subclass of RuntimeError
    start_error: ClassVar[type[RuntimeError]] = RuntimeError
    #: whether it listens on a TCP port of 127.0.0.1
    uses_port: ClassVar[bool] = True
    start_timeout_s: ClassVar[float] = 60.0
    stop_timeout_s: ClassVar[float] = 10.0
    #: how often the readiness check runs during start
    ready_poll_s: ClassVar[float] = 0.1
    #: how often we look whether a signalled child has exited
    stop_poll_s: ClassVar[float] = 0.05

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self._fixed_port = port is not None
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._returncode: int | None = None

    # --- what a subclass provides -------------------------------------------------------

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        """The child's environment; None inherits ours."""
        return None

    def _cwd(self) -> Path:
        return self.data_dir

    def _prepare(self) -> None:
        """Create directories and write config files before each start."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    async def _is_ready(self, new_log: bytes) -> bool:
        """Whether the child serves, given its log since this start."""
        raise NotImplementedError

    async def _abort_start(self) -> None:
        """Get rid of a child that did not come up."""
        await self.kill()

    # --- where things are ---------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port (chosen on the first start unless given)."""
        if self._port is None:
            raise RuntimeError(f"{self.name} not started yet: no port chosen")
        return self._port

    @property
    def pid(self) -> int | None:
        """The process id (also its process group id) while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (None while running or never started)."""
        return self._proc.poll() if self._proc is not None else self._returncode

    @property
    def log_path(self) -> Path:
        """The child's stdout and stderr, appended across restarts."""
        return self.data_dir / self.log_name

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The last bytes of the log, for error messages."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n_bytes))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    def _log_since(self, offset: int) -> bytes:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read()

    def _label(self) -> str:
        """What ``repr`` shows between the class name and the state."""
        return f"127.0.0.1:{self._port or '?'}" if self.uses_port else self.data_dir.name

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self._label()} {state}>"

    # --- lifecycle ----------------------------------------------------------------------

    def _spawn(self) -> None:
        argv = self._argv()
        self._prepare()
        self._log = self.log_path.open("ab")
        if self.uses_port:
            self._log.write(f"\n===== start on port {self.port} =====\n".encode())
            self._log.flush()
        try:
            self._proc = subprocess.Popen(
                argv,
                cwd=self._cwd(),
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: we signal the whole group
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        except BaseException:
            self._forget()
            raise
        _LIVE[self._proc.pid] = self._proc

    async def start(self) -> None:
        """Start the child and wait until it is ready (or raise ``start_error``)."""
        if self.running:
            raise RuntimeError(f"{self.name} already running ({self!r})")
        for attempt in range(3):
            if self.uses_port and self._port is None:
                self._port = free_port()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn()
            try:
                await self._wait_ready(log_offset)
                return
            except self.start_error:
                port_taken = "address already in use" in self.log_tail().lower()
                await self._abort_start()
                if port_taken and self.uses_port and not self._fixed_port and attempt < 2:
                    self._port = None  # lost the race for a free port: pick another one
                    continue
                raise
            except BaseException:
                await self._abort_start()
                raise

    async def _wait_ready(self, log_offset: int) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        where = f" on 127.0.0.1:{self.port}" if self.uses_port else ""
        while True:
            # Readiness first: a child may exit right after it was ready (a failpoint).
            if await self._is_ready(self._log_since(log_offset)):
                return
            if proc.poll() is not None:
                raise self.start_error(
                    f"{self.name} exited with {proc.returncode} during start:\n" + self.log_tail()
                )
            if time.monotonic() > deadline:
                raise self.start_error(
                    f"{self.name} not ready after {self.start_timeout_s} s{where}:\n"
                    + self.log_tail()
                )
            await asyncio.sleep(self.ready_poll_s)

    def _signal(self, sig: signal.Signals) -> None:
        """Send sig to the child's process group, if there is one."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, sig)

    async def _signal_and_wait(self, sig: signal.Signals, within_s: float) -> bool:
        """Send sig to the process group; True once the process is reaped."""
        proc = self._proc
        assert proc is not None
        self._signal(sig)
        deadline = time.monotonic() + within_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(self.stop_poll_s)
        return True

    def _forget(self) -> None:
        """Drop the reaped child: record its status, kill what is left of its group."""
        proc = self._proc
        if proc is not None:
            self._signal(signal.SIGKILL)  # there should be nothing left in the group
            self._returncode = proc.returncode
            _LIVE.pop(proc.pid, None)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; returns once reaped. Idempotent."""
        if self._proc is None:
            return
        if not await self._signal_and_wait(signal.SIGTERM, self.stop_timeout_s):
            await self._signal_and_wait(signal.SIGKILL, self.stop_timeout_s)
        self._forget()

    async def kill(self) -> None:
        """SIGKILL the child, as a crash would, and reap it."""
        if self._proc is None:
            return
        await self._signal_and_wait(signal.SIGKILL, self.stop_timeout_s)
        self._forget()

    async def restart(self) -> None:
        """Stop (if running) and start again, on the same port and data directory."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
