"""Blind signatures (NUT-00), DLEQ (NUT-12) and deterministic secrets (NUT-13).

A typed face over nutshell's ``cashu.core.crypto`` (which has no import side effects,
unlike the rest of nutshell). Keys and points travel as hex strings.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
from dataclasses import dataclass
from functools import lru_cache

from bip32 import BIP32  # type: ignore[import-untyped]
from cashu.core.crypto import b_dhke
from cashu.core.crypto.secp import PrivateKey, PublicKey

from mint_client.tokens import DLEQ, Proof, y_hex


def _pub(hex_point: str) -> PublicKey:
    return PublicKey(bytes.fromhex(hex_point))


# Point arithmetic on coincurve directly. nutshell's b_dhke takes its scalars as
# ``PrivateKey`` objects, and coincurve computes two public keys (k*G, and x-only k*G)
# for each one made, needed or not: about 60 us apiece, 46 of them per swap of 7 outputs.
# Here a scalar stays 32 bytes and only the products the formulas use are computed.


def _times_g(k: bytes) -> PublicKey:
    """k*G."""
    return PublicKey.from_secret(k)


def _plus(p: PublicKey, q: PublicKey) -> PublicKey:
    """p + q (ValueError when it is the point at infinity)."""
    return PublicKey.combine_keys([p, q])


def _minus(p: PublicKey, q: PublicKey) -> PublicKey:
    """p - q (ValueError when it is the point at infinity)."""
    c = q.format()
    return _plus(p, PublicKey(bytes([c[0] ^ 1]) + c[1:]))


def _alice_dleq_ok(B_: PublicKey, C_: PublicKey, e: bytes, s: bytes, A: PublicKey) -> bool:
    """NUT-12: R1 = s*G - e*A, R2 = s*B' - e*C', and e == hash(R1, R2, A, C')."""
    R1 = _minus(_times_g(s), A.multiply(e))
    R2 = _minus(B_.multiply(s), C_.multiply(e))
    return bool(e == b_dhke.hash_e(R1, R2, A, C_))


#: Y = hash_to_curve(secret), compressed hex (one cached implementation, in tokens)
hash_to_curve_hex = y_hex


@dataclass(frozen=True, slots=True)
class BlindedOutput:
    """An output we asked the mint to sign, with what we need to unblind it."""

    amount: int
    keyset_id: str
    secret: str
    r: bytes
    B_: str
    counter: int | None = None

    def to_mint_json(self) -> dict[str, object]:
        """The BlindedMessage the mint's API takes."""
        return {"amount": self.amount, "id": self.keyset_id, "B_": self.B_}


def blind(secret: str, r: bytes, amount: int, keyset_id: str, counter: int | None) -> BlindedOutput:
    """B_ = Y + r*G for ``secret`` with blinding factor ``r``."""
    B_ = _plus(_pub(y_hex(secret)), _times_g(r))
    return BlindedOutput(
        amount=amount,
        keyset_id=keyset_id,
        secret=secret,
        r=r,
        B_=B_.format().hex(),
        counter=counter,
    )


def verify_signature_dleq(output: BlindedOutput, C_: str, e: str, s: str, A: str) -> bool:
    """Check the mint's DLEQ on a blind signature it returned to us (NUT-12, Alice)."""
    try:
        return _alice_dleq_ok(
            _pub(output.B_), _pub(C_), bytes.fromhex(e), bytes.fromhex(s), _pub(A)
        )
    except (ValueError, TypeError):
        return False


def unblind(output: BlindedOutput, C_: str, A: str, dleq: tuple[str, str] | None) -> Proof:
    """C = C_ - r*A: turn the mint's blind signature into a proof we can spend or give."""
    C = _minus(_pub(C_), _pub(A).multiply(output.r))
    return Proof(
        amount=output.amount,
        keyset_id=output.keyset_id,
        secret=output.secret,
        C=C.format().hex(),
        dleq=DLEQ(e=dleq[0], s=dleq[1], r=output.r.hex()) if dleq else None,
    )


def verify_proof_dleq(proof: Proof, A: str) -> bool:
    """Check a proof's own DLEQ (NUT-12, Carol): the mint with key ``A`` really signed it.

    B' = Y + r*G and C' = C + r*A rebuild what the mint signed; then Alice's check. A
    proof that fails it is tried once more by nutshell's own check, which also knows the
    hash-to-curve of mints before nutshell 0.15.
    """
    d = proof.dleq
    if d is None or d.r is None:
        return False
    try:
        r = bytes.fromhex(d.r)
        A_ = _pub(A)
        B_ = _plus(_pub(y_hex(proof.secret)), _times_g(r))
        C_ = _plus(_pub(proof.C), A_.multiply(r))
        if _alice_dleq_ok(B_, C_, bytes.fromhex(d.e), bytes.fromhex(d.s), A_):
            return True
        return bool(
            b_dhke.carol_verify_dleq(
                secret_msg=proof.secret,
                r=PrivateKey(r),
                C=_pub(proof.C),
                e=PrivateKey(bytes.fromhex(d.e)),
                s=PrivateKey(bytes.fromhex(d.s)),
                A=A_,
            )
        )
    except (ValueError, TypeError):
        return False


def derive_secret(seed: bytes, keyset_id: str, counter: int) -> tuple[str, bytes]:
    """NUT-13: the secret and blinding factor for ``counter`` in ``keyset_id``.

    Version-01 keysets use the HMAC-SHA256 derivation; older hex keysets BIP32. Both are
    what nutshell and cashu-ts do, so another NUT-13 wallet holding the seed can restore.
    """
    if keyset_id.startswith("01"):
        base = (
            b"Cashu_KDF_HMAC_SHA256"
            + bytes.fromhex(keyset_id)
            + counter.to_bytes(8, byteorder="big", signed=False)
        )
        secret = hmac.new(seed, base + b"\x00", hashlib.sha256).digest()
        r = hmac.new(seed, base + b"\x01", hashlib.sha256).digest()
        return secret.hex(), r
    keyset_int = int.from_bytes(bytes.fromhex(keyset_id), "big") % (2**31 - 1)
    path = f"m/129372'/0'/{keyset_int}'/{counter}'"
    node = _bip32(seed)
    secret = node.get_privkey_from_path(f"{path}/0")
    r = node.get_privkey_from_path(f"{path}/1")
    return bytes(secret).hex(), bytes(r)


@lru_cache(maxsize=4)
def _bip32(seed: bytes) -> BIP32:
    return BIP32.from_seed(seed)


def split_amount(amount: int) -> list[int]:
    """The powers of two that sum to ``amount`` (its binary decomposition), ascending."""
    if amount < 0:
        raise ValueError("amount must be non-negative")
    return [1 << i for i in range(amount.bit_length()) if amount >> i & 1]


def change_friendly_split(amount: int) -> list[int]:
    """Denominations summing to ``amount`` from which every value 0..amount can be paid.

    1, 2, 4, ..., 2**k (all values up to 2**(k+1)-1) plus the binary decomposition of
    the rest. Swapping a payment into these lets us give exact change from the
    payment's own proofs, with no second swap and no second fee.
    """
    if amount < 0:
        raise ValueError("amount must be non-negative")
    ladder: list[int] = []
    total = 0
    while total + (1 << len(ladder)) <= amount:
        total += 1 << len(ladder)
        ladder.append(1 << (len(ladder)))
    return sorted(ladder + split_amount(amount - total))


#: most outputs one stock refill asks the mint to sign
MAX_REFILL_OUTPUTS = 400


def stock_targets(target_sat: int) -> dict[int, int]:
    """How many proofs of each small power of two a stock of ``target_sat`` should hold.

    Denominations 1 .. target/8, each holding an equal share of the value: many 1s,
    fewer large ones, since every payment's change reserves the small ones first.
    """
    if target_sat <= 0:
        return {}
    top = max(1, target_sat // 8)
    denoms = [1 << i for i in range(top.bit_length())]
    share = target_sat // len(denoms)
    return {d: max(2, share // d) for d in denoms}


def stock_split(value: int, held: list[int], target_sat: int) -> list[int]:
    """Denominations summing to ``value`` that top the stock (``held`` amounts) up first.

    The missing small proofs (see :func:`stock_targets`) are made one of each missing
    denomination per pass, smallest first, while the value and the output budget last;
    the rest is its binary decomposition.
    """
    if value < 0:
        raise ValueError("value must be non-negative")
    have: dict[int, int] = {}
    for a in held:
        have[a] = have.get(a, 0) + 1
    missing = {d: want - have.get(d, 0) for d, want in stock_targets(target_sat).items()}
    out: list[int] = []
    left = value
    added = True
    while added:
        added = False
        for d in sorted(missing):
            if missing[d] > 0 and d <= left and len(out) < MAX_REFILL_OUTPUTS:
                out.append(d)
                left -= d
                missing[d] -= 1
                added = True
    return sorted(out + split_amount(left))


def cover_counts(counts: dict[int, int], need: int) -> dict[int, int] | None:
    """How many proofs of each amount to take so that every amount 0..``need`` can be paid.

    ``counts``: amount -> proofs available. Each step takes the largest amount no bigger
    than what is covered so far plus one (so every amount stays payable, and the count
    stays near log2(need)); None when the proofs can't reach ``need``. Exact change is
    then found by :func:`select_exact` (largest first), which never
    fails on such a set.
    """
    taken: dict[int, int] = {}
    if need <= 0:
        return taken
    amounts = sorted(a for a, n in counts.items() if a > 0 and n > 0)
    covered = 0
    while covered < need:
        i = bisect.bisect_right(amounts, covered + 1) - 1
        while i >= 0 and taken.get(amounts[i], 0) >= counts[amounts[i]]:
            i -= 1
        if i < 0:
            return None
        a = amounts[i]
        taken[a] = taken.get(a, 0) + 1
        covered += a
    return taken


def select_exact(amounts: list[int], target: int) -> list[int] | None:
    """Indices of ``amounts`` summing to exactly ``target`` (greedy, largest first).

    Exact for sets made by :func:`change_friendly_split`; None when greedy finds none.
    """
    order = sorted(range(len(amounts)), key=lambda i: amounts[i], reverse=True)
    chosen: list[int] = []
    left = target
    for i in order:
        if amounts[i] <= left:
            chosen.append(i)
            left -= amounts[i]
    return chosen if left == 0 else None
