"""NUT-18 payment requests and payloads: the spec's vectors, nutshell agreeing, fuzzing."""

from __future__ import annotations

import base64
import json
import os
import sys
import warnings
from functools import cache
from types import ModuleType

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mint_client.errors import (
    MalformedPaymentRequest,
    MalformedToken,
    TokenError,
    UnsupportedToken,
)
from mint_client.requests import (
    NOSTR,
    P2PKLock,
    PaymentPayload,
    PaymentRequest,
    Transport,
    decode_payment_request,
    encode_payment_request,
    parse_payment_payload,
    payload_to_token,
)
from mint_client.tokens import DLEQ, Proof, Token, encode_token, parse_token


@cache
def nut18() -> ModuleType:
    """nutshell's ``cashu.core.nuts.nut18``, imported without keeping its side effects."""
    env = dict(os.environ)
    had_limit = hasattr(sys, "tracebacklimit")
    limit: int = getattr(sys, "tracebacklimit", 1000)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from cashu.core.nuts import nut18 as module
    finally:
        os.environ.clear()
        os.environ.update(env)
        if had_limit:
            sys.tracebacklimit = limit
        elif hasattr(sys, "tracebacklimit"):
            del sys.tracebacklimit
    return module


def cbor_of(creq: str) -> object:
    body = creq[5:]
    return cbor2.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


# --- NUT-18 vectors (cashubtc/nuts tests/18-tests.md) ---------------------------------

NPROFILE = (
    "nprofile1qqsgm6qfa3c8dtz2fvzhvfqeacmwm0e50pe3k5tfmvpjjmn0vj7m2tgpz3mhxue69uhhyetvv9ujuerpd46"
    "hxtnfduq3wamnwvaz7tmjv4kxz7fw8qenxvewwdcxzcm99uqs6amnwvaz7tmwdaejumr0ds4ljh7n"
)
NPUB = "npub1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq28spj3"

