"""Never lose a sat, under faults: 300 paid requests, HTTP and Nostr DMs mixed, while

* the bot process is SIGKILLed at random moments from outside, and kills itself at
  failpoints (``bot/failpoints.py``): between redeem and answer, between answer and
  change, between change and delivery — at least 15 crashes in all;
* the mint is restarted twice;
* the Gemini emulator fails 10% of the calls.

A quarter of the HTTP questions are paid with tokens locked to the bot (NUT-11), taken
with no mint call, their change made from a stock the operator funded first, and swept
every two seconds: the sweeps are killed and the mint restarted under them too.

Every user behaves as a real client would: on a lost connection it asks for its change
again (``POST /v1/change`` or ``/change``), on "token untouched" or a token never redeemed
it pays again later. After the run and a restart, ``ecashbot audit`` finds no difference,
every question ended with an answer and its change or with a refund, every returned
token redeems, and the books of the users and the bot agree to the sat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from nostr_sdk import Keys

from bot.audit import audit
from bot.config import load_config
from bot.llm.emulator import Emulator, start_emulator
from bot.wallet_cli import open_wallet
from mint_client.crypto import hash_to_curve_hex
from mint_client.p2pk import LockKey
from mint_client.protocol import MintAPI
from mint_client.tokens import Token, encode_token, parse_token
from pricing import input_fee_sat
from tests.support.bot_process import BotProcess
from tests.support.fixtures import MintFactory
from tests.support.mint import MintProcess
from tests.support.nostr_user import DMTimeoutError, NostrUser, ReceivedDM
from tests.support.ports import free_port
from tests.support.relays import LocalRelayFactory
from tests.support.user_wallet import UserWallet

pytestmark = pytest.mark.asyncio(loop_scope="session")

N_HTTP = 200
N_DM_USERS = 20
DM_PER_USER = 5
PAID_SAT = 100
MINT_FEE_PPK = 100
MIN_CRASHES = 15
#: a crash at every FAILPOINT_EVERY-th pass of each failpoint, counted across restarts
#: (each point is passed about 300 times: some 7 crashes at each, for certain)
FAILPOINT_EVERY = 40
#: seconds between outside SIGKILLs (uniform)
KILL_EVERY_S = (3.0, 8.0)
HTTP_CONCURRENCY = 6
#: one question may take this long, crashes and recoveries included
QUESTION_TIMEOUT_S = 150.0
#: every LOCKED_EVERY-th HTTP question pays with a token locked to the bot
LOCKED_EVERY = 4
#: the operator's funding of the change stock, sat
STOCK_FUND_SAT = 3000

ANSWER = re.compile(r"Emulated answer to: question (\d+):")
REFUND = re.compile(r"your (\d+) sat come back")
RECEIPT = re.compile(r"charged (\d+) sat, mint fee (\d+) sat, change (\d+) sat")


@dataclass
class Outcome:
    """How one question ended, from its payer's side."""

    question: int
    transport: str
    #: "answered", "refunded" or "untouched" (the payer's token was never spent)
    kind: str = ""
    charged: int = 0
    fee: int = 0
    answer: str | None = None
    #: tokens the payer received back (change or refund)
    tokens: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


async def token_state(wallet: UserWallet, token: str) -> str:
    """NUT-07 state of the token, waiting out a mint restart."""
    for _ in range(120):
        try:
            return await wallet.token_state(token)
        except Exception:  # the mint is restarting: connection refused, ...
            await asyncio.sleep(0.5)
    raise AssertionError("the mint did not come back")


def question(i: int) -> str:
    return f"question {i}: what is ecash? [emulator:words={20 + 7 * (i % 9)}]"


class Supervisor:
    """Keeps the bot running, kills it at random moments, restarts it after each crash."""

    def __init__(self, bot: BotProcess, rng: random.Random) -> None:
        self.bot = bot
        self.rng = rng
        self.kills = 0
        self.restarts = 0
        self.up = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        next_kill = time.monotonic() + self.rng.uniform(*KILL_EVERY_S)
        while not stop.is_set():
            if not self.bot.running:  # it crashed at a failpoint
                self.up.clear()
                await self.bot.stop()
                await self.bot.start()
                self.restarts += 1
                self.up.set()
            elif time.monotonic() >= next_kill:
                self.up.clear()
                await self.bot.kill()
                self.kills += 1
                await self.bot.start()
                self.restarts += 1
                self.up.set()
                next_kill = time.monotonic() + self.rng.uniform(*KILL_EVERY_S)
            await asyncio.sleep(0.02)


