"""Two bot processes on one Redis and one pair of relays: 200 DMs published to two relays
are each answered exactly once.

Both processes are real ``python -m bot serve`` processes with the same Nostr key, the
same relays and the same Redis, each with its own wallet. Every DM reaches both
processes twice (once per relay); the shared claims in Redis must let exactly one of
them answer it, charge it and give its change back.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from nostr_sdk import Keys

from mint_client.crypto import hash_to_curve_hex
from mint_client.protocol import MintAPI
from mint_client.tokens import parse_token
from tests.support.bot_process import BotProcess
from tests.support.mint import MintProcess
from tests.support.nostr_user import DMTimeoutError, NostrUser, ReceivedDM
from tests.support.redis_server import RedisServer
from tests.support.relays import LocalRelayFactory
from tests.support.user_wallet import UserWallet

pytestmark = pytest.mark.asyncio(loop_scope="session")

N_QUESTIONS = 200
PAID_SAT = 64
#: how long all answers and change may take to arrive
ANSWER_TIMEOUT_S = 90.0
#: how long to keep listening after the last expected DM, for duplicates
QUIET_S = 3.0
#: DMs the user publishes at once
SEND_CONCURRENCY = 16

ANSWER = re.compile(r"^Emulated answer to: question (\d+):")
RECEIPT = re.compile(r"charged (\d+) sat, mint fee (\d+) sat, change (\d+) sat")
PAID_LOG = re.compile(r"paid request id=(\S+) transport=nostr")


@pytest_asyncio.fixture(loop_scope="session")
async def redis_url(tmp_path: Path) -> AsyncIterator[str]:
    async with RedisServer(tmp_path / "redis") as server:
        yield server.url


def process_config(
    wallet_dir: Path,
    *,
    mint_url: str,
    emulator_url: str,
    redis_url: str,
    relays: list[str],
    nsec: str,
) -> dict[str, Any]:
    """One process's config.yaml: its own wallet, everything else shared."""
    return {
        "mints": [mint_url],
        "wallet": {"path": str(wallet_dir)},
        "http": {"enabled": False},
        "gemini": {
            "api_key": "test-key",
            "base_url": emulator_url,
            "api_version": "v1beta",
            "timeout_s": 30,
        },
        # one sender asks 200 questions at once: no throttling in this test
        "rate_limit": {
            "requests_capacity": 10_000,
            "requests_per_s": 1_000,
            "tokens_capacity": 1_000_000_000,
            "tokens_per_s": 1_000_000,
        },
        "nostr": {
            "enabled": True,
            "nsec": nsec,
            "relays": relays,
            "max_concurrent_per_sender": 500,
            "retry_interval_s": 0.5,
            "reconnect_s": 0.5,
        },
        "redis": {"url": redis_url},
        "log_level": "INFO",
    }


def question(i: int, token: str) -> str:
    """Question ``i``, with answers of different lengths so the charges differ."""
    return f"question {i}: how does ecash work? [emulator:words={200 * (1 + i % 10)}] {token}"


def held_and_reserved_sat(wallet_dir: Path) -> tuple[int, int]:
    """The sats a stopped bot keeps (``held``) and still has in flight (``reserved``)."""
    with contextlib.closing(sqlite3.connect(wallet_dir / "wallet.sqlite3")) as db:
        rows = dict(db.execute("SELECT state, SUM(amount) FROM proofs GROUP BY state").fetchall())
    return int(rows.get("held") or 0), int(rows.get("reserved") or 0)


async def mint_states(mint_url: str, tokens: list[str]) -> Counter[str]:
    """NUT-07 states of every proof of ``tokens``, counted."""
    ys = [hash_to_curve_hex(p.secret) for t in tokens for p in parse_token(t).proofs]
    async with aiohttp.ClientSession() as session:  # check_state batches for the mint
        states = await MintAPI(session, mint_url, timeout_s=30).check_state(ys)
    assert len(states) == len(ys)
    return Counter(states.values())


