"""Cashu tokens: the NUT-00/NUT-12 vectors, nutshell agreeing both ways, and fuzzing."""

from __future__ import annotations

import base64
import json
import os
import sys
import warnings
from functools import cache
from types import ModuleType
from typing import Any

import cbor2
import pytest
from cashu.core.crypto import b_dhke
from cashu.core.crypto.keys import derive_keyset_short_id
from cashu.core.crypto.secp import PrivateKey, PublicKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mint_client.errors import (
    InvalidMintUrl,
    MalformedToken,
    TokenError,
    UnknownKeyset,
    UnsupportedToken,
    UntrustedMint,
)
from mint_client.tokens import (
    DLEQ,
    Proof,
    Token,
    encode_token,
    expand_keyset_ids,
    find_token,
    normalize_mint_url,
    parse_token,
)


@cache
def nutshell() -> ModuleType:
    """nutshell's ``cashu.core.base``, imported without keeping its side effects.

    Its settings module reads .env files into os.environ and sets sys.tracebacklimit.
    """
    env = dict(os.environ)
    had_limit = hasattr(sys, "tracebacklimit")
    limit: int = getattr(sys, "tracebacklimit", 1000)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from cashu.core import base
    finally:
        os.environ.clear()
        os.environ.update(env)
        if had_limit:
            sys.tracebacklimit = limit
        elif hasattr(sys, "tracebacklimit"):
            del sys.tracebacklimit
    return base


# --- NUT-00 vectors (cashubtc/nuts tests/00-tests.md) ---------------------------------

V3 = (
    "cashuAeyJ0b2tlbiI6W3sibWludCI6Imh0dHBzOi8vODMzMy5zcGFjZTozMzM4IiwicHJvb2ZzIjpbeyJhbW91"
    "bnQiOjIsImlkIjoiMDA5YTFmMjkzMjUzZTQxZSIsInNlY3JldCI6IjQwNzkxNWJjMjEyYmU2MWE3N2UzZTZkMmFl"
    "YjRjNzI3OTgwYmRhNTFjZDA2YTZhZmMyOWUyODYxNzY4YTc4MzciLCJDIjoiMDJiYzkwOTc5OTdkODFhZmIyY2M3"
    "MzQ2YjVlNDM0NWE5MzQ2YmQyYTUwNmViNzk1ODU5OGE3MmYwY2Y4NTE2M2VhIn0seyJhbW91bnQiOjgsImlkIjoi"
    "MDA5YTFmMjkzMjUzZTQxZSIsInNlY3JldCI6ImZlMTUxMDkzMTRlNjFkNzc1NmIwZjhlZTBmMjNhNjI0YWNhYTNm"
    "NGUwNDJmNjE0MzNjNzI4YzcwNTdiOTMxYmUiLCJDIjoiMDI5ZThlNTA1MGI4OTBhN2Q2YzA5NjhkYjE2YmMxZDVk"
    "NWZhMDQwZWExZGUyODRmNmVjNjlkNjEyOTlmNjcxMDU5In1dfV0sInVuaXQiOiJzYXQiLCJtZW1vIjoiVGhhbmsg"
    "eW91LiJ9"
)
V4_SINGLE = (
    "cashuBpGF0gaJhaUgArSaMTR9YJmFwgaNhYQFhc3hAOWE2ZGJiODQ3YmQyMzJiYTc2ZGIwZGYxOTcyMTZiMjlkM2I4"
    "Y2MxNDU1M2NkMjc4MjdmYzFjYzk0MmZlZGI0ZWFjWCEDhhhUP_trhpXfStS6vN6So0qWvc2X3O4NfM-Y1HISZ5Jh"
    "ZGlUaGFuayB5b3VhbXVodHRwOi8vbG9jYWxob3N0OjMzMzhhdWNzYXQ="
)
V4_MULTI = (
    "cashuBo2F0gqJhaUgA_9SLj17PgGFwgaNhYQFhc3hAYWNjMTI0MzVlN2I4NDg0YzNjZjE4NTAxNDkyMThhZjkwZjcx"
    "NmE1MmJmNGE1ZWQzNDdlNDhlY2MxM2Y3NzM4OGFjWCECRFODGd5IXVW-07KaZCvuWHk3WrnnpiDhHki6SCQh88-i"
    "YWlIAK0mjE0fWCZhcIKjYWECYXN4QDEzMjNkM2Q0NzA3YTU4YWQyZTIzYWRhNGU5ZjFmNDlmNWE1YjRhYzdiNzA4"
    "ZWIwZDYxZjczOGY0ODMwN2U4ZWVhY1ghAjRWqhENhLSsdHrr2Cw7AFrKUL9Ffr1XN6RBT6w659lNo2FhAWFzeEA1"
    "NmJjYmNiYjdjYzY0MDZiM2ZhNWQ1N2QyMTc0ZjRlZmY4YjQ0MDJiMTc2OTI2ZDNhNTdkM2MzZGNiYjU5ZDU3YWNY"
    "IQJzEpxXGeWZN5qXSmJjY8MzxWyvwObQGr5G1YCCgHicY2FtdWh0dHA6Ly9sb2NhbGhvc3Q6MzMzOGF1Y3NhdA=="
)