VECTORS: list[tuple[str, PaymentRequest]] = [
    (  # basic
        "creqApWF0gaNhdGVub3N0cmFheKlucHJvZmlsZTFxcXNnbTZxZmEzYzhkdHoyZnZ6aHZmcWVhY213bTBlNTBwZTNr"
        "NXRmbXZwamptbjB2ajdtMnRncHozbWh4dWU2OXVoaHlldHZ2OXVqdWVycGQ0Nmh4dG5mZHVxM3dhbW53dmF6N3Rt"
        "anY0a3h6N2Z3OHFlbnh2ZXd3ZGN4emNtOTl1cXM2YW1ud3Zhejd0bXdkYWVqdW1yMGRzNGxqaDduYWeBgmFuYjE3"
        "YWloYjdhOTAxNzZhYQphdWNzYXRhbYF3aHR0cHM6Ly84MzMzLnNwYWNlOjMzMzg",
        PaymentRequest(
            id="b7a90176",
            amount=10,
            unit="sat",
            mints=("https://8333.space:3338",),
            transports=(Transport(NOSTR, NPROFILE, (("n", "17"),)),),
        ),
    ),
    (  # complete
        "creqAqGF0gaNhdGRwb3N0YWF4G2h0dHBzOi8vYXBpLmV4YW1wbGUuY29tL3BheWFn92FpaDQ4NDBmNTFlYWEZA-hh"
        "dWNzYXRhbYF4GGh0dHBzOi8vbWludC5leGFtcGxlLmNvbWFkcFByb2R1Y3QgcHVyY2hhc2Vhc_VlbnV0MTCjYWtk"
        "UDJQS2FkeEIwM2JhZjBjM2FjMjIwMzY2YzJjMzk3YmY5MzA1NzljNDE2MzQzNTU4NGY1NzNiMTA5MTA5ODdjNTQ0"
        "YzU5ZTYxZjFhdIGCZ3B1cnBvc2Vnb2ZmbGluZQ==",
        PaymentRequest(
            id="4840f51e",
            amount=1000,
            unit="sat",
            single_use=True,
            mints=("https://mint.example.com",),
            description="Product purchase",
            transports=(Transport("post", "https://api.example.com/pay"),),
            lock=P2PKLock(
                "03baf0c3ac220366c2c397bf930579c4163435584f573b10910987c544c59e61f1",
                (("purpose", "offline"),),
            ),
        ),
    ),
    (  # HTTP transport, its "g" is CBOR undefined
        "creqApWF0gaNhdGRwb3N0YWF4H2h0dHBzOi8vYXBpLmV4YW1wbGUuY29tL3JlY2VpdmVhZ/dhaWhhMmMxMmY0NWFh"
        "GDJhdWNzYXRhbYF4GWh0dHBzOi8vY2FzaHUuZXhhbXBsZS5jb20=",
        PaymentRequest(
            id="a2c12f45",
            amount=50,
            unit="sat",
            mints=("https://cashu.example.com",),
            transports=(Transport("post", "https://api.example.com/receive"),),
        ),
    ),
    (  # nostr transport, two mints, two tags
        "creqApWF0gaNhdGVub3N0cmFheD9ucHViMXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFx"
        "cXFxcXFxcXFxcXEyOHNwajNhZ4KCYW5iMTeCYW5kOTczNWFpaGY5MmE1MWI4YWEYZGF1Y3NhdGFtgngZaHR0cHM6"
        "Ly9taW50MS5leGFtcGxlLmNvbXgZaHR0cHM6Ly9taW50Mi5leGFtcGxlLmNvbQ==",
        PaymentRequest(
            id="f92a51b8",
            amount=100,
            unit="sat",
            mints=("https://mint1.example.com", "https://mint2.example.com"),
            transports=(Transport(NOSTR, NPUB, (("n", "17"), ("n", "9735"))),),
        ),
    ),
    (  # minimal: no amount, no transport (in-band)
        "creqAo2FpaDdmNGEyYjM5YXVjc2F0YW2BeBhodHRwczovL21pbnQuZXhhbXBsZS5jb20=",
        PaymentRequest(id="7f4a2b39", unit="sat", mints=("https://mint.example.com",)),
    ),
    (  # NUT-10 lock
        "creqApWFpaGM5ZTQ1ZDJhYWEZAfRhdWNzYXRhbYF4GGh0dHBzOi8vbWludC5leGFtcGxlLmNvbWVudXQxMKNha2RQ"
        "MlBLYWR4QjAyYzNiNWJiMjdlMzYxNDU3YzkyZDkzZDc4ZGQ3M2QzZDUzNzMyMTEwYjJjZmU4YjUwZmJjMGFiYzYx"
        "NWU5YzMzMWF0gYJndGltZW91dGQzNjAw",
        PaymentRequest(
            id="c9e45d2a",
            amount=500,
            unit="sat",
            mints=("https://mint.example.com",),
            lock=P2PKLock(
                "02c3b5bb27e361457c92d93d78dd73d3d53732110b2cfe8b50fbc0abc615e9c331",
                (("timeout", "3600"),),
            ),
        ),
    ),
    (  # newer fields (mp, fr, sm) we don't use: ignored
        "creqAp2FpdXByZWZlcnJlZF9mZWVfbWV0aG9kc2FhGGRhdWNzYXRhbYF4GGh0dHBzOi8vbWludC5leGFtcGxlLmNv"
        "bWJtcPViZnICYnNtgqFibW5mYm9sdDExomJtbmZib2x0MTJibWYF",
        PaymentRequest(
            id="preferred_fee_methods",
            amount=100,
            unit="sat",
            mints=("https://mint.example.com",),
        ),
    ),
]


@pytest.mark.parametrize(("creq", "expected"), VECTORS)
def test_vectors_decode(creq: str, expected: PaymentRequest) -> None:
    assert decode_payment_request(creq) == expected


@pytest.mark.parametrize(("creq", "expected"), VECTORS[:6])
def test_vectors_encode_to_the_same_cbor(creq: str, expected: PaymentRequest) -> None:
    ours = encode_payment_request(expected)
    assert ours.startswith("creqA") and "=" not in ours
    theirs = cbor_of(creq)
    assert isinstance(theirs, dict)
    # Key order differs from the spec's encoder, the content must not; we write no
    # undefined placeholders.
    for t in theirs.get("t", []):
        if t.get("g") is cbor2.undefined:
            del t["g"]
    assert cbor_of(ours) == theirs


def test_round_trip_through_nutshell() -> None:
    req = VECTORS[1][1]
    theirs = nut18().deserialize(encode_payment_request(req))
    assert theirs.a == 1000 and theirs.s is True and theirs.nut10.k == "P2PK"
    assert theirs.t[0].a == "https://api.example.com/pay"
    assert decode_payment_request(nut18().serialize(theirs)) == req