async def test_two_processes_answer_each_dm_from_two_relays_exactly_once(
    local_relay_factory: LocalRelayFactory,
    mint: MintProcess,
    emulator_url: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    relays = [(await local_relay_factory()).url, (await local_relay_factory()).url]
    bot_keys = Keys.generate()
    bot_hex = bot_keys.public_key().to_hex()
    wallet = await UserWallet.create(mint.url, tmp_path / "user-wallet")
    tokens = await wallet.send_tokens(PAID_SAT, N_QUESTIONS)
    assert len(set(tokens)) == N_QUESTIONS

    wallet_dirs = [tmp_path / "bot-a" / "wallet", tmp_path / "bot-b" / "wallet"]
    bots = [
        BotProcess(
            wallet_dir.parent,
            process_config(
                wallet_dir,
                mint_url=mint.url,
                emulator_url=emulator_url,
                redis_url=redis_url,
                relays=relays,
                nsec=bot_keys.secret_key().to_bech32(),
            ),
        )
        for wallet_dir in wallet_dirs
    ]
    answers: defaultdict[int, list[ReceivedDM]] = defaultdict(list)
    changes: list[ReceivedDM] = []
    others: list[ReceivedDM] = []

    def sort(dm: ReceivedDM) -> bool:
        """File a DM; True once every question has its answer and change."""
        if dm.text.startswith("cashuB"):
            changes.append(dm)
        elif m := ANSWER.match(dm.text):
            answers[int(m.group(1))].append(dm)
        else:
            others.append(dm)
        return len(answers) >= N_QUESTIONS and len(changes) >= N_QUESTIONS

    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        for bot in bots:
            stack.push_async_callback(bot.stop)  # stopped even if the test fails
        await asyncio.gather(*(bot.start() for bot in bots))
        user = await stack.enter_async_context(await NostrUser.create(relays))

        gate = asyncio.Semaphore(SEND_CONCURRENCY)

        async def send(i: int) -> None:
            async with gate:
                sent = await user.send_nip17(bot_hex, question(i, tokens[i]), relays=relays)
            assert not sent.output.failed, f"question {i}: {sent.output.failed}"

        await asyncio.gather(*(send(i) for i in range(N_QUESTIONS)))
        sent_s = time.monotonic() - started

        with contextlib.suppress(DMTimeoutError):
            await user.dms_until(sort, ANSWER_TIMEOUT_S)
        answered_s = time.monotonic() - started
        await asyncio.sleep(QUIET_S)  # anything answered twice would come now
        for dm in user.drain():
            sort(dm)

        for bot in bots:
            await bot.stop()

    logs = [bot.log_text() for bot in bots]
    handled = [len(PAID_LOG.findall(log)) for log in logs]
    print(
        f"\nsent {N_QUESTIONS} DMs in {sent_s:.1f} s, all answered after {answered_s:.1f} s; "
        f"paid requests per process: {handled}"
    )
    tails = "\n".join(
        f"--- {bot.data_dir.name}:\n{log[-3000:]}" for bot, log in zip(bots, logs, strict=True)
    )

    # nothing but answers and change came back: no refusal, no "too many in flight"
    assert not others, [dm.text[:200] for dm in others]
    # every question was answered exactly once
    missing = sorted(set(range(N_QUESTIONS)) - set(answers))
    assert not missing, f"{len(missing)} questions unanswered, e.g. {missing[:10]}\n{tails}"
    twice = {i: len(dms) for i, dms in answers.items() if len(dms) != 1}
    assert not twice, f"answered more than once: {twice}"
    assert set(answers) == set(range(N_QUESTIONS))
    # ...and paid for exactly once, by one of the two processes
    assert sum(handled) == N_QUESTIONS, f"paid requests per process: {handled}\n{tails}"
    assert all(n > 0 for n in handled), f"one process did all the work: {handled}"

    # every sat accounted for: paid = charged + fee + change, on every receipt
    receipts: dict[int, tuple[int, int, int]] = {}
    for i, (dm,) in answers.items():
        m = RECEIPT.search(dm.text)
        assert m, dm.text[-300:]
        charged, fee, change_sat = (int(x) for x in m.groups())
        assert charged + fee + change_sat == PAID_SAT, dm.text[-300:]
        receipts[i] = (charged, fee, change_sat)

    # exactly one change token per question: as many as receipts with change, no repeats,
    # of the amounts the receipts name, from our mint, still unspent (ours to take)
    change_tokens = [dm.text.strip() for dm in changes]
    assert len(set(change_tokens)) == len(change_tokens), "a change token came twice"
    assert Counter(parse_token(t).amount for t in change_tokens) == Counter(
        c for _, _, c in receipts.values() if c > 0
    )
    assert len(change_tokens) == N_QUESTIONS
    assert {parse_token(t).mint for t in change_tokens} == {mint.url}
    assert await mint_states(mint.url, change_tokens) == Counter(
        {"UNSPENT": sum(len(parse_token(t).proofs) for t in change_tokens)}
    )

    # every token paid was redeemed
    assert await mint_states(mint.url, tokens) == Counter(
        {"SPENT": sum(len(parse_token(t).proofs) for t in tokens)}
    )

    # both processes shut down cleanly, and between them kept exactly what was charged
    assert [bot.returncode for bot in bots] == [0, 0], tails
    kept = [held_and_reserved_sat(d) for d in wallet_dirs]
    assert all(reserved == 0 for _, reserved in kept), kept
    assert sum(held for held, _ in kept) == sum(c for c, _, _ in receipts.values())
    for log in logs:
        assert "Traceback" not in log and " ERROR " not in log, tails