async def post_chat(url: str, q: str, token: str, *, stream: bool) -> tuple[int, Any]:
    """One paid request; (status, JSON body) or, streamed, (status, [events])."""
    body = {"messages": [{"role": "user", "content": q}], "stream": stream}
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as s,
        s.post(f"{url}/v1/chat/completions", json=body, headers={"X-Cashu": token}) as r,
    ):
        if stream and r.status == 200:
            events = []
            async for line in r.content:
                text = line.decode().strip()
                if text.startswith("data: ") and text != "data: [DONE]":
                    events.append(json.loads(text[6:]))
            return r.status, events
        return r.status, await r.json()


async def pick_up(url: str, token: str) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as s,
        s.post(f"{url}/v1/change", headers={"X-Cashu": token}) as r,
    ):
        return r.status, await r.json()


def from_payment(out: Outcome, payment: dict[str, Any], answer: str | None) -> Outcome:
    out.kind = "refunded" if payment["refunded"] else "answered"
    out.charged = payment["charged_sat"]
    out.fee = payment["fee_sat"]
    out.answer = None if payment["refunded"] else answer
    if payment["change"]:
        out.tokens.append(payment["change"])
    return out


async def http_question(
    i: int, token: str, url: str, sup: Supervisor, wallet: UserWallet
) -> Outcome:
    out = Outcome(i, "http")
    stream = i % 2 == 1
    deadline = time.monotonic() + QUESTION_TIMEOUT_S
    while time.monotonic() < deadline:
        await sup.up.wait()
        try:
            status, body = await post_chat(url, question(i), token, stream=stream)
        except aiohttp.ClientConnectorError:
            await asyncio.sleep(0.2)  # the bot is down: the request never reached it
            continue
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:  # the bot died mid-answer
            out.notes.append(f"lost response: {type(exc).__name__}")
        else:
            if status == 200 and not stream:
                text = body["choices"][0]["message"]["content"]
                return from_payment(out, body["payment"], text)
            if status == 200 and stream:
                final = [e for e in body if "payment" in e]
                if final:
                    text = "".join(
                        e["choices"][0]["delta"].get("content", "") for e in body if e["choices"]
                    )
                    return from_payment(out, final[-1]["payment"], text)
                out.notes.append("stream cut before the change")
            elif isinstance(body, dict) and "payment" in body.get("error", {}):
                return from_payment(out, body["error"]["payment"], None)
            elif body.get("error", {}).get("token_untouched") and status in (429, 503):
                out.notes.append(f"{status} {body['error']['code']}: paid again later")
                await asyncio.sleep(0.5)
                continue
            else:
                out.notes.append(f"{status} {body.get('error', {}).get('code')}")
        # the answer or the change did not reach us: ask for the change again
        while time.monotonic() < deadline:
            await sup.up.wait()
            try:
                status, got = await pick_up(url, token)
            except (aiohttp.ClientError, TimeoutError, OSError):
                await asyncio.sleep(0.2)
                continue
            if status == 200:
                out.notes.append("picked up")
                return from_payment(
                    out,
                    {**got, "refunded": got["refunded"]},
                    got.get("answer"),
                )
            if status == 409:  # still being resolved
                await asyncio.sleep(0.5)
                continue
            if status == 404 and await token_state(wallet, token) == "unspent":
                # never redeemed (a crash came first): pay with it again; a claim the
                # crash left behind lapses within a minute
                out.notes.append("never redeemed: paid again")
                await asyncio.sleep(2.0)
                break
            await asyncio.sleep(0.5)
    raise AssertionError(f"question {i} (http) unresolved: {out.notes}")


