"""Reading DMs and writing replies: pure, no relay."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.dm import error_text, parse_dm, split_message
from bot.errors import PaymentRequired, UntrustedMint
from mint_client.errors import MalformedToken
from mint_client.requests import PaymentPayload
from mint_client.tokens import Proof, Token, encode_token

PROOF = Proof(
    amount=8,
    keyset_id="00ad268c4d1f5826",
    secret="acc12435e7b8484c3cf1850149218af90f716a52bf4a5ed347e48ecc13f77388",
    C="0244538319de485d55bed3b29a642bee5879375ab9e7a620e11e48ba482421f3cf",
    dleq=None,
)
TOKEN = encode_token(Token(mint="http://127.0.0.1:3338", unit="sat", proofs=(PROOF,)))


def test_token_and_question_in_any_order() -> None:
    for text in (
        f"{TOKEN} why is the sky blue?",
        f"why is the sky blue?\n{TOKEN}",
        f"why is the sky blue?{chr(10)}{TOKEN}{chr(10)}",
    ):
        req = parse_dm(text)
        assert req.command == "ask"
        assert req.token == TOKEN
        assert req.question == "why is the sky blue?"


def test_commands() -> None:
    assert parse_dm("/help").command == "help"
    assert parse_dm("  /price ").command == "price"
    req = parse_dm(f"/model gemini-2.5-flash-lite what is ecash? {TOKEN}")
    assert (req.model, req.question, req.token) == (
        "gemini-2.5-flash-lite",
        "what is ecash?",
        TOKEN,
    )


def test_no_token_is_an_unpaid_question() -> None:
    req = parse_dm("what is cashu?")
    assert req.token is None and req.payload is None and req.question == "what is cashu?"


def test_nut18_payment_payload() -> None:
    from bot.dm import payload_json

    payload = PaymentPayload(
        id="abc", memo="what is a mint?", mint="http://127.0.0.1:3338", unit="sat", proofs=(PROOF,)
    )
    req = parse_dm(payload_json(payload))
    assert req.payload is not None
    assert req.question == "what is a mint?"
    assert req.payload.proofs[0].secret == PROOF.secret


def test_broken_payload_is_a_token_error() -> None:
    with pytest.raises(MalformedToken):
        parse_dm('{"id": "x", "proofs": "nope"}')


@given(st.text(min_size=0, max_size=3000), st.integers(64, 2000))
def test_split_keeps_the_text_and_fits(text: str, limit: int) -> None:
    parts = split_message(text, limit)
    assert all(len(p.encode()) <= limit for p in parts)
    if len(parts) == 1:
        assert parts[0] == text
    else:
        n = len(parts)
        rebuilt = "".join(p.split(") ", 1)[1] for p in parts)
        assert rebuilt == text
        assert parts[0].startswith(f"(1/{n}) ")


def test_a_30kb_answer_is_split_in_numbered_parts() -> None:
    parts = split_message("word " * 12_000)
    assert len(parts) == 3
    assert [p[:6] for p in parts] == ["(1/3) ", "(2/3) ", "(3/3) "]


def test_error_texts_say_whether_the_token_was_spent() -> None:
    assert "not spent" in error_text(UntrustedMint("mint x is not accepted here"))
    text = error_text(PaymentRequired("costs 12 sat", amount_sat=12, payment_request="creqAxyz"))
    assert "12 sat" in text and "creqAxyz" in text