def test_our_defaults_and_what_the_bot_sends() -> None:
    req = PaymentRequest(
        id="abc",
        amount=21,
        single_use=True,
        mints=("https://mint.example",),
        description="1 answer",
        transports=(Transport(NOSTR, NPROFILE, (("n", "17"),)),),
    )
    creq = encode_payment_request(req)
    assert cbor_of(creq) == {
        "i": "abc",
        "a": 21,
        "u": "sat",
        "s": True,
        "m": ["https://mint.example"],
        "d": "1 answer",
        "t": [{"t": "nostr", "a": NPROFILE, "g": [["n", "17"]]}],
    }
    assert decode_payment_request(f"  {creq}\n") == req
    assert encode_payment_request(PaymentRequest(unit=None)) == "creqAoA"  # empty map
    assert decode_payment_request("creqAoA") == PaymentRequest(unit=None)


LOCK_KEY = "03" + "ab" * 32


def test_a_request_locked_to_the_bots_key() -> None:
    """What the bot sends when it accepts locked tokens: ``nut10`` with its key, no tags."""
    req = PaymentRequest(
        id="abc",
        amount=21,
        single_use=True,
        mints=("https://mint.example",),
        transports=(Transport(NOSTR, NPROFILE, (("n", "17"),)),),
        lock=P2PKLock(LOCK_KEY),
    )
    creq = encode_payment_request(req)
    assert cbor_of(creq) == {
        "i": "abc",
        "a": 21,
        "u": "sat",
        "s": True,
        "m": ["https://mint.example"],
        "t": [{"t": "nostr", "a": NPROFILE, "g": [["n", "17"]]}],
        "nut10": {"k": "P2PK", "d": LOCK_KEY},
    }
    assert decode_payment_request(creq) == req
    theirs = nut18().deserialize(creq)
    assert (theirs.nut10.k, theirs.nut10.d, theirs.nut10.t) == ("P2PK", LOCK_KEY, None)
    assert decode_payment_request(nut18().serialize(theirs)) == req


def test_lock_tags_are_lists_of_strings() -> None:
    tags = (("sigflag", "SIG_INPUTS"), ("pubkeys", "02" + "cd" * 32, "03" + "ef" * 32))
    req = PaymentRequest(amount=5, lock=P2PKLock(LOCK_KEY.upper(), tags))
    obj = cbor_of(encode_payment_request(req))
    assert isinstance(obj, dict)
    assert obj["nut10"] == {"k": "P2PK", "d": LOCK_KEY.upper(), "t": [list(t) for t in tags]}
    theirs = nut18().deserialize(encode_payment_request(req))
    assert theirs.nut10.t == [list(t) for t in tags]
    # the key is read back in lower case, as locks compare it
    assert decode_payment_request(encode_payment_request(req)).lock == P2PKLock(LOCK_KEY, tags)


def creq(obj: object) -> str:
    return "creqA" + base64.urlsafe_b64encode(cbor2.dumps(obj)).decode().rstrip("=")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "creqA",
        "creqA!!!",
        "creqX" + VECTORS[0][0][5:],
        VECTORS[0][0][5:],
        creq([1]),
        creq({"a": -1}),
        creq({"a": 0}),
        creq({"a": True}),
        creq({"a": 1.5}),
        creq({"a": 2**64}),
        creq({"s": 1}),
        creq({"m": "https://mint.example"}),
        creq({"m": [1]}),
        creq({"i": b"id"}),
        creq({"t": {"t": "post"}}),
        creq({"t": [{"t": "post"}]}),
        creq({"t": [{"t": "nostr", "a": NPUB, "g": ["n", "17"]}]}),
        creq({"t": [{"t": "nostr", "a": NPUB, "g": [["n", 17]]}]}),
        creq({"nut10": {"k": "P2PK", "d": "02" + "00" * 31}}),
        creq({"nut10": {"k": "P2PK"}}),
        creq({"nut10": "P2PK"}),
        creq({}) + "AA",  # trailing bytes
        "creqA" + "x" * 20_000,
    ],
)
def test_malformed_requests(text: str) -> None:
    with pytest.raises(MalformedPaymentRequest):
        decode_payment_request(text)
    assert issubclass(MalformedPaymentRequest, MalformedToken)


def test_unsupported_requests() -> None:
    with pytest.raises(UnsupportedToken):
        decode_payment_request(creq({"nut10": {"k": "HTLC", "d": "00" * 32}}))
    with pytest.raises(UnsupportedToken):
        decode_payment_request("creqb1qqqqqq")


