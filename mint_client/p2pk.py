"""Tokens locked to the bot (NUT-10 secrets, NUT-11 P2PK): what a lock allows, and signing.

Pure, except :meth:`LockKey.load_or_create`. A proof whose secret is
``["P2PK", {"nonce", "data": <pubkey>, "tags": [...]}]`` can be spent only with a Schnorr
signature of ``data``'s key (or, once ``locktime`` has passed, of a ``refund`` key, or by
anyone when no refund key is named). A proof locked to the bot's key alone, with no
refund path that opens before the bot has swapped it, is money nobody else can take:
:func:`check_lock` says whether a proof is such a payment.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cashu.core.crypto.secp import PrivateKey

from mint_client import keyfile
from mint_client.errors import LockRefused

__all__ = ["Lock", "LockKey", "check_lock", "parse_lock", "witness"]


@dataclass(frozen=True, slots=True)
class Lock:
    """The spending conditions of one NUT-10 secret."""

    kind: str
    data: str
    #: tag name -> its values, in order (``["pubkeys", "02..", "03.."]`` -> two values)
    tags: dict[str, list[str]]

    def tag(self, name: str) -> str | None:
        values = self.tags.get(name)
        return values[0] if values else None

    @property
    def locktime(self) -> int | None:
        value = self.tag("locktime")
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise LockRefused("the lock's locktime is not a number") from None


def parse_lock(secret: str) -> Lock | None:
    """The NUT-10 conditions of ``secret``; None for a plain (random string) secret."""
    if not secret.startswith("["):
        return None
    try:
        obj = json.loads(secret)
    except ValueError:
        return None  # a plain secret that happens to start with "[": the mint agrees
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str)):
        return None
    body = obj[1]
    if not isinstance(body, dict):
        raise LockRefused("a NUT-10 secret's second element must be an object")
    data = body.get("data")
    if not isinstance(data, str):
        raise LockRefused("a NUT-10 secret needs a data string")
    tags: dict[str, list[str]] = {}
    raw_tags = body.get("tags") or []
    if not isinstance(raw_tags, list):
        raise LockRefused("a NUT-10 secret's tags must be a list")
    for t in raw_tags:
        if not (isinstance(t, list) and t and all(isinstance(v, str) for v in t)):
            raise LockRefused("each NUT-10 tag is a list of strings")
        tags.setdefault(t[0], []).extend(t[1:])
    return Lock(kind=obj[0], data=data, tags=tags)


def check_lock(secret: str, pubkey: str, *, now: float, min_lock_s: int) -> Lock | None:
    """Is this proof spendable by ``pubkey`` alone for at least ``min_lock_s``?

    None for a plain secret (an ordinary bearer proof). A lock that is not exactly
    "P2PK to ``pubkey``, one signature, on the inputs" (another key, a multisig, an HTLC,
    SIG_ALL) raises :class:`LockRefused`, as does a ``locktime`` earlier than
    ``now + min_lock_s``: after it the sender's refund key, or anyone when there is
    none, could spend the proof too.
    """
    lock = parse_lock(secret)
    if lock is None:
        return None
    if lock.kind != "P2PK":
        raise LockRefused(f"a {lock.kind!r}-locked token is not accepted; lock it with P2PK")
    if not same_key(lock.data, pubkey):
        raise LockRefused(
            "the token is locked to another key: only the bot's lock key "
            f"{pubkey} is accepted (see GET /v1/models)"
        )
    if any(not same_key(k, pubkey) for k in lock.tags.get("pubkeys", [])):
        raise LockRefused("the lock names other keys too: lock to the bot's key alone")
    n_sigs = lock.tag("n_sigs")
    if n_sigs not in (None, "1"):
        raise LockRefused("a multisig lock (n_sigs > 1) is not accepted")
    sigflag = lock.tag("sigflag")
    if sigflag not in (None, "SIG_INPUTS"):
        raise LockRefused(f"sigflag {sigflag!r} is not accepted; use SIG_INPUTS")
    locktime = lock.locktime
    if locktime is not None and locktime < now + min_lock_s:
        raise LockRefused(
            f"the lock's refund path opens too soon (locktime {locktime}); "
            f"it must stay locked to the bot for at least {min_lock_s} s"
        )
    return lock


def same_key(a: str, b: str) -> bool:
    """Whether two compressed keys name the same x coordinate.

    NUT-11 signatures are BIP-340 Schnorr, which sees only x: a lock to ``03<x>`` is
    spent by the key of ``02<x>`` too. NIP-61 has senders write ``02`` whatever the key.
    """
    return len(a) == 66 and a[:2] in ("02", "03") and a[2:].lower() == b[2:].lower()


def witness(signature_hex: str) -> str:
    """The NUT-11 witness of a SIG_INPUTS proof: ``{"signatures": [sig]}`` as JSON."""
    return json.dumps({"signatures": [signature_hex]}, separators=(",", ":"))


class LockKey:
    """The bot's P2PK key: separate from its Nostr key (NIP-61), kept in its wallet."""

    def __init__(self, private_key: bytes) -> None:
        key = PrivateKey(private_key)
        pub = key.public_key
        assert pub is not None
        if pub.format()[0] == 3:
            # the key with an even y: advertised as "02<x>", as NIP-61 wallets write it
            n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
            key = PrivateKey((n - int.from_bytes(private_key, "big")).to_bytes(32, "big"))
            pub = key.public_key
            assert pub is not None and pub.format()[0] == 2
        self._key = key
        #: compressed SEC1 hex, always "02<x>": what a lock's ``data`` names
        self.pubkey: str = pub.format().hex()

    @classmethod
    def load_or_create(cls, path: Path) -> LockKey:
        """The key in ``<path>/p2pk_key`` (created once, mode 0600)."""
        return cls(keyfile.load_or_create(path, "p2pk_key", 32))

    def sign(self, secret: str) -> str:
        """BIP-340 Schnorr signature of sha256(secret), hex: a proof's NUT-11 signature."""
        digest = hashlib.sha256(secret.encode("utf-8")).digest()
        return bytes(self._key.sign_schnorr(digest, None)).hex()