class DMInbox:
    """One Nostr user's DMs, sorted as they come: answers by question, tokens, notices."""

    def __init__(self, user: NostrUser) -> None:
        self.user = user
        self.answers: dict[int, ReceivedDM] = {}
        self.tokens: list[str] = []
        #: the sats each refund notice announces ("your N sat come back")
        self.refund_notices: list[int] = []
        self.untouched_notices = 0
        self.other: list[str] = []

    async def pump(self, timeout_s: float) -> None:
        with contextlib.suppress(DMTimeoutError):
            self.file(await self.user.next_dm(timeout_s))
        for dm in self.user.drain():
            self.file(dm)

    def file(self, dm: ReceivedDM) -> None:
        text = dm.text.strip()
        if text.startswith("cashuB") and " " not in text:
            if text not in self.tokens:  # a resend (/change, recovery) is not new money
                self.tokens.append(text)
        elif m := ANSWER.search(text):
            self.answers.setdefault(int(m.group(1)), dm)
        elif "Nothing was charged" in text:
            m = REFUND.search(text)
            assert m, text
            self.refund_notices.append(int(m.group(1)))
        elif "not spent" in text:
            self.untouched_notices += 1
        else:
            self.other.append(text[:160])


async def dm_question(
    i: int,
    token: str,
    inbox: DMInbox,
    bot_hex: str,
    relay: str,
    wallet: UserWallet,
) -> Outcome:
    out = Outcome(i, "nostr")
    deadline = time.monotonic() + QUESTION_TIMEOUT_S
    tokens_before = len(inbox.tokens)
    refunds_before = len(inbox.refund_notices)
    untouched_before = inbox.untouched_notices
    await inbox.user.send_nip17(bot_hex, f"{question(i)} {token}", relays=[relay])
    asked_change_at = time.monotonic() + 20
    while time.monotonic() < deadline:
        await inbox.pump(0.5)
        new_tokens = inbox.tokens[tokens_before:]
        if i in inbox.answers:
            m = RECEIPT.search(inbox.answers[i].text)
            assert m, inbox.answers[i].text[-300:]
            charged, fee, change = (int(x) for x in m.groups())
            if change == 0 or new_tokens:
                out.kind, out.charged, out.fee = "answered", charged, fee
                out.answer = inbox.answers[i].text
                out.tokens = new_tokens[:1] if change else []
                return out
        elif refund := [
            t for t in new_tokens if parse_token(t).amount in inbox.refund_notices[refunds_before:]
        ]:
            out.kind, out.tokens = "refunded", refund[:1]
            out.fee = PAID_SAT - parse_token(refund[0]).amount
            return out
        elif inbox.untouched_notices > untouched_before:
            # refused before any money moved (mint restarting, ...): pay again shortly
            untouched_before = inbox.untouched_notices
            out.notes.append("untouched: paid again")
            await asyncio.sleep(1.0)
            await inbox.user.send_nip17(bot_hex, f"{question(i)} {token}", relays=[relay])
            asked_change_at = time.monotonic() + 20
        if time.monotonic() > asked_change_at:
            asked_change_at = time.monotonic() + 20
            if await token_state(wallet, token) == "unspent":
                out.notes.append("no reply and never redeemed: paid again")
                await inbox.user.send_nip17(bot_hex, f"{question(i)} {token}", relays=[relay])
            else:
                out.notes.append("no reply: /change")
                await inbox.user.send_nip17(bot_hex, "/change", relays=[relay])
    raise AssertionError(f"question {i} (nostr) unresolved: {out.notes} {inbox.other[-5:]}")


async def all_unspent(mint_url: str, tokens: list[str]) -> bool:
    ys = [hash_to_curve_hex(p.secret) for t in tokens for p in parse_token(t).proofs]
    async with aiohttp.ClientSession() as session:
        states = await MintAPI(session, mint_url, timeout_s=30).check_state(ys)
    return len(states) == len(ys) and set(states.values()) <= {"UNSPENT"}


@pytest_asyncio.fixture(loop_scope="session")
async def flaky_emulator() -> AsyncIterator[tuple[str, Emulator]]:
    emu = Emulator(ttft_ms=0, chunk_delay_ms=15, seed=7, fail_rate=0.10)
    running = await start_emulator(emu)
    try:
        yield running.url, emu
    finally:
        await running.stop()