requests = st.builds(
    PaymentRequest,
    id=st.one_of(st.none(), st.text(max_size=20)),
    amount=st.one_of(st.none(), st.integers(1, 2**62)),
    unit=st.one_of(st.none(), st.sampled_from(["sat", "msat", "usd"])),
    single_use=st.one_of(st.none(), st.booleans()),
    mints=st.lists(st.text(min_size=1, max_size=30), max_size=3).map(tuple),
    description=st.one_of(st.none(), st.text(max_size=40)),
    transports=st.lists(
        st.builds(
            Transport,
            type=st.sampled_from(["nostr", "post"]),
            target=st.text(max_size=40),
            tags=st.lists(st.lists(st.text(max_size=5), max_size=3).map(tuple), max_size=3).map(
                tuple
            ),
        ),
        max_size=2,
    ).map(tuple),
    lock=st.one_of(
        st.none(),
        st.builds(
            P2PKLock,
            pubkey=st.binary(min_size=32, max_size=32).map(lambda b: "02" + b.hex()),
            tags=st.lists(st.lists(st.text(max_size=5), max_size=3).map(tuple), max_size=2).map(
                tuple
            ),
        ),
    ),
)


@given(requests)
def test_round_trip(req: PaymentRequest) -> None:
    assert decode_payment_request(encode_payment_request(req)) == req


KEYS = ["i", "a", "u", "s", "m", "d", "t", "g", "nut10", "k"]
values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(max_size=30),
        st.binary(max_size=20),
        st.just(cbor2.undefined),
    ),
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=2)), kids, max_size=6),
    ),
    max_leaves=25,
)


@given(values)
def test_fuzz_request_shapes(obj: object) -> None:
    try:
        decode_payment_request(creq(obj))
    except TokenError:
        pass


@given(st.text(max_size=200))
def test_fuzz_request_text(text: str) -> None:
    for t in (text, "creqA" + text):
        try:
            decode_payment_request(t)
        except TokenError:
            pass


# --- payment payloads (what a wallet sends over the nostr transport) -------------------

C_HEX = "02bc9097997d81afb2cc7346b5e4345a9346bd2a506eb7958598a72f0cf85163ea"
PROOF_JSON = {
    "id": "009a1f293253e41e",
    "amount": 8,
    "secret": "407915bc212be61a77e3e6d2aeb4c727980bda51cd06a6afc29e2861768a7837",
    "C": C_HEX,
    "dleq": {"e": "11" * 32, "s": "22" * 32, "r": "33" * 32},
}
PAYLOAD = {
    "id": "b7a90176",
    "memo": "thanks",
    "mint": "https://8333.space:3338",
    "unit": "sat",
    "proofs": [PROOF_JSON, {**PROOF_JSON, "amount": 2, "secret": "x", "dleq": None}],
}


def test_payload() -> None:
    p = parse_payment_payload(json.dumps(PAYLOAD))
    assert p == PaymentPayload(
        id="b7a90176",
        memo="thanks",
        mint="https://8333.space:3338",
        unit="sat",
        proofs=(
            Proof(
                amount=8,
                keyset_id="009a1f293253e41e",
                secret=PROOF_JSON["secret"],  # type: ignore[arg-type]
                C=C_HEX,
                dleq=DLEQ("11" * 32, "22" * 32, "33" * 32),
            ),
            Proof(amount=2, keyset_id="009a1f293253e41e", secret="x", C=C_HEX),
        ),
    )
    token = payload_to_token(p)
    assert token == Token(mint=p.mint, unit="sat", proofs=p.proofs, memo="thanks")
    assert parse_token(encode_token(token)) == token
    minimal = {k: v for k, v in PAYLOAD.items() if k not in ("id", "memo")}
    assert parse_payment_payload(json.dumps(minimal)).id is None


@pytest.mark.parametrize(
    "change",
    [
        {"mint": None},
        {"mint": "ftp://x"},
        {"unit": None},
        {"unit": ""},
        {"proofs": []},
        {"proofs": None},
        {"proofs": [{**PROOF_JSON, "amount": 3}]},
        {"proofs": [{**PROOF_JSON, "C": "zz"}]},
        {"proofs": [PROOF_JSON] * 257},
        {"id": 5},
        {"memo": ["x"]},
    ],
)
def test_bad_payloads(change: dict[str, object]) -> None:
    with pytest.raises(MalformedToken):
        parse_payment_payload(json.dumps({**PAYLOAD, **change}))


@pytest.mark.parametrize("text", ["", "[]", "null", "{", "cashuB" + "A" * 10, "[" * 100_000])
def test_payload_not_json(text: str) -> None:
    with pytest.raises(MalformedToken):
        parse_payment_payload(text, max_len=10**6)


@given(st.text(max_size=200))
def test_fuzz_payload_text(text: str) -> None:
    try:
        parse_payment_payload(text)
    except TokenError:
        pass
