"""The bot's log: plain lines or JSON objects, with secrets redacted from every record.

:func:`setup_logging` is called once by the CLI. Its :class:`RedactSecrets` filter sits
on the root handler, so it sees every record, the libraries' too: bot code never logs a
token or key (the tests check that), and the filter is the defence in depth behind it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import IO, Any, Literal

__all__ = ["JsonFormatter", "RedactSecrets", "redact", "setup_logging"]

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: what must never reach a log, with what replaces it
_SECRETS = (
    # Cashu tokens (V3 base64url JSON, V4 base64url CBOR), also inside cashu: URIs
    (re.compile(r"cashu[AB][A-Za-z0-9_\-+/=]{8,}"), "cashu[redacted]"),
    # NUT-18 payment requests: not secret, but long, and they may carry payer details
    (re.compile(r"creqA[A-Za-z0-9_\-+/=]{8,}"), "creqA[redacted]"),
    # Nostr secret keys
    (re.compile(r"nsec1[02-9ac-hj-np-z]{20,}"), "nsec1[redacted]"),
    # the operator token as the dashboard login takes it (?token=) and as a header
    (re.compile(r"([?&](?:token|access_token)=)[^&\s\"']+"), r"\1[redacted]"),
    (re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=\-]+"), r"\1[redacted]"),
)

#: LogRecord attributes that are not ``extra`` fields
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


def redact(text: str) -> str:
    """``text`` with every token, payment request, nsec and operator token replaced."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class RedactSecrets(logging.Filter):
    """A handler filter that rewrites records so no secret gets formatted into a line."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the message, its exception text and ``extra`` strings; keep the record."""
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it when it formats
            message = str(record.msg)
            record.args = None
        clean = redact(message)
        if clean != message or not isinstance(record.msg, str):
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in out:
                out[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(
    level: str, fmt: Literal["plain", "json"] = "plain", stream: IO[str] | None = None
) -> logging.Handler:
    """Log to ``stream`` (stderr) in ``fmt``, with secrets redacted; returns the handler.

    Replaces the root logger's handlers, so calling it twice does not log twice.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(PLAIN_FORMAT))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