@pytest.mark.timeout(900)
async def test_no_sat_is_lost_under_crashes_mint_restarts_and_model_failures(
    mint_factory: MintFactory,
    local_relay_factory: LocalRelayFactory,
    flaky_emulator: tuple[str, Emulator],
    tmp_path: Path,
) -> None:
    emulator_url, emu = flaky_emulator
    mint: MintProcess = await mint_factory(input_fee_ppk=MINT_FEE_PPK)
    relay = (await local_relay_factory()).url
    rng = random.Random(20261123)
    bot_keys = Keys.generate()
    bot_hex = bot_keys.public_key().to_hex()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    wallet_dir = tmp_path / "bot" / "wallet"
    config: dict[str, Any] = {
        "mints": [mint.url],
        "wallet": {
            "path": str(wallet_dir),
            "mint_timeout_s": 5,
            "recovery_interval_s": 1,
            "recovery_min_age_s": 2,
        },
        "locked": {"sweep_interval_s": 2, "sweep_max_inputs": 8},
        "http": {"port": port},
        # dear enough that every answer costs whole sats
        "models": {
            "gemini-2.5-flash": {
                "input_msat_per_1k": 50_000,
                "output_msat_per_1k": 500_000,
                "request_msat": 2_000,
            }
        },
        "gemini": {
            "api_key": "test-key",
            "base_url": emulator_url,
            "api_version": "v1beta",
            "timeout_s": 10,
            "attempts": 1,
        },
        "rate_limit": {
            "requests_capacity": 100_000,
            "requests_per_s": 10_000,
            "tokens_capacity": 1_000_000_000,
            "tokens_per_s": 1_000_000,
        },
        "nostr": {
            "enabled": True,
            "nsec": bot_keys.secret_key().to_bech32(),
            "relays": [relay],
            "retry_interval_s": 0.5,
            "reconnect_s": 0.5,
        },
        "log_level": "INFO",
    }
    failpoints = ",".join(
        f"{p}=every:{FAILPOINT_EVERY}" for p in ("after_redeem", "after_answer", "after_settle")
    )
    counts = tmp_path / "failpoint-counts"
    counts.mkdir()
    bot = BotProcess(
        tmp_path / "bot",
        config,
        env={"ECASHBOT_FAILPOINTS": failpoints, "ECASHBOT_FAILPOINTS_COUNTS": str(counts)},
    )

    payer = await UserWallet.create(mint.url, tmp_path / "payer")
    tokens = await payer.send_tokens(PAID_SAT, N_HTTP + N_DM_USERS * DM_PER_USER)
    # the bot's lock key (made now, as the bot would at start) and the operator's funding
    lock_key = LockKey.load_or_create(wallet_dir)
    locked = range(0, N_HTTP, LOCKED_EVERY)
    await payer.fund(STOCK_FUND_SAT + PAID_SAT * len(locked) + 500)
    for i in locked:
        tokens[i] = await payer.send_locked(PAID_SAT, lock_key.pubkey)
    async with open_wallet(load_config(None, **config)) as (bot_wallet, _):
        funding = await bot_wallet.receive(parse_token(await payer.send_token(STOCK_FUND_SAT)))
    outcomes: list[Outcome] = []
    mint_restarts = 0

    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(bot.stop)
        await bot.start()
        sup = Supervisor(bot, rng)
        sup.up.set()
        stop = asyncio.Event()
        supervisor = asyncio.create_task(sup.run(stop))

        async def restart_mint_at(done_count: int) -> None:
            nonlocal mint_restarts
            while len(outcomes) < done_count:  # noqa: ASYNC110 - a count, not an event
                await asyncio.sleep(0.1)
            await mint.restart()
            mint_restarts += 1

        mint_task = asyncio.gather(restart_mint_at(80), restart_mint_at(190))

        gate = asyncio.Semaphore(HTTP_CONCURRENCY)

        async def http_one(i: int) -> None:
            async with gate:
                outcomes.append(await http_question(i, tokens[i], url, sup, payer))

        async def dm_user(k: int) -> None:
            user = await stack.enter_async_context(await NostrUser.create([relay]))
            inbox = DMInbox(user)
            for j in range(DM_PER_USER):
                i = N_HTTP + k * DM_PER_USER + j
                outcomes.append(await dm_question(i, tokens[i], inbox, bot_hex, relay, payer))

        try:
            await asyncio.gather(
                *(http_one(i) for i in range(N_HTTP)),
                *(dm_user(k) for k in range(N_DM_USERS)),
            )
            await mint_task
        finally:
            stop.set()
            await supervisor
        # a last restart: recovery at start-up finishes whatever the last crash left
        await bot.stop()
        await bot.start()
        await bot.stop()

    log = bot.log_text()
    crashes_at = {
        p: log.count(f"failpoint {p}: SIGKILL")
        for p in ("after_redeem", "after_answer", "after_settle")
    }
    kinds = {k: sum(o.kind == k for o in outcomes) for k in ("answered", "refunded", "untouched")}
    print(
        f"\n{len(outcomes)} questions: {kinds}; outside kills {sup.kills}, failpoint crashes "
        f"{crashes_at}, mint restarts {mint_restarts}, emulator calls {len(emu.requests)}"
    )

    # the faults really happened
    assert sup.kills + sum(crashes_at.values()) >= MIN_CRASHES
    assert all(n > 0 for n in crashes_at.values()), crashes_at
    assert mint_restarts == 2
    assert kinds["refunded"] > 0  # the model's failures were refunded

    # every question ended as it may: an answer with its change, or a refund, or the
    # payer's own token, never spent
    assert sorted(o.question for o in outcomes) == list(range(len(tokens)))
    for o in outcomes:
        assert o.kind in kinds, o
        if o.kind == "answered":
            assert o.answer is not None and f"question {o.question}:" in o.answer, o
        if o.kind == "refunded":
            assert o.charged == 0 and len(o.tokens) == 1, o
    untouched = [tokens[o.question] for o in outcomes if o.kind == "untouched"]
    if untouched:
        assert await all_unspent(mint.url, untouched)
    assert kinds["untouched"] == 0, [o for o in outcomes if o.kind == "untouched"]

    # the audit, by the command an operator runs, balances to the sat
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bot", "audit", "--config", str(bot.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^difference\s+0$", done.stdout, re.MULTILINE), done.stdout
    report = await audit(load_config(bot.config_path))
    assert report.ok and report.in_flight_sat == 0, report.table()

    # ...and agrees with what the users hold
    returned = [t for o in outcomes for t in o.tokens]
    assert len(set(returned)) == len(returned), "a token was given to two questions"
    redeemed = [o for o in outcomes if o.kind != "untouched"]
    fund, fund_fee = funding.paid_sat, funding.fee_sat
    assert report.received_sat == PAID_SAT * len(redeemed) + fund, report.table()
    kept = sum(o.charged for o in redeemed) + fund - fund_fee
    assert report.kept_sat == kept, report.table()
    assert report.change_sat == sum(parse_token(t).amount for t in returned), report.table()
    assert report.fee_sat == sum(o.fee for o in redeemed) + fund_fee, report.table()
    # locked tokens were really taken with no mint call, and swept in batches since
    assert report.locked_in_sat >= PAID_SAT * len(locked) // 2, report.table()
    assert report.sweeps > 0, report.table()

    # every token given back redeems
    proofs = [p for t in returned for p in parse_token(t).proofs]
    receiver = await UserWallet.create(mint.url, tmp_path / "receiver")
    chunks = [tuple(proofs[k : k + 100]) for k in range(0, len(proofs), 100)]
    # a last chunk of a proof or two of 1 sat is worth no more than its mint fee (nutshell
    # then has nothing to sign and fails): it goes with the chunk before
    last = chunks[-1]
    if len(chunks) > 1 and sum(p.amount for p in last) <= input_fee_sat([MINT_FEE_PPK] * len(last)):
        chunks[-2:] = [chunks[-2] + last]
    for chunk in chunks:
        got = await receiver.receive(encode_token(Token(mint=mint.url, unit="sat", proofs=chunk)))
        fee = input_fee_sat([MINT_FEE_PPK] * len(chunk))
        assert got == sum(p.amount for p in chunk) - fee
