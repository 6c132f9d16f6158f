"""Cashu tokens (NUT-00): read ``cashuA``/``cashuB``, write ``cashuB``, expand keyset ids.

Pure: no I/O. Whatever a payer sends, parsing ends in a value or in a
:class:`~mint_client.errors.TokenError`; no decoder exception escapes. Hex fields
(keyset ids, ``C``, DLEQ) are lowercased; everything else is kept as sent.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from urllib.parse import urlsplit

import cbor2
from cashu.core.crypto.b_dhke import hash_to_curve

from mint_client.errors import (
    InvalidMintUrl,
    MalformedToken,
    UnknownKeyset,
    UnsupportedToken,
)

#: Largest amount of one proof, and of a whole token: far above any real value, and
#: sums stay inside a signed 64-bit integer wherever they are stored.
MAX_AMOUNT = 2**62
#: Longest proof secret taken: nutshell mints refuse longer ones (mint_max_secret_length),
#: and it bounds what the Y cache can hold.
MAX_SECRET_LEN = 1024

_HEX_KEYSET_ID = re.compile(r"[0-9a-fA-F]{16}|[0-9a-fA-F]{66}")
# Keyset ids before nutshell 0.15 were 12 base64 characters.
_LEGACY_KEYSET_ID = re.compile(r"[A-Za-z0-9+/]{12}")
_PUBKEY_HEX = re.compile(r"0[23][0-9a-fA-F]{64}")
_SCALAR_HEX = re.compile(r"[0-9a-fA-F]{64}")
_BASE64 = re.compile(r"[A-Za-z0-9_\-+/]+=*")
_TO_URLSAFE = str.maketrans("+/", "-_")
_HOST = re.compile(r"[a-z0-9._~-]+")
# A token in free text: not glued to a preceding letter or digit; real tokens are
# hundreds of characters, so a short tail after the prefix is a word, not a token.
_TOKEN_IN_TEXT = re.compile(r"(?<![A-Za-z0-9])cashu[AB][A-Za-z0-9_\-+/]{16,}=*")
_URI_PREFIX = re.compile(r"cashu:(?://)?\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class DLEQ:
    """A NUT-12 DLEQ proof carried with a proof; hex strings. ``r`` is the blinding factor."""

    e: str
    s: str
    r: str | None = None


@dataclass(frozen=True, slots=True)
class Proof:
    """One ecash note (NUT-00 Proof)."""

    amount: int
    keyset_id: str
    secret: str
    C: str
    dleq: DLEQ | None = None
    witness: str | None = None

    def Y(self) -> str:
        """hash_to_curve(secret), compressed hex: how the mint names this proof (NUT-07)."""
        return y_hex(self.secret)

    def to_mint_json(self) -> dict[str, object]:
        """The proof as a swap/melt input; the DLEQ is for wallets, not for the mint."""
        out: dict[str, object] = {
            "amount": self.amount,
            "id": self.keyset_id,
            "secret": self.secret,
            "C": self.C,
        }
        if self.witness is not None:
            out["witness"] = self.witness
        return out


@dataclass(frozen=True, slots=True)
class Token:
    """Proofs of one mint in one unit, with an optional memo."""

    mint: str
    unit: str
    proofs: tuple[Proof, ...]
    memo: str | None = None

    @property
    def amount(self) -> int:
        """Face value: the sum of the proofs' amounts, in ``unit``."""
        return sum(p.amount for p in self.proofs)


@lru_cache(maxsize=4096)
def y_hex(secret: str) -> str:
    """Y = hash_to_curve(secret), compressed hex: the id of a proof at the mint (NUT-07).

    Cached because one proof is looked up several times within one payment (hash,
    state, store); a few thousand entries cover the payments in flight, and memory stays
    flat however long the bot runs.
    """
    return str(hash_to_curve(secret.encode("utf-8")).format().hex())


# --- parsing ---------------------------------------------------------------------------


