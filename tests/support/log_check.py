"""The suite-wide check that no log line holds a Cashu token or a Nostr secret key.

Every record any logger emits while the tests run is looked at (a handler on the root
logger, which is opened to INFO), and so is the log of every bot process a test started
(``bot.log`` under the test's ``tmp_path``, and at the end of the session every
``bot.log`` under the session's temp dir). A match fails the test that was running.
In-process bots run without the CLI's redacting filter, so a match there is a place in
``bot/`` that logs a secret; subprocess bots run with it, so a match there means the
filter missed one.

Use the fixtures from a conftest: ``from tests.support.log_check import *``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.logs import JsonFormatter, redact

__all__ = ["SECRET", "find_secrets", "no_secrets_in_logs", "secret_catcher"]

#: a Cashu token (V3/V4) or a bech32 Nostr secret key
SECRET = re.compile(r"cashu[AB][A-Za-z0-9_\-+/=]{20,}|nsec1[02-9ac-hj-np-z]{58}")


def find_secrets(text: str) -> list[str]:
    """The tokens and nsec keys in ``text``."""
    return SECRET.findall(text)


class SecretCatcher(logging.Handler):
    """Remembers (redacted) every record whose line would hold a secret."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self._formatter = JsonFormatter()
        self.found: list[str] = []
        #: found outside any test (fixtures, background tasks): reported at the session's end
        self.between_tests: list[str] = []
        #: bytes of each bot.log already scanned
        self.scanned: dict[Path, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # message, extra fields and traceback: everything a handler could write
            line = self._formatter.format(record)
        except Exception:
            line = f"{record.msg!r} {record.args!r}"
        if find_secrets(line):
            self.found.append(f"log record {record.name} {record.levelname}: {redact(line)}")

    def scan_bot_logs(self, root: Path) -> None:
        """Read what is new in every ``bot.log`` under ``root``."""
        for path in root.rglob("bot.log"):
            start = self.scanned.get(path, 0)
            with path.open("rb") as f:
                f.seek(start)
                data = f.read()
            self.scanned[path] = start + len(data)
            for n, line in enumerate(data.decode(errors="replace").splitlines()):
                if find_secrets(line):
                    self.found.append(f"{path} (new line {n + 1}): {redact(line)[:500]}")

    def take(self) -> list[str]:
        """What was found since the last call."""
        found, self.found = self.found, []
        return found


def _report(found: list[str]) -> str:
    shown = "\n  ".join(found[:20])
    more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
    return f"a log line holds a Cashu token or an nsec (shown redacted):\n  {shown}{more}"


@pytest.fixture(scope="session")
def secret_catcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecretCatcher]:
    """The root handler of the session; at its end, every bot.log is scanned once more."""
    catcher = SecretCatcher()
    root = logging.getLogger()
    level = root.level
    root.addHandler(catcher)
    # INFO records (the paid-request line, access logs) are checked too
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield catcher
    finally:
        root.removeHandler(catcher)
        root.setLevel(level)
    catcher.scan_bot_logs(tmp_path_factory.getbasetemp())
    found = catcher.between_tests + catcher.take()
    if found:
        pytest.fail(_report(found), pytrace=False)


@pytest.fixture(autouse=True)
def no_secrets_in_logs(
    request: pytest.FixtureRequest, secret_catcher: SecretCatcher
) -> Iterator[None]:
    """Fail the test if a log record, or a bot process's log, held a token or an nsec."""
    secret_catcher.between_tests += secret_catcher.take()  # not this test's doing
    yield
    tmp_path = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    if isinstance(tmp_path, Path) and tmp_path.exists():
        secret_catcher.scan_bot_logs(tmp_path)
    found = secret_catcher.take()
    if found:
        pytest.fail(_report(found), pytrace=False)