# NUT-12 (tests/12-tests.md): a proof with a valid DLEQ for the mint key A.
NUT12_A = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
NUT12_PROOF = Proof(
    amount=1,
    keyset_id="00882760bfa2eb41",
    secret="daf4dd00a2b68a0858a80450f52c8a7d2ccf87d375e43e216e0c571f089f63e9",
    C="024369d2d22a80ecf78f3937da9d5f30c1b9f74f0c32684d583cca0fa6a61cdcfc",
    dleq=DLEQ(
        e="b31e58ac6527f34975ffab13e70a48b6d2b0d35abc4b03f0151f09ee1a9763d4",
        s="8fbae004c59e754d71df67e392b6ae4e29293113ddc2ec86592a0431d16306d8",
        r="a6d13fcd7a18442e6076f5e1e7c887ad5de40a019824bdfa9fe740d302e8d861",
    ),
)

V2_ID = "016d1ce32977b2d8a340479336a77dc18db8da3e782c5083a6f33d70bc158056d1"
C_HEX = "02bc9097997d81afb2cc7346b5e4345a9346bd2a506eb7958598a72f0cf85163ea"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def v3(obj: object) -> str:
    return "cashuA" + b64url(json.dumps(obj).encode())


def v4(obj: object) -> str:
    return "cashuB" + b64url(cbor2.dumps(obj))


def v3_proof(**overrides: object) -> dict[str, object]:
    p: dict[str, object] = {"amount": 2, "id": "009a1f293253e41e", "secret": "s1", "C": C_HEX}
    p.update(overrides)
    return p


def v4_proof(**overrides: object) -> dict[str, object]:
    p: dict[str, object] = {"a": 2, "s": "s1", "c": bytes.fromhex(C_HEX)}
    p.update(overrides)
    return p


def v4_token(proof: dict[str, object] | None = None, **overrides: object) -> dict[str, object]:
    t: dict[str, object] = {
        "t": [{"i": bytes.fromhex("009a1f293253e41e"), "p": [proof or v4_proof()]}],
        "m": "https://mint.example",
        "u": "sat",
    }
    t.update(overrides)
    return t


def test_v3_vector() -> None:
    t = parse_token(V3)
    assert t.mint == "https://8333.space:3338"
    assert t.unit == "sat"
    assert t.memo == "Thank you."
    assert [p.amount for p in t.proofs] == [2, 8]
    assert t.amount == 10
    assert {p.keyset_id for p in t.proofs} == {"009a1f293253e41e"}
    assert t.proofs[1].C == "029e8e5050b890a7d6c0968db16bc1d5d5fa040ea1de284f6ec69d61299f671059"


