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

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.support.child import ChildProcess

__all__ = ["READY_LINE", "BotProcess", "BotStartError"]

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
#: what bot/nostr.py logs (INFO) once it reads DMs
READY_LINE = "Nostr: listening as"
#: the repository root, where ``python -m bot`` finds the package
_ROOT = Path(__file__).resolve().parents[2]


class BotStartError(RuntimeError):
    """The bot did not come up; the message carries the tail of its log."""


class BotProcess(ChildProcess):
    """One ``python -m bot serve`` process with its config file and log under ``data_dir``."""

    name = "bot"
    log_name = "bot.log"
    start_error = BotStartError
    uses_port = False  # its ports are in its config
    start_timeout_s = START_TIMEOUT_S
    stop_timeout_s = STOP_TIMEOUT_S
    ready_poll_s = 0.05

    def __init__(
        self,
        data_dir: Path,
        config: dict[str, Any],
        ready_line: str = READY_LINE,
        env: dict[str, str] | None = None,
    ):
        super().__init__(data_dir)
        self.config = config
        self.ready_line = ready_line
        #: extra environment (e.g. ECASHBOT_FAILPOINTS), on top of ours minus ECASHBOT_*
        self.extra_env = dict(env or {})

    @property
    def config_path(self) -> Path:
        """The YAML config the process reads."""
        return self.data_dir / "config.yaml"

    def log_text(self) -> str:
        """The whole log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n_chars: int = 4000) -> str:
        """The end of the log, for error messages."""
        return self.log_text()[-n_chars:] or "(no log)"

    def _argv(self) -> list[str]:
        return [sys.executable, "-m", "bot", "serve", "--config", str(self.config_path)]

    def _cwd(self) -> Path:
        return _ROOT

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECASHBOT_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def _prepare(self) -> None:
        super()._prepare()
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    async def _is_ready(self, new_log: bytes) -> bool:
        return self.ready_line.encode() in new_log

    async def _abort_start(self) -> None:
        """SIGTERM, not SIGKILL: the bot closes its stores before it exits."""
        await self.stop()