def parse_token(text: str, *, max_len: int = 64_000, max_proofs: int = 256) -> Token:
    """Parse a ``cashuA`` (V3) or ``cashuB`` (V4) token; :class:`MalformedToken` if it isn't one.

    Surrounding whitespace and a ``cashu:`` URI prefix are accepted, and base64 in either
    alphabet, padded or not. A V3 token with proofs of several mints is an
    :class:`UnsupportedToken`. Short (V4) keyset ids are kept: see :func:`expand_keyset_ids`.
    """
    if not isinstance(text, str):
        raise MalformedToken("a token is text")
    if len(text) > max_len:
        raise MalformedToken(f"the token is longer than {max_len} characters")
    s = text.strip()
    if s[:6].lower() == "cashu:":
        s = s[6:].removeprefix("//").lstrip()
    if s.startswith("cashuA"):
        return _parse_v3(_json_loads(_b64decode(s[6:], "the token")), max_proofs)
    if s.startswith("cashuB"):
        return _parse_v4(_cbor_loads(_b64decode(s[6:], "the token"), "the token"), max_proofs)
    raise MalformedToken("not a Cashu token: it must start with cashuA or cashuB")


def token_from_proofs(
    mint: str, unit: str, proofs_json: Sequence[str], *, max_proofs: int = 256
) -> Token:
    """A token from loose NUT-00 proofs, one JSON object each, as a NIP-61 nutzap (kind
    9321) carries them in its ``proof`` tags; :class:`MalformedToken` if they aren't."""
    if not proofs_json:
        raise MalformedToken("no proofs")
    if len(proofs_json) > max_proofs:
        raise MalformedToken(f"more than {max_proofs} proofs")
    proofs = [_proof_from_json(_json_loads(p.encode("utf-8"))) for p in proofs_json]
    return _token(_mint_url(mint), unit, proofs, None)


