"""A real redis-server of the tests' own, on a free port, without persistence.

It runs in its own process group from a temporary directory (``--save "" --appendonly
no``: nothing survives a restart, as after a crash of an unpersisted Redis). It is
stopped at teardown; one that survives anyway (pytest killed) is killed at interpreter
exit, and on Linux dies with the test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal

from tests.support.child import ChildProcess

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_READY_LINE = b"Ready to accept connections"


class RedisStartError(RuntimeError):
    """redis-server did not come up; the message carries the tail of its log."""


class RedisServer(ChildProcess):
    """One redis-server on 127.0.0.1; ``restart()`` keeps the port (the data is lost)."""

    name = "redis-server"
    log_name = "redis.log"
    start_error = RedisStartError
    start_timeout_s = START_TIMEOUT_S
    stop_timeout_s = STOP_TIMEOUT_S
    ready_poll_s = 0.02
    stop_poll_s = 0.02

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisStartError("redis-server is not on PATH (.ci/run installs it)")
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
        return argv

    async def _is_ready(self, new_log: bytes) -> bool:
        # The log line proves that *our* process answers, not a stranger on the port.
        return _READY_LINE in new_log and await self._pong()

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

    async def stop(self) -> None:
        """Stop redis-server: SIGTERM, then SIGKILL after a grace period; wait until reaped."""
        self.resume()  # a paused server can't act on SIGTERM
        await super().stop()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung Redis)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)