@pytest.mark.parametrize("text", ["casshuA" + V3[6:], V3[6:], "", "cashuC" + V3[6:], "cashu"])
def test_v3_invalid_vectors(text: str) -> None:
    with pytest.raises(MalformedToken):
        parse_token(text)


def test_v4_vectors_parse_and_encode_back_exactly() -> None:
    single = parse_token(V4_SINGLE)
    assert single == Token(
        mint="http://localhost:3338",
        unit="sat",
        memo="Thank you",
        proofs=(
            Proof(
                amount=1,
                keyset_id="00ad268c4d1f5826",
                secret="9a6dbb847bd232ba76db0df197216b29d3b8cc14553cd27827fc1cc942fedb4e",
                C="038618543ffb6b8695df4ad4babcde92a34a96bdcd97dcee0d7ccf98d472126792",
            ),
        ),
    )
    multi = parse_token(V4_MULTI)
    assert [(p.keyset_id, p.amount) for p in multi.proofs] == [
        ("00ffd48b8f5ecf80", 1),
        ("00ad268c4d1f5826", 2),
        ("00ad268c4d1f5826", 1),
    ]
    assert multi.memo is None
    # Same key order and grouping as the spec's encoder; we emit no padding.
    assert encode_token(single) == V4_SINGLE.rstrip("=")
    assert encode_token(multi) == V4_MULTI.rstrip("=")


@pytest.mark.parametrize(
    "text",
    [
        V4_MULTI,
        V4_MULTI.rstrip("="),
        V4_MULTI.replace("-", "+").replace("_", "/"),  # standard alphabet
        f"  cashu:{V4_MULTI}\n",
        f"CASHU://{V4_MULTI}",
        f"\t{V3}  ",
    ],
)
def test_accepted_spellings(text: str) -> None:
    assert parse_token(text).proofs


def test_dleq_survives_and_still_verifies() -> None:
    token = Token(mint="https://mint.example", unit="sat", proofs=(NUT12_PROOF,))
    back = parse_token(encode_token(token))
    assert back == token
    d = back.proofs[0].dleq
    assert d is not None and d.r is not None
    assert b_dhke.carol_verify_dleq(
        secret_msg=back.proofs[0].secret,
        r=PrivateKey(bytes.fromhex(d.r)),
        C=PublicKey(bytes.fromhex(back.proofs[0].C)),
        e=PrivateKey(bytes.fromhex(d.e)),
        s=PrivateKey(bytes.fromhex(d.s)),
        A=PublicKey(bytes.fromhex(NUT12_A)),
    )


def test_v3_with_dleq_and_witness() -> None:
    p = NUT12_PROOF
    assert p.dleq is not None
    obj = {
        "token": [
            {
                "mint": "https://mint.example",
                "proofs": [
                    {
                        "amount": 1,
                        "id": p.keyset_id,
                        "secret": p.secret,
                        "C": p.C.upper(),
                        "dleq": {"e": p.dleq.e, "s": p.dleq.s, "r": p.dleq.r},
                        "witness": '{"signatures":[]}',
                    }
                ],
            }
        ]
    }
    t = parse_token(v3(obj))
    assert t.unit == "sat"  # V3 without a unit means sat
    assert t.proofs[0].C == p.C  # hex comes out lowercase
    assert t.proofs[0].dleq == p.dleq
    assert t.proofs[0].witness == '{"signatures":[]}'


def test_v3_several_mints_is_unsupported_same_mint_twice_is_merged() -> None:
    def entry(mint: str, secret: str) -> dict[str, object]:
        return {"mint": mint, "proofs": [v3_proof(secret=secret)]}

    with pytest.raises(UnsupportedToken):
        parse_token(
            v3({"token": [entry("https://a.example", "1"), entry("https://b.example", "2")]})
        )
    t = parse_token(
        v3({"token": [entry("https://a.example", "1"), entry("HTTPS://A.example/", "2")]})
    )
    assert t.mint == "https://a.example"
    assert [p.secret for p in t.proofs] == ["1", "2"]


