"""NIP-61 nutzaps as data: read a kind 9321 event's tags, write the kind 7376 receipt. Pure.

The bot advertises its P2PK lock key in a kind 10019 event, so Nostr clients may send
it ecash as a nutzap: proofs locked to that key in ``proof`` tags (one JSON proof each),
the mint in ``u``, the unit in ``unit`` (default ``sat``). The bot takes a nutzap in as
income (a tip: no question, no change) and, as NIP-61 asks of a recipient, publishes a
kind 7376 history event whose public ``e`` tag marks the nutzap ``redeemed``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from mint_client.errors import MalformedToken
from mint_client.tokens import Token, token_from_proofs

KIND_NUTZAP = 9321
KIND_WALLET_HISTORY = 7376
#: the proofs one nutzap may carry (a token may carry 256; a nutzap is a tip)
MAX_NUTZAP_PROOFS = 64


@dataclass(frozen=True, slots=True)
class Nutzap:
    """One nutzap addressed to the bot."""

    event_id: str
    sender: str
    token: Token
    comment: str


def parse_nutzap(
    event_id: str,
    sender: str,
    content: str,
    tags: Sequence[Sequence[str]],
    *,
    recipient: str,
) -> Nutzap:
    """The nutzap in a kind 9321 event; :class:`MalformedToken` when it isn't one to us.

    It must name ``recipient`` (hex) in a ``p`` tag, one mint in ``u`` and hold proofs.
    Whether the mint is trusted and the proofs are locked to the bot is the wallet's
    check (it refuses before contacting any mint it does not trust).
    """
    if not any(len(t) > 1 and t[0] == "p" and t[1].lower() == recipient for t in tags):
        raise MalformedToken("the nutzap is not addressed to the bot")
    mints = {t[1] for t in tags if len(t) > 1 and t[0] == "u"}
    if len(mints) != 1:
        raise MalformedToken("a nutzap names exactly one mint in its 'u' tag")
    units = {t[1] for t in tags if len(t) > 1 and t[0] == "unit"}
    if len(units) > 1:
        raise MalformedToken("a nutzap names one unit")
    proofs = [t[1] for t in tags if len(t) > 1 and t[0] == "proof"]
    if len(proofs) > MAX_NUTZAP_PROOFS:
        raise MalformedToken(f"a nutzap may carry at most {MAX_NUTZAP_PROOFS} proofs")
    token = token_from_proofs(mints.pop(), units.pop() if units else "sat", proofs)
    return Nutzap(event_id=event_id, sender=sender, token=token, comment=content)


def history_content(amount: int, unit: str) -> str:
    """The private part of the kind 7376 receipt (encrypted to the bot itself, NIP-44)."""
    return json.dumps([["direction", "in"], ["amount", str(amount)], ["unit", unit]])


def history_tags(nutzap: Nutzap, relay_hint: str = "") -> list[list[str]]:
    """The public tags of the kind 7376 receipt: which nutzap was redeemed, and whose."""
    return [["e", nutzap.event_id, relay_hint, "redeemed"], ["p", nutzap.sender]]
