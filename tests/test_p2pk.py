"""Locks (NUT-10/11): which a bot may take offline, its key, and the change stock. Pure."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from cashu.core.crypto.secp import PublicKey
from cashu.core.p2pk import verify_schnorr_signature
from hypothesis import given
from hypothesis import strategies as st

from mint_client.crypto import cover_counts, select_exact, stock_split, stock_targets
from mint_client.errors import LockRefused
from mint_client.p2pk import LockKey, check_lock, parse_lock, same_key, witness

NOW = 1_800_000_000
BOT = "02" + "ab" * 32
OTHER = "03" + "cd" * 32


def secret(kind: str = "P2PK", data: str = BOT, tags: list[list[str]] | None = None) -> str:
    body: dict[str, object] = {"nonce": "00" * 16, "data": data}
    if tags is not None:
        body["tags"] = tags
    return json.dumps([kind, body])


def check(s: str) -> object:
    return check_lock(s, BOT, now=NOW, min_lock_s=3600)


def test_a_plain_secret_is_no_lock() -> None:
    assert parse_lock("407915bc212be61a77e3e6d2aeb4c727980bda51cd06a6afc29e2861768a7837") is None
    assert parse_lock("[not json") is None
    assert check("plain") is None


def test_a_lock_to_the_bot_alone_is_taken() -> None:
    lock = check(secret(tags=[["sigflag", "SIG_INPUTS"]]))
    assert lock is not None
    assert check(secret()) is not None  # no tags: SIG_INPUTS by default
    # Schnorr sees only x: a lock to 03<x> is the bot's too (NIP-61 senders write 02)
    assert check(secret(data="03" + BOT[2:])) is not None
    # a refund path that opens late enough, and a pubkeys tag naming the bot again
    late = str(NOW + 3600)
    assert check(secret(tags=[["locktime", late], ["refund", OTHER]])) is not None
    assert check(secret(tags=[["pubkeys", BOT], ["n_sigs", "1"]])) is not None


@pytest.mark.parametrize(
    ("s", "why"),
    [
        (secret(data=OTHER), "another key"),
        (secret(kind="HTLC"), "HTLC"),
        (secret(tags=[["pubkeys", OTHER]]), "other keys"),
        (secret(tags=[["pubkeys", OTHER], ["n_sigs", "2"]]), "other keys"),
        (secret(tags=[["n_sigs", "2"]]), "multisig"),
        (secret(tags=[["sigflag", "SIG_ALL"]]), "SIG_ALL"),
        (secret(tags=[["locktime", str(NOW + 3599)], ["refund", OTHER]]), "too soon"),
        (secret(tags=[["locktime", str(NOW - 1)]]), "too soon"),  # anyone may spend it now
        (secret(tags=[["locktime", "soon"]]), "not a number"),
        (json.dumps(["P2PK", "data"]), "object"),
        (json.dumps(["P2PK", {"nonce": "00"}]), "data"),
        (json.dumps(["P2PK", {"data": BOT, "tags": [["x", 1]]}]), "list of strings"),
    ],
)
def test_locks_the_bot_cannot_take_offline_are_refused(s: str, why: str) -> None:
    with pytest.raises(LockRefused) as err:
        check(s)
    assert err.value.code == "locked_token"
    assert err.value.token_untouched


def test_keys_compare_by_x_only() -> None:
    assert same_key("02" + "aa" * 32, "03" + "AA" * 32)
    assert not same_key("04" + "aa" * 32, "02" + "aa" * 32)
    assert not same_key("02" + "aa" * 31, "02" + "aa" * 31)


def test_the_lock_key_is_even_kept_and_signs_for_the_mint(tmp_path: Path) -> None:
    keys = [LockKey.load_or_create(tmp_path / str(i)) for i in range(8)]
    assert all(k.pubkey.startswith("02") and len(k.pubkey) == 66 for k in keys)
    assert len({k.pubkey for k in keys}) == 8
    again = LockKey.load_or_create(tmp_path / "0")
    assert again.pubkey == keys[0].pubkey
    assert (tmp_path / "0" / "p2pk_key").stat().st_mode & 0o777 == 0o600
    for k in keys:
        sig = bytes.fromhex(k.sign("a secret"))
        assert verify_schnorr_signature(b"a secret", PublicKey(bytes.fromhex(k.pubkey)), sig)
    assert json.loads(witness("ab")) == {"signatures": ["ab"]}


@given(st.lists(st.integers(1, 64), max_size=40), st.integers(0, 300))
def test_a_cover_pays_every_change_up_to_its_need(stock: list[int], need: int) -> None:
    counts = Counter(stock)
    taken = cover_counts(dict(counts), need)
    if taken is None:
        # only when no complete prefix of the sorted stock reaches the need
        covered = 0
        for a in sorted(stock):
            if a > covered + 1:
                break
            covered += a
        assert covered < need
        return
    assert all(0 < n <= counts[a] for a, n in taken.items())  # no proof taken twice
    picked = [a for a, n in taken.items() for _ in range(n)]
    assert sum(picked) >= need
    for change in range(need + 1):
        idx = select_exact(picked, change)
        assert idx is not None and sum(picked[i] for i in idx) == change


def test_a_cover_takes_few_proofs() -> None:
    taken = cover_counts({1 << i: 20 for i in range(10)}, 1000)  # 20 of each of 1..512
    assert taken is not None and sum(taken.values()) <= 12


def test_a_refill_tops_up_the_small_proofs_first() -> None:
    targets = stock_targets(4096)
    assert min(targets) == 1 and max(targets) == 512 and targets[1] > targets[512]
    out = stock_split(1000, [], 4096)
    assert sum(out) == 1000
    assert out.count(1) >= out.count(2) >= out.count(4) > 0
    full = [d for d, n in targets.items() for _ in range(n)]
    assert stock_split(1000, full, 4096) == [8, 32, 64, 128, 256, 512]  # nothing missing
    assert stock_split(0, [], 4096) == []
    assert stock_split(77, [], 0) == [1, 4, 8, 64]