BAD_AMOUNTS: list[object] = [True, False, 0, -2, 3, 6, 2.0, "2", None, 2**63, 2**64, [2]]


@pytest.mark.parametrize("amount", BAD_AMOUNTS)
def test_bad_amounts_v3(amount: object) -> None:
    with pytest.raises(MalformedToken):
        parse_token(
            v3({"token": [{"mint": "https://m.example", "proofs": [v3_proof(amount=amount)]}]})
        )


@pytest.mark.parametrize("amount", BAD_AMOUNTS)
def test_bad_amounts_v4(amount: object) -> None:
    with pytest.raises(MalformedToken):
        parse_token(v4(v4_token(v4_proof(a=amount))))


def test_largest_amount_is_accepted_but_not_a_larger_sum() -> None:
    assert parse_token(v4(v4_token(v4_proof(a=2**62)))).amount == 2**62
    two = v4_token()
    two["t"] = [
        {"i": bytes.fromhex("009a1f293253e41e"), "p": [v4_proof(a=2**62), v4_proof(a=2**62)]}
    ]
    with pytest.raises(MalformedToken):
        parse_token(v4(two))


@pytest.mark.parametrize(
    "field",
    [
        {"C": "04" + C_HEX[2:]},
        {"C": C_HEX[:-2]},
        {"C": "02" + "zz" * 32},
        {"C": 7},
        {"id": "009a1f29"},
        {"id": "xyz"},
        {"id": None},
        {"secret": ""},
        {"secret": 5},
        {"secret": "\ud800"},  # a lone surrogate: JSON allows it, UTF-8 does not
        {"dleq": {"e": "00" * 32}},
        {"dleq": {"e": "00" * 32, "s": "00" * 31}},
        {"dleq": "e"},
        {"witness": 5},
    ],
)
def test_bad_v3_proof_fields(field: dict[str, object]) -> None:
    token = {"token": [{"mint": "https://m.example", "proofs": [v3_proof(**field)]}]}
    with pytest.raises(MalformedToken):
        parse_token(v3(token))


@pytest.mark.parametrize(
    "token",
    [
        v4_token(v4_proof(c=C_HEX)),  # hex string instead of bytes
        v4_token(v4_proof(c=b"\x04" + bytes(32))),
        v4_token(v4_proof(c=bytes.fromhex(C_HEX)[:32])),
        v4_token(v4_proof(d={"e": bytes(32), "s": bytes(31), "r": bytes(32)})),
        v4_token(v4_proof(d=[1])),
        v4_token(v4_proof(s=b"secret")),
        v4_token(t=[{"i": bytes(7), "p": [v4_proof()]}]),
        v4_token(t=[{"i": "009a1f293253e41e", "p": [v4_proof()]}]),
        v4_token(t=[]),
        v4_token(t=[{"i": bytes(8), "p": []}]),  # no proofs at all
        v4_token(t={"i": bytes(8)}),
        v4_token(m="ftp://mint.example"),
        v4_token(m=None),
        v4_token(u=None),
        v4_token(u=""),
        v4_token(d=5),
        [v4_token()],
    ],
)
def test_bad_v4_tokens(token: object) -> None:
    with pytest.raises(MalformedToken):
        parse_token(v4(token))


def test_v4_odd_but_valid() -> None:
    # CBOR undefined counts as absent, a v2 full id may travel in full, memo "" is none.
    t = parse_token(
        v4(
            v4_token(
                v4_proof(w=cbor2.undefined, d=None),
                d="",
                t=[{"i": bytes.fromhex(V2_ID), "p": [v4_proof(w=cbor2.undefined)]}],
            )
        )
    )
    assert t.memo is None
    assert t.proofs[0].keyset_id == V2_ID
    assert t.proofs[0].witness is None


def test_secret_length_cap() -> None:
    assert parse_token(v4(v4_token(v4_proof(s="x" * 1024)))).proofs[0].secret == "x" * 1024
    with pytest.raises(UnsupportedToken):
        parse_token(v4(v4_token(v4_proof(s="x" * 1025))))


