"""The wallet's secrets on disk: each a hex file under the wallet's directory."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def load_or_create(path: Path, name: str, n_bytes: int) -> bytes:
    """The secret in ``<path>/<name>``: ``n_bytes`` random bytes made once (mode 0600)."""
    path.mkdir(parents=True, exist_ok=True)
    key_file = path / name
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(n_bytes))
    return bytes.fromhex(key_file.read_text().strip())