def _b64decode(data: str, what: str, error: type[MalformedToken] = MalformedToken) -> bytes:
    """Decode base64 in the URL-safe or the standard alphabet, with or without padding."""
    if not _BASE64.fullmatch(data):
        raise error(f"{what} is not base64")
    body = data.rstrip("=")
    if len(body) % 4 == 1:
        raise error(f"{what} is not base64 (truncated?)")
    try:
        return base64.urlsafe_b64decode(body.translate(_TO_URLSAFE) + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise error(f"{what} is not base64") from None


def _cbor_loads(data: bytes, what: str, error: type[MalformedToken] = MalformedToken) -> object:
    """Decode exactly one CBOR item; anything wrong (also trailing bytes) is ``error``."""
    fp = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(fp).decode()
    # cbor2 raises its own errors, but its tag decoders also raise ValueError,
    # OverflowError, decimal errors...: none of them may reach the payer's handler.
    except Exception:
        raise error(f"{what} is not valid CBOR") from None
    if fp.tell() != len(data):
        raise error(f"{what} has extra bytes after its end")
    return obj


def _json_loads(data: bytes) -> object:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedToken("the token is not valid JSON") from None


def _parse_v3(obj: object, max_proofs: int) -> Token:
    if not isinstance(obj, dict):
        raise MalformedToken("a cashuA token is a JSON object")
    entries = obj.get("token")
    if not isinstance(entries, list) or not entries:
        raise MalformedToken("a cashuA token needs a non-empty 'token' list")
    mint: str | None = None
    mint_key = ""
    proofs: list[Proof] = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise MalformedToken("each entry of 'token' is an object with 'mint' and 'proofs'")
        url = _mint_url(entry.get("mint"))
        key = normalize_mint_url(url)
        if mint is None:
            mint, mint_key = url, key
        elif key != mint_key:
            raise UnsupportedToken("the token holds proofs of several mints: send one per mint")
        items = entry.get("proofs")
        if not isinstance(items, list):
            raise MalformedToken("'proofs' must be a list")
        if len(proofs) + len(items) > max_proofs:
            raise MalformedToken(f"the token holds more than {max_proofs} proofs")
        proofs.extend(_proof_from_json(p) for p in items)
    assert mint is not None  # entries is not empty
    unit = obj.get("unit")
    return _token(
        mint, "sat" if unit is None else _text(unit, "unit"), proofs, _memo(obj.get("memo"))
    )


def _parse_v4(obj: object, max_proofs: int) -> Token:
    if not isinstance(obj, dict):
        raise MalformedToken("a cashuB token is a CBOR map")
    mint = _mint_url(_get(obj, "m"))
    unit = _text(_get(obj, "u"), "unit (u)")
    groups = _get(obj, "t")
    if not isinstance(groups, list) or not groups:
        raise MalformedToken("a cashuB token needs a non-empty list 't'")
    proofs: list[Proof] = []
    for group in groups:
        if not isinstance(group, dict):
            raise MalformedToken("each entry of 't' is a map with 'i' and 'p'")
        raw_id = _get(group, "i")
        if not isinstance(raw_id, bytes) or len(raw_id) not in (8, 33):
            raise MalformedToken("a keyset id (i) must be 8 or 33 bytes")
        keyset_id = raw_id.hex()
        items = _get(group, "p")
        if not isinstance(items, list):
            raise MalformedToken("'p' must be a list of proofs")
        if len(proofs) + len(items) > max_proofs:
            raise MalformedToken(f"the token holds more than {max_proofs} proofs")
        for p in items:
            if not isinstance(p, dict):
                raise MalformedToken("a proof is a map")
            proofs.append(
                Proof(
                    amount=_amount(_get(p, "a")),
                    keyset_id=keyset_id,
                    secret=_secret(_get(p, "s")),
                    C=_point_bytes(_get(p, "c"), "C (c)"),
                    dleq=_dleq_v4(_get(p, "d")),
                    witness=_witness(_get(p, "w")),
                )
            )
    return _token(mint, unit, proofs, _memo(_get(obj, "d")))


def _proof_from_json(p: object) -> Proof:
    """A proof in the JSON form of NUT-00 (as in V3 tokens and NUT-18 payloads)."""
    if not isinstance(p, dict):
        raise MalformedToken("a proof is an object")
    dleq = p.get("dleq")
    if dleq is not None:
        if not isinstance(dleq, dict):
            raise MalformedToken("a proof's 'dleq' is an object with e, s and r")
        r = dleq.get("r")
        dleq = DLEQ(
            e=_scalar_hex(dleq.get("e"), "DLEQ e"),
            s=_scalar_hex(dleq.get("s"), "DLEQ s"),
            r=None if r is None else _scalar_hex(r, "DLEQ r"),
        )
    C = p.get("C")
    if not isinstance(C, str) or not _PUBKEY_HEX.fullmatch(C):
        raise MalformedToken("a proof's C must be a compressed public key in hex (66 chars)")
    return Proof(
        amount=_amount(p.get("amount")),
        keyset_id=_keyset_id(p.get("id")),
        secret=_secret(p.get("secret")),
        C=C.lower(),
        dleq=dleq,
        witness=_witness(p.get("witness")),
    )


def _token(mint: str, unit: str, proofs: list[Proof], memo: str | None) -> Token:
    if not proofs:
        raise MalformedToken("the token holds no proofs")
    if sum(p.amount for p in proofs) > MAX_AMOUNT:
        raise MalformedToken("the token's amounts add up to more than any real token holds")
    if not unit:
        raise MalformedToken("the token's unit is empty")
    return Token(mint=mint, unit=unit, proofs=tuple(proofs), memo=memo)


def _get(obj: Mapping[object, object], key: str) -> object:
    # CBOR has two "no value"s; some encoders write undefined for an absent field.
    value = obj.get(key)
    return None if value is cbor2.undefined else value


def _text(value: object, what: str, error: type[MalformedToken] = MalformedToken) -> str:
    if not isinstance(value, str):
        raise error(f"{what} must be a string")
    try:
        value.encode("utf-8")  # JSON can carry lone surrogates; nothing downstream can
    except UnicodeEncodeError:
        raise error(f"{what} is not valid Unicode") from None
    return value


def _memo(value: object) -> str | None:
    if value is None:
        return None
    return _text(value, "memo") or None


def _secret(value: object) -> str:
    secret = _text(value, "a proof's secret")
    if not secret:
        raise MalformedToken("a proof's secret is empty")
    if len(secret) > MAX_SECRET_LEN:
        raise UnsupportedToken(f"a proof's secret is longer than {MAX_SECRET_LEN} characters")
    return secret


def _witness(value: object) -> str | None:
    if value is None:
        return None
    return _text(value, "a proof's witness") or None


def _amount(value: object) -> int:
    # bool is an int in Python; a JSON true must not be worth 1 sat.
    if type(value) is not int:
        raise MalformedToken("a proof's amount must be an integer")
    if value <= 0 or value > MAX_AMOUNT or value & (value - 1):
        raise MalformedToken(f"a proof's amount must be a power of two, not {value}")
    return value


def _keyset_id(value: object) -> str:
    if isinstance(value, str):
        if _HEX_KEYSET_ID.fullmatch(value):
            return value.lower()
        if _LEGACY_KEYSET_ID.fullmatch(value):
            return value
    raise MalformedToken("a proof's keyset id must be 16 or 66 hex characters")


def _scalar_hex(value: object, what: str) -> str:
    if not isinstance(value, str) or not _SCALAR_HEX.fullmatch(value):
        raise MalformedToken(f"{what} must be 32 bytes in hex")
    return value.lower()


def _point_bytes(value: object, what: str) -> str:
    if not isinstance(value, bytes) or len(value) != 33 or value[0] not in (2, 3):
        raise MalformedToken(f"{what} must be a 33-byte compressed public key")
    return value.hex()


def _scalar_bytes(value: object, what: str) -> str:
    if not isinstance(value, bytes) or len(value) != 32:
        raise MalformedToken(f"{what} must be 32 bytes")
    return value.hex()


def _dleq_v4(value: object) -> DLEQ | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MalformedToken("a proof's DLEQ (d) is a map with e, s and r")
    r = _get(value, "r")
    return DLEQ(
        e=_scalar_bytes(_get(value, "e"), "DLEQ e"),
        s=_scalar_bytes(_get(value, "s"), "DLEQ s"),
        r=None if r is None else _scalar_bytes(r, "DLEQ r"),
    )


def _mint_url(value: object) -> str:
    url = _text(value, "the mint URL")
    try:
        normalize_mint_url(url)
    except InvalidMintUrl as e:
        raise MalformedToken(f"the token's mint URL is not usable: {e.message}") from None
    return url


# --- writing ---------------------------------------------------------------------------


def encode_token(token: Token) -> str:
    """Serialize as a V4 ``cashuB`` token, with DLEQs, v2 keyset ids in their short form.

    A DLEQ without ``r`` is left out: no receiver could verify it.

    Raises :class:`UnsupportedToken` for a legacy base64 keyset id (V4 can't carry one)
    and ``ValueError`` if a hex field isn't hex: a :class:`Token` we built is never so.
    """
    groups: dict[str, list[dict[str, object]]] = {}
    for p in token.proofs:
        proof: dict[str, object] = {"a": p.amount, "s": p.secret, "c": bytes.fromhex(p.C)}
        # Without r a receiver can't check the DLEQ, and nutshell refuses a token whose
        # DLEQ lacks r: leave such a DLEQ out.
        if p.dleq is not None and p.dleq.r is not None:
            proof["d"] = {
                "e": bytes.fromhex(p.dleq.e),
                "s": bytes.fromhex(p.dleq.s),
                "r": bytes.fromhex(p.dleq.r),
            }
        if p.witness:
            proof["w"] = p.witness
        groups.setdefault(p.keyset_id, []).append(proof)
    obj: dict[str, object] = {
        "t": [{"i": bytes.fromhex(_v4_keyset_id(k)), "p": ps} for k, ps in groups.items()]
    }
    # The key order of the NUT-00 vectors and of nutshell: t, d, m, u.
    if token.memo:
        obj["d"] = token.memo
    obj["m"] = token.mint
    obj["u"] = token.unit
    return "cashuB" + base64.urlsafe_b64encode(cbor2.dumps(obj)).decode("ascii").rstrip("=")


def _v4_keyset_id(keyset_id: str) -> str:
    # NUT-02: a V4 token names a v2 keyset ("01" + 32 bytes) by its first 8 bytes, as
    # nutshell's wallet writes it; nutshell expands only "01"-prefixed short ids, so
    # ids of other (future) versions travel in full, which decoders must accept.
    if not _HEX_KEYSET_ID.fullmatch(keyset_id):
        raise UnsupportedToken(f"keyset id {keyset_id!r} is not hex: a cashuB token can't hold it")
    if len(keyset_id) == 66 and keyset_id.startswith("01"):
        return keyset_id[:16]
    return keyset_id


# --- keyset ids ------------------------------------------------------------------------


def expand_keyset_ids(token: Token, mint_keyset_ids: Iterable[str]) -> Token:
    """Replace short keyset ids with the mint's full ids; :class:`UnknownKeyset` if unsure.

    An id the mint has is kept. A 16-hex id that starts exactly one of the mint's
    longer ids becomes that id; one that starts none, or several, is refused.
    """
    known = list(dict.fromkeys(mint_keyset_ids))
    exact = set(known)
    resolved: dict[str, str] = {}
    for kid in {p.keyset_id for p in token.proofs}:
        if kid in exact:
            resolved[kid] = kid
            continue
        if len(kid) == 16 and _HEX_KEYSET_ID.fullmatch(kid):
            matches = [k for k in known if len(k) > 16 and k.lower().startswith(kid.lower())]
            if len(matches) == 1:
                resolved[kid] = matches[0]
                continue
            if matches:
                raise UnknownKeyset(f"short keyset id {kid} is ambiguous at this mint")
        raise UnknownKeyset(f"keyset {kid[:70]} is not one of this mint's keysets")
    if all(k == v for k, v in resolved.items()):
        return token
    proofs = tuple(replace(p, keyset_id=resolved[p.keyset_id]) for p in token.proofs)
    return replace(token, proofs=proofs)


# --- text and URLs ---------------------------------------------------------------------


def find_token(text: str) -> tuple[str, str] | None:
    """Find the first cashuA/cashuB token in free text: ``(token, text without it)``.

    A ``cashu:`` URI prefix goes with the token. Nothing is decoded here.
    """
    m = _TOKEN_IN_TEXT.search(text)
    if m is None:
        return None
    before, after = text[: m.start()], text[m.end() :]
    before = _URI_PREFIX.sub("", before)
    gap = before[len(before.rstrip()) :] + after[: len(after) - len(after.lstrip())]
    before, after = before.rstrip(), after.lstrip()
    sep = ("\n" if "\n" in gap else " ") if before and after else ""
    return m.group(0), (before + sep + after).strip()


def normalize_mint_url(url: str) -> str:
    """The form of a mint URL used to compare it with the allow-list.

    Lowercase scheme and host, no default port, no trailing ``/``; the path is kept.
    Anything but a plain http(s) URL is an :class:`InvalidMintUrl`.
    """
    if not isinstance(url, str):
        raise InvalidMintUrl("a mint URL is text")
    u = url.strip()
    shown = u[:100]
    if not u or len(u) > 2048 or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in u):
        raise InvalidMintUrl(f"not a mint URL: {shown!r}")
    try:
        parts = urlsplit(u)
        port = parts.port
    except ValueError:
        raise InvalidMintUrl(f"not a mint URL: {shown!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidMintUrl(f"a mint URL starts with https:// or http://: {shown!r}")
    if parts.username is not None or parts.password is not None:
        raise InvalidMintUrl(f"a mint URL has no user or password: {shown!r}")
    if parts.query or parts.fragment:
        raise InvalidMintUrl(f"a mint URL has no query or fragment: {shown!r}")
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal; urlsplit dropped its brackets
        try:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            raise InvalidMintUrl(f"not a mint URL: {shown!r}") from None
    else:
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise InvalidMintUrl(f"not a mint URL: {shown!r}") from None
        if not _HOST.fullmatch(host):
            raise InvalidMintUrl(f"a mint URL needs a host name: {shown!r}")
    default_port = 443 if scheme == "https" else 80
    netloc = host if port in (None, default_port) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"