def test_dleq_without_r_is_read_but_not_written() -> None:
    t = parse_token(v4(v4_token(v4_proof(d={"e": bytes(32), "s": bytes(32)}))))
    assert t.proofs[0].dleq == DLEQ(e="00" * 32, s="00" * 32, r=None)
    assert parse_token(encode_token(t)).proofs[0].dleq is None


def test_trailing_bytes_and_garbage() -> None:
    good = cbor2.dumps(v4_token())
    with pytest.raises(MalformedToken, match="extra bytes"):
        parse_token("cashuB" + b64url(good + b"\x00"))
    for text in ["cashuB", "cashuA", "cashuB!!!!", "cashuBa", "cashuA" + b64url(b"\xff\xfe")]:
        with pytest.raises(MalformedToken):
            parse_token(text)


def test_limits() -> None:
    with pytest.raises(MalformedToken, match="longer"):
        parse_token(V4_MULTI, max_len=100)
    with pytest.raises(MalformedToken, match="more than 2 proofs"):
        parse_token(V4_MULTI, max_proofs=2)
    assert len(parse_token(V4_MULTI, max_proofs=3).proofs) == 3
    many = {"token": [{"mint": "https://m.example", "proofs": [v3_proof()] * 300}]}
    with pytest.raises(MalformedToken):
        parse_token(v3(many), max_len=10**6)


def test_proof_helpers() -> None:
    p = Proof(amount=2, keyset_id="009a1f293253e41e", secret="s1", C=C_HEX, dleq=NUT12_PROOF.dleq)
    assert p.Y() == b_dhke.hash_to_curve(b"s1").format().hex()
    assert p.Y() == nutshell().Proof(secret="s1").Y
    assert p.to_mint_json() == {"amount": 2, "id": "009a1f293253e41e", "secret": "s1", "C": C_HEX}
    w = Proof(amount=2, keyset_id="009a1f293253e41e", secret="s1", C=C_HEX, witness="{}")
    assert w.to_mint_json()["witness"] == "{}"


# --- keyset ids ------------------------------------------------------------------------


def test_v2_keyset_ids_travel_short_like_nutshell_writes_them() -> None:
    token = Token(
        mint="https://mint.example",
        unit="sat",
        proofs=(
            Proof(amount=1, keyset_id=V2_ID, secret="a", C=C_HEX),
            Proof(amount=2, keyset_id="009a1f293253e41e", secret="b", C=C_HEX),
        ),
    )
    raw = cbor2.loads(base64.urlsafe_b64decode(encode_token(token)[6:] + "=="))
    assert [g["i"].hex() for g in raw["t"]] == [
        derive_keyset_short_id(V2_ID),
        derive_keyset_short_id("009a1f293253e41e"),
    ]
    parsed = parse_token(encode_token(token))
    assert parsed.proofs[0].keyset_id == V2_ID[:16]
    assert expand_keyset_ids(parsed, ["009a1f293253e41e", V2_ID]) == token


def test_legacy_base64_keyset_id_parses_but_cannot_go_into_cashub() -> None:
    legacy = "I2yN+iRYfkzT"
    t = parse_token(v3({"token": [{"mint": "https://m.example", "proofs": [v3_proof(id=legacy)]}]}))
    assert t.proofs[0].keyset_id == legacy
    assert expand_keyset_ids(t, [legacy]) is t
    with pytest.raises(UnsupportedToken):
        encode_token(t)


