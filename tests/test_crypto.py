"""Blind signatures and DLEQ (mint_client.crypto) agree with nutshell's reference (b_dhke).

Our arithmetic works on coincurve directly, for speed; nutshell's ``b_dhke`` is what the
mint itself runs, so each result is checked against it, for random keys and secrets.
"""

from __future__ import annotations

from cashu.core.crypto import b_dhke
from cashu.core.crypto.secp import PrivateKey, PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from mint_client import crypto
from mint_client.tokens import DLEQ, Proof

scalars = st.binary(min_size=32, max_size=32).filter(
    lambda b: 0 < int.from_bytes(b, "big") < b_dhke.SECP256K1_N
)
secrets_ = st.text(min_size=1, max_size=80)


@settings(max_examples=60, deadline=None)
@given(a=scalars, r=scalars, secret=secrets_)
def test_blind_sign_unblind_and_dleq_match_nutshell(a: bytes, r: bytes, secret: str) -> None:
    mint_key = PrivateKey(a)
    A = mint_key.public_key.format().hex()
    out = crypto.blind(secret, r, 8, "00ad268c4d1f5826", None)
    B_ref, _ = b_dhke.step1_alice(secret, PrivateKey(r))
    assert out.B_ == B_ref.format().hex()

    C_, e, s = b_dhke.step2_bob(B_ref, mint_key)
    C_hex, e_hex, s_hex = C_.format().hex(), e.to_hex(), s.to_hex()
    assert crypto.verify_signature_dleq(out, C_hex, e_hex, s_hex, A)
    assert not crypto.verify_signature_dleq(out, C_hex, s_hex, e_hex, A)  # e and s swapped
    other = PrivateKey(bytes(31) + b"\x07").public_key.format().hex()
    assert not crypto.verify_signature_dleq(out, C_hex, e_hex, s_hex, other)

    proof = crypto.unblind(out, C_hex, A, (e_hex, s_hex))
    assert proof.C == b_dhke.step3_alice(C_, PrivateKey(r), mint_key.public_key).format().hex()
    assert b_dhke.verify(mint_key, _point(proof.C), secret)  # the mint accepts it
    assert crypto.verify_proof_dleq(proof, A)
    assert not crypto.verify_proof_dleq(
        Proof(proof.amount, proof.keyset_id, secret + "x", proof.C, proof.dleq), A
    )
    assert not crypto.verify_proof_dleq(proof, other)


def _point(hex_point: str) -> PublicKey:
    return PublicKey(bytes.fromhex(hex_point))


def test_dleq_checks_refuse_garbage_without_raising() -> None:
    out = crypto.blind("s", bytes(31) + b"\x01", 1, "00ad268c4d1f5826", None)
    g = PrivateKey(bytes(31) + b"\x02").public_key.format().hex()
    assert not crypto.verify_signature_dleq(out, g, "00" * 32, "00" * 32, g)  # zero scalars
    assert not crypto.verify_signature_dleq(out, g, "zz", "01", g)
    assert not crypto.verify_signature_dleq(out, "02" + "00" * 32, "01" * 32, "01" * 32, g)
    no_r = Proof(1, "00ad268c4d1f5826", "s", g, DLEQ(e="01" * 32, s="01" * 32, r=None))
    assert not crypto.verify_proof_dleq(no_r, g)
    bad = Proof(1, "00ad268c4d1f5826", "s", g, DLEQ(e="01" * 32, s="01" * 32, r="ff" * 32))
    assert not crypto.verify_proof_dleq(bad, g)
