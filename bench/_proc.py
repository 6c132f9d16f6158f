"""The bot as its own OS process, and what /proc says about a process (CPU time, RSS).

No psutil: ``/proc/<pid>/stat`` fields 14-15 (utime, stime, in clock ticks) and
``/proc/<pid>/status`` ``VmRSS`` are read directly.
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
from typing import IO, Any

import yaml

from tests.support.mint import _LIVE, _die_with_parent

_ROOT = Path(__file__).resolve().parents[1]
_TICKS = os.sysconf("SC_CLK_TCK")
HTTP_READY = "HTTP listening on"
NOSTR_READY = "Nostr: listening as"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far, seconds (resolution 1/CLK_TCK)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # the command name (field 2) may hold spaces: split after its closing parenthesis
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / _TICKS


def thread_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds of ``pid``'s main thread (the event loop) and of all its other threads.

    Threads that ended already are missing from the second figure; the bot's worker
    threads (SQLite stores, executors) live as long as the process.
    """
    main = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            raw = (task / "stat").read_text()
            fields = raw[raw.rindex(")") + 2 :].split()
            cpu = (int(fields[11]) + int(fields[12])) / _TICKS
            if int(task.name) == pid:
                main += cpu
            else:
                other += cpu
    return main, other


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class BotProc:
    """``python -m bot serve --config FILE`` in its own process group (``profile_to``:
    under :mod:`bench._profiled_bot`)."""

    def __init__(
        self,
        data_dir: Path,
        config: dict[str, Any],
        ready_line: str,
        profile_to: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.config = config
        self.ready_line = ready_line
        self.profile_to = profile_to
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """The bot's process id."""
        assert self._proc is not None
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        """stdout + stderr of the bot."""
        return self.data_dir / "bot.log"

    def log_tail(self, n: int = 3000) -> str:
        """The end of the bot's log."""
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")[-n:]
        return "(no log)"

    def write_config(self) -> Path:
        """Write the bot's config.yaml (also what ``ecashbot wallet --config`` reads)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.data_dir / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return cfg_path

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start the bot and wait for its ready line in the log."""
        cfg_path = self.write_config()
        argv = [sys.executable]
        if self.profile_to is not None:  # profiled between SIGUSR1 and SIGUSR2
            argv += ["-m", "bench._profiled_bot", str(self.profile_to)]
        else:
            argv += ["-m", "bot"]
        argv += ["serve", "--config", str(cfg_path)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECASHBOT_")}
        env["PYTHONUNBUFFERED"] = "1"
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            argv,
            cwd=_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        _LIVE[self._proc.pid] = self._proc
        deadline = time.monotonic() + timeout_s
        while self.ready_line not in self.log_path.read_text(errors="replace"):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"bot did not start:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the bot process only."""
        os.kill(self.pid, sig)

    def grep(self, needle: str) -> list[str]:
        """The log lines holding ``needle``."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [ln for ln in text.splitlines() if needle in ln]

    def problems(self) -> list[str]:
        """Log lines at WARNING or ERROR or with a traceback (failures must not hide)."""
        return self.grep(" WARNING ") + self.grep(" ERROR ") + self.grep("Traceback")

    async def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the bot drains and exits), then SIGKILL after ``timeout_s``."""
        proc = self._proc
        if proc is None:
            return None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            if proc.poll() is not None:
                break
        _LIVE.pop(proc.pid, None)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode
