"""The test support works: a real nutshell mint, and a user's wallet paying with it."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import cbor2
import pytest

from tests.support.mint import MintProcess, MintStartError
from tests.support.ports import free_port, port_is_listening
from tests.support.user_wallet import TokenAlreadySpent, token_amount

if TYPE_CHECKING:
    from tests.support.fixtures import MintFactory, UserWalletFactory

# Registers the fixtures for this module only; conftest imports of them take precedence.


def _b64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def v4_body(token: str) -> dict[str, Any]:
    assert token.startswith("cashuB")
    body: dict[str, Any] = cbor2.loads(_b64(token[len("cashuB") :]))
    return body


def v3_body(token: str) -> dict[str, Any]:
    assert token.startswith("cashuA")
    body: dict[str, Any] = json.loads(_b64(token[len("cashuA") :]))
    return body


def fee_sat(n_inputs: int, fee_ppk: int) -> int:
    return math.ceil(n_inputs * fee_ppk / 1000)


def gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_mint_serves_a_v2_keyset_without_fee(mint: MintProcess) -> None:
    (keyset,) = await mint.keysets()
    assert keyset["unit"] == "sat" and keyset["active"]
    assert keyset["input_fee_ppk"] == 0
    assert keyset["id"].startswith("01") and len(keyset["id"]) == 66  # NUT-02 v2 id
    assert port_is_listening(mint.port)


async def test_pay_with_a_v4_token_and_see_it_spent(
    mint: MintProcess, user_wallet: UserWalletFactory
) -> None:
    alice, bob = await user_wallet(mint), await user_wallet(mint)
    await alice.fund(1000)
    assert await alice.balance() == 1000

    token = await alice.send_token(500)
    body = v4_body(token)
    assert token_amount(token) == 500
    assert body["m"] == mint.url and body["u"] == "sat"
    (keyset,) = await mint.keysets()
    assert [t["i"].hex() for t in body["t"]] == [keyset["id"][:16]]  # V4: short id
    assert all("d" in proof for t in body["t"] for proof in t["p"])  # DLEQ included
    assert await alice.balance() == 500
    assert await alice.token_state(token) == "unspent"

    assert await bob.receive(token) == 500
    assert await alice.token_state(token) == "spent"
    assert await bob.balance() == 500
    with pytest.raises(TokenAlreadySpent):
        await bob.receive(token)

    without_dleq = await alice.send_token(20, include_dleq=False)
    assert all("d" not in p for t in v4_body(without_dleq)["t"] for p in t["p"])
    assert await bob.receive(without_dleq) == 20


async def test_pay_with_a_v3_token(mint: MintProcess, user_wallet: UserWalletFactory) -> None:
    alice, bob = await user_wallet(mint), await user_wallet(mint)
    await alice.fund(100)
    token = await alice.send_token(77, version=3)
    (entry,) = v3_body(token)["token"]
    assert entry["mint"] == mint.url
    assert sum(p["amount"] for p in entry["proofs"]) == 77
    assert all(len(p["id"]) == 66 for p in entry["proofs"])  # nutshell's V3: full ids
    assert all(set(p["dleq"]) == {"e", "s", "r"} for p in entry["proofs"])
    assert await bob.receive(token) == 77
    assert await alice.token_state(token) == "spent"


async def test_fee_mint_charges_100_ppk_and_tokens_stay_exact(
    fee_mint: MintProcess, user_wallet: UserWalletFactory
) -> None:
    (keyset,) = await fee_mint.keysets()
    assert keyset["input_fee_ppk"] == 100  # MINT_INPUT_FEE_PPK reached the keyset
    alice, bob = await user_wallet(fee_mint), await user_wallet(fee_mint)
    assert alice.input_fee_ppk == 100

    await alice.fund(1024, split=[1024])  # one proof: any send needs a swap
    token = await alice.send_token(500)
    assert token_amount(token) == 500
    assert await alice.balance() == 1024 - 500 - fee_sat(1, 100)  # alice paid the swap

    n_proofs = sum(len(t["p"]) for t in v4_body(token)["t"])
    assert await bob.receive(token) == 500 - fee_sat(n_proofs, 100)
    assert await alice.token_state(token) == "spent"

    v3 = await alice.send_token(300, version=3)
    assert token_amount(v3) == 300
    swap_fee = (1024 - 500 - fee_sat(1, 100)) - 300 - await alice.balance()
    assert 0 <= swap_fee <= 2  # zero if her change held exactly 300
    assert await bob.receive(v3) == 300 - fee_sat(len(v3_body(v3)["token"][0]["proofs"]), 100)


async def test_many_exact_tokens_at_once(
    fee_mint: MintProcess, user_wallet: UserWalletFactory
) -> None:
    alice, bob = await user_wallet(fee_mint), await user_wallet(fee_mint)
    tokens = await alice.send_tokens(21, 50)
    assert len(set(tokens)) == 50
    assert all(token_amount(t) == 21 for t in tokens)
    assert await alice.balance() == 0  # minted straight into the tokens
    assert await alice.token_state(tokens[0]) == "unspent"
    assert await bob.receive(tokens[-1]) == 21 - fee_sat(3, 100)  # 16 + 4 + 1


async def test_restart_and_crash_keep_keys_and_money(
    mint_factory: MintFactory, user_wallet: UserWalletFactory
) -> None:
    own = await mint_factory()
    keys_before = await own.get_json("/v1/keys")
    alice, bob = await user_wallet(own), await user_wallet(own)
    await alice.fund(100)
    token = await alice.send_token(40)

    await own.restart()  # graceful: SIGTERM, same port, database and key
    assert await own.get_json("/v1/keys") == keys_before
    assert await alice.token_state(token) == "unspent"

    pid = own.pid
    assert pid is not None
    await own.kill()  # a crash
    assert not own.running and gone(pid)
    assert not port_is_listening(own.port)

    await own.restart()
    assert await own.get_json("/v1/keys") == keys_before
    assert await bob.receive(token) == 40
    assert await bob.receive(await alice.send_token(60)) == 60
    assert await alice.balance() == 0

    pid = own.pid
    assert pid is not None
    await own.stop()
    assert not own.running and gone(pid)


async def test_start_failure_raises_with_the_log(tmp_path: Any) -> None:
    port = free_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        process = MintProcess(tmp_path, port=port)
        with pytest.raises(MintStartError, match=r"(?i)address already in use"):
            await process.start()
    assert not process.running


# --- P2PK-locked tokens (NUT-11) with DLEQ (NUT-12) -------------------------------------


def token_proofs(token: str) -> list[dict[str, Any]]:
    return [proof for t in v4_body(token)["t"] for proof in t["p"]]


def locked_secrets(token: str) -> list[dict[str, Any]]:
    """The NUT-10 secret data of every proof of a V4 token; asserts they are P2PK."""
    secrets = []
    for proof in token_proofs(token):
        kind, data = json.loads(proof["s"])
        assert kind == "P2PK"
        secrets.append(data)
    return secrets


async def test_p2pk_token_only_the_key_holder_can_receive(
    mint: MintProcess, user_wallet: UserWalletFactory
) -> None:
    alice, bob = await user_wallet(mint), await user_wallet(mint)
    key_a, key_b = await alice.lock_pubkey(), await bob.lock_pubkey()
    assert key_a != key_b  # a key per wallet
    assert all(len(k) == 66 and k[:2] in ("02", "03") for k in (key_a, key_b))
    assert await alice.lock_pubkey() == key_a  # stable
    await alice.fund(1000)

    token = await alice.send_locked(300, key_b)
    assert token_amount(token) == 300
    proofs = token_proofs(token)
    assert sorted(p["a"] for p in proofs) == [4, 8, 32, 256]
    secrets = locked_secrets(token)
    for secret in secrets:
        assert list(secret) == ["data", "nonce", "tags"]
        assert secret["data"] == key_b
        assert secret["tags"] == [["sigflag", "SIG_INPUTS"]]  # nutshell always adds it
    assert len({s["nonce"] for s in secrets}) == len(secrets)  # a nonce per proof
    assert all(set(p["d"]) == {"e", "s", "r"} for p in proofs)  # DLEQ
    assert all("w" not in p for p in proofs)  # no witness in the token
    assert await alice.balance() == 700

    with pytest.raises(Exception, match=r"(?i)signature|witness") as refused:
        await alice.receive(token)  # the sender holds no key of the lock
    assert not isinstance(refused.value, TokenAlreadySpent)
    assert await alice.token_state(token) == "unspent"
    assert await alice.balance() == 700

    assert await bob.receive(token) == 300
    assert await bob.token_state(token) == "spent"

    no_dleq = await alice.send_locked(21, key_b, include_dleq=False)
    assert all("d" not in p for p in token_proofs(no_dleq))
    assert all(s["data"] == key_b for s in locked_secrets(no_dleq))
    assert await bob.receive(no_dleq) == 21
    assert (await alice.balance(), await bob.balance()) == (1000 - 321, 321)

    v3 = await alice.send_locked(5, key_b, version=3)
    (entry,) = v3_body(v3)["token"]
    assert all(json.loads(p["secret"])[1]["data"] == key_b for p in entry["proofs"])
    assert all("dleq" in p and "witness" not in p for p in entry["proofs"])
    assert await bob.receive(v3) == 5
    assert (await alice.balance(), await bob.balance()) == (1000 - 326, 326)


async def test_p2pk_token_stays_exact_at_a_fee_mint(
    fee_mint: MintProcess, user_wallet: UserWalletFactory
) -> None:
    alice, bob = await user_wallet(fee_mint), await user_wallet(fee_mint)
    await alice.fund(1024, split=[1024])
    token = await alice.send_locked(500, await bob.lock_pubkey())
    assert token_amount(token) == 500
    assert await alice.balance() == 1024 - 500 - fee_sat(1, 100)  # alice paid the swap
    n_proofs = len(token_proofs(token))
    assert await bob.receive(token) == 500 - fee_sat(n_proofs, 100)


async def test_p2pk_refund_key_takes_the_token_back_after_the_locktime(
    mint: MintProcess, user_wallet: UserWalletFactory
) -> None:
    alice, bob = await user_wallet(mint), await user_wallet(mint)
    key_a, key_b = await alice.lock_pubkey(), await bob.lock_pubkey()
    await alice.fund(100)

    # Before the locktime the refund key is not enough.
    later = await alice.send_locked(10, key_b, locktime_s=3600, refund_pubkeys=[key_a])
    with pytest.raises(Exception, match=r"(?i)signature|witness"):
        await alice.receive(later)
    assert await alice.token_state(later) == "unspent"

    t0 = time.time()
    token = await alice.send_locked(64, key_b, locktime_s=2, refund_pubkeys=[key_a])
    (secret,) = locked_secrets(token)
    refund, (name, locktime), sigflag = secret["tags"]
    assert refund == ["refund", key_a] and sigflag == ["sigflag", "SIG_INPUTS"]
    assert name == "locktime" and t0 + 1 <= int(locktime) <= time.time() + 2
    assert await alice.balance() == 100 - 10 - 64

    await asyncio.sleep(max(0.0, int(locktime) + 1.1 - time.time()))
    assert await alice.receive(token) == 64  # the refund path
    assert await alice.token_state(token) == "spent"
    assert await alice.balance() == 100 - 10
    with pytest.raises(TokenAlreadySpent):
        await bob.receive(token)

    assert await bob.receive(later) == 10  # the lock key works, before the locktime too
    assert (await alice.balance(), await bob.balance()) == (90, 10)


async def test_p2pk_tags_for_sig_all_multisig_and_locktimes(
    mint: MintProcess, user_wallet: UserWalletFactory
) -> None:
    alice, bob, carol = [await user_wallet(mint) for _ in range(3)]
    key_a, key_b, key_c = [await w.lock_pubkey() for w in (alice, bob, carol)]
    assert len({key_a, key_b, key_c}) == 3
    await alice.fund(200)

    t0 = time.time()
    token = await alice.send_locked(
        64,
        key_b,
        sig_all=True,
        n_sigs=2,
        extra_pubkeys=[key_c, key_a],
        refund_pubkeys=[key_a, key_c],
        locktime_s=600,
    )
    (secret,) = locked_secrets(token)
    assert secret["data"] == key_b
    pubkeys, refund, (name, locktime), sigflag, n_sigs = secret["tags"]
    assert pubkeys == ["pubkeys", key_c, key_a]
    assert refund == ["refund", key_a, key_c]
    assert name == "locktime" and t0 + 599 <= int(locktime) <= time.time() + 600
    assert sigflag == ["sigflag", "SIG_ALL"]
    assert n_sigs == ["n_sigs", "2"]
    with pytest.raises(Exception, match=r"(?i)signature|witness"):
        await bob.receive(token)  # one of two signatures (and SIG_ALL)

    sig_all = await alice.send_locked(3, key_b, sig_all=True)  # two proofs
    assert [s["tags"] for s in locked_secrets(sig_all)] == [[["sigflag", "SIG_ALL"]]] * 2
    with pytest.raises(Exception, match=r"(?i)signature|witness"):
        await carol.receive(sig_all)
    assert await bob.receive(sig_all) == 3  # nutshell signs inputs + outputs as one

    multisig = await alice.send_locked(16, key_b, n_sigs=2, extra_pubkeys=[key_c])
    (secret,) = locked_secrets(multisig)
    assert secret["tags"] == [["pubkeys", key_c], ["sigflag", "SIG_INPUTS"], ["n_sigs", "2"]]
    with pytest.raises(Exception, match=r"(?i)signature"):
        await bob.receive(multisig)  # bob alone has one of two

    # locktime 0: nutshell's create_p2pk_lock would drop it; here it is "now"
    open_now = await alice.send_locked(8, key_b, locktime_s=0)
    (secret,) = locked_secrets(open_now)
    (name, locktime), sigflag = secret["tags"]
    assert name == "locktime" and abs(int(locktime) - time.time()) <= 2
    assert sigflag == ["sigflag", "SIG_INPUTS"]
    await asyncio.sleep(max(0.0, int(locktime) + 1.1 - time.time()))
    assert await carol.receive(open_now) == 8  # locktime passed, no refund: anyone
    assert await alice.balance() == 200 - 64 - 3 - 16 - 8