def test_expand_keyset_ids() -> None:
    other_v2 = "01" + "ab" * 32
    clash = V2_ID[:16] + "00" * 25
    t = Token(
        mint="https://m.example",
        unit="sat",
        proofs=(Proof(amount=1, keyset_id=V2_ID[:16], secret="a", C=C_HEX),),
    )
    assert expand_keyset_ids(t, [other_v2, V2_ID]).proofs[0].keyset_id == V2_ID
    with pytest.raises(UnknownKeyset, match="ambiguous"):
        expand_keyset_ids(t, [V2_ID, clash])
    with pytest.raises(UnknownKeyset):
        expand_keyset_ids(t, [other_v2, "009a1f293253e41e"])
    full = Token(mint=t.mint, unit="sat", proofs=(Proof(1, V2_ID, "a", C_HEX),))
    assert expand_keyset_ids(full, [V2_ID]) is full
    with pytest.raises(UnknownKeyset):
        expand_keyset_ids(full, [other_v2])
    v1 = Token(mint=t.mint, unit="sat", proofs=(Proof(1, "009a1f293253e41e", "a", C_HEX),))
    assert expand_keyset_ids(v1, ["009a1f293253e41e", V2_ID]) is v1
    with pytest.raises(UnknownKeyset):
        expand_keyset_ids(v1, [V2_ID])


# --- nutshell agrees -------------------------------------------------------------------


def nutshell_proof(p: Proof) -> Any:
    base = nutshell()
    dleq = None
    if p.dleq is not None:
        dleq = base.DLEQWallet(e=p.dleq.e, s=p.dleq.s, r=p.dleq.r)
    return base.Proof(
        id=p.keyset_id, amount=p.amount, secret=p.secret, C=p.C, dleq=dleq, witness=p.witness
    )


def as_tuples(proofs: Any) -> list[tuple[object, ...]]:
    out = []
    for p in proofs:
        d = p.dleq
        dleq = (d.e, d.s, d.r) if d is not None else None
        kid = p.keyset_id if isinstance(p, Proof) else p.id
        out.append((kid, p.amount, p.secret, p.C, dleq, p.witness))
    return sorted(out, key=repr)


SAMPLE = Token(
    mint="https://mint.example:3338/path",
    unit="sat",
    memo="for you",
    proofs=(
        NUT12_PROOF,
        Proof(amount=8, keyset_id="009a1f293253e41e", secret="x", C=C_HEX, witness='{"a":1}'),
        Proof(amount=4, keyset_id="00882760bfa2eb41", secret="y", C=C_HEX),
    ),
)


def test_nutshell_reads_what_we_write() -> None:
    theirs = nutshell().TokenV4.deserialize(encode_token(SAMPLE))
    assert theirs.mint == SAMPLE.mint
    assert theirs.unit == "sat"
    assert theirs.memo == "for you"
    assert theirs.amount == SAMPLE.amount
    assert as_tuples(theirs.proofs) == as_tuples(SAMPLE.proofs)


def test_we_read_what_nutshell_writes() -> None:
    base = nutshell()

    def theirs(token: Token) -> Any:
        entry = base.TokenV3Token(mint=token.mint, proofs=[nutshell_proof(p) for p in token.proofs])
        return base.TokenV3(token=[entry], _memo=token.memo, _unit=token.unit)

    v3_theirs = theirs(SAMPLE)
    v4_theirs = base.TokenV4.from_tokenv3(v3_theirs)
    for text in (v3_theirs.serialize(include_dleq=False), v4_theirs.serialize(include_dleq=False)):
        ours = parse_token(text)
        assert all(p.dleq is None for p in ours.proofs)
        assert ours.amount == SAMPLE.amount
    # nutshell's V4 groups by keyset in set order: compare proofs as multisets.
    ours = parse_token(v4_theirs.serialize(include_dleq=True))
    assert (ours.mint, ours.memo, ours.unit) == (SAMPLE.mint, "for you", "sat")
    assert as_tuples(ours.proofs) == as_tuples(SAMPLE.proofs)
    # Its V3 writes DLEQs only when every proof has one.
    with_dleq = Token(mint=SAMPLE.mint, unit="usd", proofs=(NUT12_PROOF,))
    assert parse_token(theirs(with_dleq).serialize(include_dleq=True)) == with_dleq


# --- finding tokens in text ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rest"),
    [
        (f"{V4_SINGLE}", ""),
        (f"What is 2+2? {V4_SINGLE}", "What is 2+2?"),
        (f"What is 2+2?\n{V4_SINGLE}\nthanks", "What is 2+2?\nthanks"),
        (f"{V4_SINGLE}\nExplain monads", "Explain monads"),
        (f"pay cashu:{V4_SINGLE} now", "pay now"),
        (f"pay:cashu:{V4_SINGLE}", "pay:"),
        (f"question\ncashuA{V3[6:]}.", "question\n."),
    ],
)
def test_find_token(text: str, rest: str) -> None:
    found = find_token(text)
    assert found is not None
    token, left = found
    assert token in (V4_SINGLE, V3)
    assert left == rest
    assert parse_token(token).proofs


@pytest.mark.parametrize(
    "text", ["", "hello", "cashuB is nice", "I use cashuApp daily", "xcashuB" + V4_SINGLE[6:]]
)
def test_find_token_none(text: str) -> None:
    assert find_token(text) is None


# --- mint URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "norm"),
    [
        ("https://Mint.Example.com/", "https://mint.example.com"),
        ("HTTPS://mint.example.com:443//", "https://mint.example.com"),
        ("http://127.0.0.1:3338", "http://127.0.0.1:3338"),
        ("http://localhost:80/", "http://localhost"),
        ("https://mint.example/Cashu/API/", "https://mint.example/Cashu/API"),
        ("  https://mint.example  ", "https://mint.example"),
        ("http://[::1]:3338/", "http://[::1]:3338"),
        ("https://bücher.example", "https://xn--bcher-kva.example"),
    ],
)
def test_normalize_mint_url(url: str, norm: str) -> None:
    assert normalize_mint_url(url) == norm
    assert normalize_mint_url(norm) == norm


@pytest.mark.parametrize(
    "url",
    [
        "",
        "mint.example",
        "ftp://mint.example",
        "file:///etc/passwd",
        "https://",
        "https://user:pw@mint.example",
        "https://mint.example/?a=1",
        "https://mint.example/#x",
        "https://mint example",
        "https://mint.example:99999",
        "https://[zz]/",
        "https://<mint>/",
    ],
)
def test_bad_mint_urls(url: str) -> None:
    with pytest.raises(InvalidMintUrl) as info:
        normalize_mint_url(url)
    # Both a token error (untrusted mint) and a ValueError (config validation).
    assert isinstance(info.value, UntrustedMint) and isinstance(info.value, ValueError)


# --- properties ------------------------------------------------------------------------

keyset_ids = st.one_of(
    st.binary(min_size=7, max_size=7).map(lambda b: "00" + b.hex()),
    st.binary(min_size=32, max_size=32).map(lambda b: "01" + b.hex()),
)
points = st.tuples(st.sampled_from(["02", "03"]), st.binary(min_size=32, max_size=32)).map(
    lambda t: t[0] + t[1].hex()
)
scalars = st.binary(min_size=32, max_size=32).map(bytes.hex)
dleqs = st.builds(DLEQ, e=scalars, s=scalars, r=st.one_of(st.none(), scalars))
proofs = st.builds(
    Proof,
    amount=st.integers(0, 62).map(lambda k: 2**k),
    keyset_id=keyset_ids,
    secret=st.text(min_size=1, max_size=80),
    C=points,
    dleq=st.one_of(st.none(), dleqs),
    witness=st.one_of(st.none(), st.text(min_size=1, max_size=40)),
)
mints = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(["http", "https"]),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,6}){0,2}", fullmatch=True),
    st.sampled_from(["", ":3338", ":8080"]),
    st.sampled_from(["", "/cashu", "/a/b"]),
)
tokens = st.builds(
    Token,
    mint=mints,
    unit=st.sampled_from(["sat", "msat", "usd", "eur"]),
    proofs=st.lists(proofs, min_size=1, max_size=12).map(tuple),
    memo=st.one_of(st.none(), st.text(min_size=1, max_size=40)),
)


def short_form(t: Token) -> Token:
    def short(kid: str) -> str:
        return kid[:16] if kid.startswith("01") else kid

    def sent(d: DLEQ | None) -> DLEQ | None:
        return d if d is not None and d.r is not None else None

    return Token(
        mint=t.mint,
        unit=t.unit,
        memo=t.memo,
        proofs=tuple(
            Proof(p.amount, short(p.keyset_id), p.secret, p.C, sent(p.dleq), p.witness)
            for p in t.proofs
        ),
    )


@given(tokens)
def test_round_trip(token: Token) -> None:
    ids = {p.keyset_id for p in token.proofs}
    assume(len({k[:16] for k in ids}) == len(ids))  # no two ids sharing a short form
    assume(sum(p.amount for p in token.proofs) <= 2**62)
    text = encode_token(token)
    assert text.startswith("cashuB") and "=" not in text
    parsed = parse_token(text, max_len=10**6)
    # Proofs come back grouped by keyset; within a keyset, in order.
    assert sorted(parsed.proofs, key=repr) == sorted(short_form(token).proofs, key=repr)
    assert (parsed.mint, parsed.unit, parsed.memo, parsed.amount) == (
        token.mint,
        token.unit,
        token.memo,
        token.amount,
    )
    expanded = expand_keyset_ids(parsed, ids)
    assert {p.keyset_id for p in expanded.proofs} == ids
    assert encode_token(parsed) == encode_token(expanded)


def only_token_errors(text: str) -> None:
    try:
        parse_token(text)
    except TokenError:
        pass


@given(st.text(max_size=300))
def test_fuzz_text(text: str) -> None:
    only_token_errors(text)


@given(st.sampled_from(["cashuA", "cashuB"]), st.text("ABCabc012+/-_=", max_size=200))
def test_fuzz_base64(prefix: str, body: str) -> None:
    only_token_errors(prefix + body)


@given(st.sampled_from(["cashuA", "cashuB"]), st.binary(max_size=300))
def test_fuzz_bytes(prefix: str, data: bytes) -> None:
    only_token_errors(prefix + b64url(data))


KEYS = ["token", "mint", "proofs", "amount", "id", "secret", "C", "dleq", "unit", "memo"]
KEYS += ["e", "s", "r", "witness", "t", "m", "u", "d", "i", "p", "a", "c", "w"]
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=70),
    st.binary(max_size=40),
    st.just(cbor2.undefined),
)
cbor_values = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=3)), kids, max_size=6),
    ),
    max_leaves=30,
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=70)),
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=3)), kids, max_size=6),
    ),
    max_leaves=30,
)


@given(cbor_values)
def test_fuzz_cbor_shapes(obj: object) -> None:
    only_token_errors(v4(obj))


@given(json_values)
def test_fuzz_json_shapes(obj: object) -> None:
    only_token_errors(v3(obj))


def mutate(obj: object, data: st.DataObject) -> object:
    """Replace one node of ``obj`` (picked by hypothesis) with an arbitrary value."""
    if data.draw(st.integers(0, 3)) == 0 or not isinstance(obj, (dict, list)) or not obj:
        return data.draw(cbor_values)
    if isinstance(obj, dict):
        key = data.draw(st.sampled_from(sorted(obj, key=str)))
        return {**obj, key: mutate(obj[key], data)}
    i = data.draw(st.integers(0, len(obj) - 1))
    return [*obj[:i], mutate(obj[i], data), *obj[i + 1 :]]


@settings(max_examples=300)
@given(st.data())
def test_fuzz_mutated_valid_tokens(data: st.DataObject) -> None:
    base = cbor2.loads(base64.urlsafe_b64decode(encode_token(SAMPLE)[6:] + "=="))
    only_token_errors(v4(mutate(base, data)))
    v3_base = json.loads(base64.urlsafe_b64decode(V3[6:] + "=="))
    mutated = mutate(v3_base, data)
    try:
        text = v3(mutated)
    except (TypeError, ValueError):  # bytes or undefined drawn: not JSON
        return
    only_token_errors(text)
