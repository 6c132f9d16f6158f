"""Lightning in and out, end to end against real nutshell mints (FakeWallet backend).

In: a 402 (and a DM question without a token) carries a bolt11 invoice from a NUT-04
mint quote; once paid, the quote id pays for the answer, and the change comes back as a
cashuB token. Out: the operator's `ecashbot wallet` sends tokens and withdraws by NUT-05
melts to an invoice or a Lightning address, and payouts run on their own above a
threshold. Every sat is accounted for: the audit balances after each story.

With FakeWallet, an invoice from a mint quote counts as paid by itself after a second.
Invoices to withdraw to come from another mint (``fee_mint``): melting to the bot's own
mint would be an internal settlement, which nutshell refuses once FakeWallet has already
marked that invoice paid.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import bolt11
import pytest
import yaml
from aiohttp import web
from nostr_sdk import Keys

from bot.audit import audit
from bot.config import Config
from bot.daemon import Daemon, recover_once
from bot.dm import parse_dm
from bot.lnurl import LnurlError, address_url, fetch_invoice
from mint_client.lightning import blank_outputs
from mint_client.lnwallet import select_inputs
from mint_client.tokens import Proof, encode_token, parse_token
from tests.bot_harness import ask, bot, bot_config
from tests.support.mint import MintProcess
from tests.support.mint_proxy import MintProxy
from tests.support.nostr_user import NostrUser, ReceivedDM
from tests.support.ports import free_port
from tests.support.relays import LocalRelay
from tests.support.user_wallet import UserWallet

#: the async tests share the session loop of the session mints
session_loop = pytest.mark.asyncio(loop_scope="session")

RECEIPT = re.compile(r"charged (\d+) sat, mint fee (\d+) sat, change (\d+) sat")
#: a model at 150 sat per question, so a few questions fund the bot's wallet
DEAR = {
    "gemini-2.5-flash": {
        "input_msat_per_1k": 300,
        "output_msat_per_1k": 2500,
        "request_msat": 150_000,
    }
}


# -- helpers: mints with other FakeWallet settings, invoices, an LNURL-pay server ---------


class ConfiguredMint(MintProcess):
    """A test mint with extra settings (invoices that stay unpaid, payments that fail)."""

    def __init__(self, data_dir: Path, extra_env: dict[str, str]) -> None:
        super().__init__(data_dir)
        self.extra_env = extra_env

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env.update(self.extra_env)
        return env


@contextlib.asynccontextmanager
async def configured_mint(data_dir: Path, **env: str) -> AsyncIterator[MintProcess]:
    process = ConfiguredMint(data_dir, env)
    try:
        await process.start()
        yield process
    finally:
        await process.stop()


async def mint_json(method: str, url: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body) as r:
        return await r.json()


async def new_invoice(mint_url: str, amount_sat: int) -> tuple[str, str]:
    """(quote id, bolt11) of a fresh NUT-04 quote at ``mint_url``: something to pay."""
    data = await mint_json(
        "POST", f"{mint_url}/v1/mint/quote/bolt11", {"amount": amount_sat, "unit": "sat"}
    )
    return data["quote"], data["request"]


async def wait_quote_paid(mint_url: str, quote_id: str, within_s: float = 15) -> None:
    """'Pay' an invoice of a FakeWallet mint: wait until the mint says PAID."""
    deadline = time.monotonic() + within_s
    while True:
        data = await mint_json("GET", f"{mint_url}/v1/mint/quote/bolt11/{quote_id}")
        if data.get("state") == "PAID":
            return
        assert time.monotonic() < deadline, data
        await asyncio.sleep(0.2)


def invoice_sat(request: str) -> int:
    msat = bolt11.decode(request).amount_msat
    assert msat is not None and msat % 1000 == 0
    return int(msat) // 1000


@dataclasses.dataclass
class LnurlServer:
    """A local LNURL-pay service (LUD-06/16): its invoices come from a recipient mint."""

    recipient_mint: str
    url: str = ""
    host: str = ""
    asked_msat: list[int] = dataclasses.field(default_factory=list)
    paid_to: list[str] = dataclasses.field(default_factory=list)
    #: a dishonest service: invoices for this many sat more than asked
    lie_by_sat: int = 0

    def address(self, name: str = "operator") -> str:
        return f"{name}@{self.host}"

    async def well_known(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return web.json_response(
            {
                "tag": "payRequest",
                "callback": f"{self.url}/lnurlp/{name}/callback",
                "minSendable": 1000,
                "maxSendable": 100_000_000,
                "metadata": json.dumps([["text/plain", f"pay {name}"]]),
                "commentAllowed": 64,
            }
        )

    async def callback(self, request: web.Request) -> web.Response:
        msat = int(request.query["amount"])
        self.asked_msat.append(msat)
        if msat % 1000:
            return web.json_response({"status": "ERROR", "reason": "whole sats only"})
        quote, pr = await new_invoice(self.recipient_mint, msat // 1000 + self.lie_by_sat)
        self.paid_to.append(quote)
        return web.json_response({"pr": pr, "routes": []})


@contextlib.asynccontextmanager
async def lnurl_server(recipient_mint: str) -> AsyncIterator[LnurlServer]:
    server = LnurlServer(recipient_mint)
    app = web.Application()
    app.router.add_get("/.well-known/lnurlp/{name}", server.well_known)
    app.router.add_get("/lnurlp/{name}/callback", server.callback)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    server.host = f"127.0.0.1:{port}"
    server.url = f"http://{server.host}"
    try:
        yield server
    finally:
        await runner.cleanup()


async def fund_bot(daemon: Daemon, user: UserWallet, questions: int, sat: int = 200) -> int:
    """Pay ``questions`` answers of the dear model; returns what the bot now holds."""
    for i in range(questions):
        status, _, body = await ask(
            daemon.http_url or "", f"question {i}", await user.send_token(sat)
        )
        assert status == 200, body
    return sum((await daemon.wallet.balance_sat()).values())


async def cli(cfg: Config, *args: str) -> tuple[int, str, str]:
    """Run ``ecashbot wallet ...`` as the operator would, on the bot's wallet."""
    path = cfg.wallet.path / "cli-config.yaml"
    path.write_text(yaml.safe_dump({"mints": cfg.mints, "wallet": {"path": str(cfg.wallet.path)}}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "wallet",
        "--config",
        str(path),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def free_total(cfg: Config) -> int:
    """The free balance as ``ecashbot wallet balance`` prints it."""
    code, out, err = await cli(cfg, "balance")
    assert code == 0, err
    total = next(line for line in out.splitlines() if line.startswith("total"))
    return int(total.split()[1])


def fees_of(described: str) -> tuple[int, int]:
    """(amount, fees) from a transfer as the CLI describes it."""
    amount = int(re.search(r"amount\s+(\d+) sat", described).group(1))  # type: ignore[union-attr]
    fees = int(re.search(r"fees\s+(\d+) sat", described).group(1))  # type: ignore[union-attr]
    return amount, fees


# -- acceptance 1: HTTP 402 -> pay the invoice -> X-Cashu-Quote -> answer + change ---------


@session_loop
async def test_http_402_invoice_pays_for_an_answer_with_change_once(
    mint: MintProcess, fee_mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    cfg = bot_config(tmp_path / "bot", [mint.url, fee_mint.url], emulator_url)
    async with bot(cfg) as daemon:
        url = daemon.http_url or ""
        status, headers, body = await ask(url, "Why is the sky blue?", None)
        assert status == 402, body
        assert headers["X-Cashu"].startswith("creqA")
        ln = body["error"]["lightning"]
        assert ln["header"] == "X-Cashu-Quote" and ln["mint"] == mint.url
        assert invoice_sat(ln["invoice"]) == ln["amount_sat"] == body["error"]["amount_sat"]

        await wait_quote_paid(mint.url, ln["quote"])  # the user pays the invoice
        status, headers, body = await ask(
            url, "Why is the sky blue?", None, headers={"X-Cashu-Quote": ln["quote"]}
        )
        assert status == 200, body
        pay = body["payment"]
        assert pay["paid_sat"] == ln["amount_sat"] and pay["fee_sat"] == 0
        assert pay["charged_sat"] + pay["change_sat"] == pay["paid_sat"]
        assert pay["change"].startswith("cashuB") and headers["X-Cashu"] == pay["change"]
        receiver = await UserWallet.create(mint.url, tmp_path / "receiver")
        assert await receiver.receive(pay["change"]) == pay["change_sat"]

        # the same quote again: refused, nothing more minted
        status, _, again = await ask(
            url, "And again?", None, headers={"X-Cashu-Quote": ln["quote"]}
        )
        assert status == 409, again
        assert again["error"]["code"] == "quote_used"

        # the change of a paid invoice can be picked up again by its quote id
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{url}/v1/change", headers={"X-Cashu-Quote": ln["quote"]}) as r,
        ):
            picked = await r.json()
        assert r.status == 200 and picked["change"] == pay["change"]
        assert picked["already_received"] is True

        # a token from the second trusted mint: change is made at that mint
        user_b = await UserWallet.create(fee_mint.url, tmp_path / "user-b")
        await user_b.fund(300)
        status, _, body = await ask(url, "hi from mint B", await user_b.send_token(120))
        assert status == 200, body
        change_b = parse_token(body["payment"]["change"])
        assert change_b.mint == fee_mint.url
        swap_fee = -(-len(change_b.proofs) * 100 // 1000)  # the receiver's swap at 100 ppk
        received = await user_b.receive(body["payment"]["change"])
        assert received == body["payment"]["change_sat"] - swap_fee
    report = await audit(cfg)
    assert report.ok, report.table()
    assert report.minted_in_sat == ln["amount_sat"]


@session_loop
async def test_quote_errors_unknown_unpaid_both_headers(emulator_url: str, tmp_path: Path) -> None:
    # a mint whose invoices stay unpaid (nobody pays them; FakeWallet doesn't either)
    async with configured_mint(tmp_path / "mint", FAKEWALLET_BRR="FALSE") as unpaid_mint:
        cfg = bot_config(tmp_path / "bot", [unpaid_mint.url], emulator_url)
        async with bot(cfg) as daemon:
            url = daemon.http_url or ""
            status, _, body = await ask(url, "hello", None)
            assert status == 402
            quote = body["error"]["lightning"]["quote"]

            status, _, body = await ask(url, "hello", None, headers={"X-Cashu-Quote": quote})
            assert status == 402 and body["error"]["code"] == "quote_not_paid", body
            assert body["error"]["token_untouched"] is True

            for unknown in ("0f6e3c1a-93c4-4c6e-9a44-000000000000", "x"):
                status, _, body = await ask(url, "hello", None, headers={"X-Cashu-Quote": unknown})
                assert status == 404 and body["error"]["code"] == "unknown_quote", body

            status, _, body = await ask(
                url, "hello", "cashuBnotatoken", headers={"X-Cashu-Quote": quote}
            )
            assert status == 400, body
            assert await daemon.wallet.store.all_payments() == []
        report = await audit(cfg)
        assert report.ok and report.payments == 0, report.table()


# -- acceptance 2: Nostr question without token -> invoice DM -> paid -> answer + change --


async def answer_and_change(user: NostrUser, timeout_s: float = 30) -> tuple[str, str]:
    answer: str | None = None
    change: str | None = None

    def done(dm: ReceivedDM) -> bool:
        nonlocal answer, change
        if dm.text.startswith("cashuB"):
            change = dm.text
        elif RECEIPT.search(dm.text):
            answer = dm.text
        return answer is not None and change is not None

    await user.dms_until(done, timeout_s)
    assert answer is not None and change is not None
    return answer, change


async def next_invoice(user: NostrUser) -> tuple[str, str]:
    """The bot's explanation and its invoice DM (which holds only the bolt11)."""
    intro = await user.next_dm(20)
    assert "Lightning invoice" in intro.text, intro.text
    invoice = await user.next_dm(20)
    assert invoice.text.startswith("lnbc"), invoice.text
    return intro.text, invoice.text


@session_loop
async def test_nostr_question_without_token_gets_an_invoice_then_answer_and_change(
    local_relay: LocalRelay, mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    bot_keys = Keys.generate()
    bot_hex = bot_keys.public_key().to_hex()
    nostr = {
        "enabled": True,
        "nsec": bot_keys.secret_key().to_bech32(),
        "relays": [local_relay.url],
        "retry_interval_s": 0.5,
        "reconnect_s": 0.5,
    }
    cfg = bot_config(tmp_path / "bot", [mint.url], emulator_url, nostr=nostr, models=DEAR)
    async with bot(cfg), await NostrUser.create([local_relay.url]) as alice:
        await alice.send_nip17(bot_hex, "What is ecash?")
        intro, invoice = await next_invoice(alice)
        assert "creqA" in intro  # a Cashu wallet can still pay the NUT-18 request
        paid = invoice_sat(invoice)
        # FakeWallet: the invoice is paid by itself; the bot answers when it sees it
        answer, change = await answer_and_change(alice)
        charged, fee, change_sat = (int(x) for x in RECEIPT.search(answer).groups())  # type: ignore[union-attr]
        assert fee == 0 and charged + change_sat == paid
        assert "What is ecash?" in answer
        receiver = await UserWallet.create(mint.url, tmp_path / "r")
        assert await receiver.receive(change) == change_sat

        # a chosen amount
        await alice.send_nip17(bot_hex, "/invoice 200 What is a mint?")
        _, invoice = await next_invoice(alice)
        assert invoice_sat(invoice) == 200
        answer, change = await answer_and_change(alice)
        charged, fee, change_sat = (int(x) for x in RECEIPT.search(answer).groups())  # type: ignore[union-attr]
        assert charged + change_sat == 200 and parse_token(change).amount == change_sat

        # too small an amount is refused before any invoice exists
        await alice.send_nip17(bot_hex, "/invoice 100 What is Lightning?")
        reply = await alice.next_dm(20)
        assert "too little" in reply.text and "at least 151 sat" in reply.text
    report = await audit(cfg)
    assert report.ok, report.table()
    assert report.minted_in_sat == paid + 200


@session_loop
async def test_an_unpaid_dm_invoice_expires_silently(
    local_relay: LocalRelay, emulator_url: str, tmp_path: Path
) -> None:
    async with configured_mint(
        tmp_path / "mint", FAKEWALLET_BRR="FALSE", MINT_QUOTE_TTL="4"
    ) as unpaid_mint:
        bot_keys = Keys.generate()
        nostr = {
            "enabled": True,
            "nsec": bot_keys.secret_key().to_bech32(),
            "relays": [local_relay.url],
        }
        cfg = bot_config(
            tmp_path / "bot",
            [unpaid_mint.url],
            emulator_url,
            nostr=nostr,
            lightning={"poll_interval_s": 0.5},
        )
        async with bot(cfg) as daemon, await NostrUser.create([local_relay.url]) as alice:
            await alice.send_nip17(bot_keys.public_key().to_hex(), "Anyone there?")
            await next_invoice(alice)
            assert daemon.nostr is not None
            assert len(daemon.nostr._invoices) == 1
            await asyncio.sleep(6)  # past the quote's 4 s lifetime
            assert daemon.nostr._invoices == {}
            with pytest.raises(TimeoutError):
                extra = await alice.next_dm(1)
                pytest.fail(f"an expired invoice was answered: {extra.text[:80]}")


# -- acceptance 3: withdraw to an invoice and to a Lightning address; send a token -------


@session_loop
async def test_withdraw_to_invoice_and_lightning_address_and_send_a_token(
    mint: MintProcess, fee_mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    cfg = bot_config(tmp_path / "bot", [mint.url], emulator_url, models=DEAR)
    user = await UserWallet.create(mint.url, tmp_path / "user")
    await user.fund(2000)
    async with bot(cfg) as daemon, lnurl_server(fee_mint.url) as lnurl:
        held = await fund_bot(daemon, user, 3)
        assert await free_total(cfg) == held > 400

        # to a bolt11 invoice (from another mint: a real Lightning payment for this mint)
        _, invoice = await new_invoice(fee_mint.url, 100)
        code, out, err = await cli(cfg, "withdraw", "--invoice", invoice)
        assert code == 0, err
        amount, fees = fees_of(out)
        assert amount == 100 and 0 < fees <= 2  # FakeWallet: reserve 2, pays 1, 1 comes back
        after = await free_total(cfg)
        assert after == held - amount - fees

        # to a Lightning address, by LNURL-pay
        code, out, err = await cli(
            cfg, "withdraw", "--lnaddress", lnurl.address(), "--amount", "50"
        )
        assert code == 0, err
        assert lnurl.asked_msat == [50_000]
        amount2, fees2 = fees_of(out)
        assert amount2 == 50
        assert await free_total(cfg) == after - amount2 - fees2

        # a token for the operator's own wallet
        code, token, err = await cli(cfg, "send", "21")
        assert code == 0, err
        token = token.strip()
        assert token.startswith("cashuB") and parse_token(token).amount == 21
        _, fees3 = fees_of(err)
        receiver = await UserWallet.create(mint.url, tmp_path / "operator")
        assert await receiver.receive(token) == 21
        assert await free_total(cfg) == after - amount2 - fees2 - 21 - fees3

        code, out, _ = await cli(cfg, "history")
        assert code == 0 and out.count(": done") == 3 and token in out
    report = await audit(cfg)
    assert report.ok, report.table()
    assert report.paid_out_sat == 150 and report.sent_out_sat == 21
    assert report.held_sat == held - 150 - 21 - report.out_fee_sat


@session_loop
async def test_a_failed_melt_leaves_the_balance_intact(
    mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    async with configured_mint(
        tmp_path / "mint",
        FAKEWALLET_PAY_INVOICE_STATE="FAILED",
        FAKEWALLET_PAYMENT_STATE="FAILED",
        FAKEWALLET_DELAY_OUTGOING_PAYMENT="0",
    ) as failing:
        cfg = bot_config(tmp_path / "bot", [failing.url], emulator_url, models=DEAR)
        user = await UserWallet.create(failing.url, tmp_path / "user")
        await user.fund(1000)
        async with bot(cfg) as daemon:
            held = await fund_bot(daemon, user, 2)
            _, invoice = await new_invoice(mint.url, 100)
            code, _, err = await cli(cfg, "withdraw", "--invoice", invoice)
            assert code == 1 and "failed" in err, err
            assert await free_total(cfg) == held
            transfers = await daemon.wallet.store.all_transfers()
            assert [t.status for t in transfers] == ["failed"]

            # too large, and a fee reserve above the limit: refused before any melt
            code, _, err = await cli(cfg, "withdraw", "--invoice", invoice, "--max-fee", "0")
            assert code == 1 and "fee reserve" in err, err
            _, big = await new_invoice(mint.url, held + 1)
            code, _, err = await cli(cfg, "withdraw", "--invoice", big)
            assert code == 1 and "free sat" in err, err
            code, _, err = await cli(cfg, "withdraw", "--invoice", "lnbc1notaninvoice")
            assert code == 1 and "bolt11" in err, err
            assert await free_total(cfg) == held
        report = await audit(cfg)
        assert report.ok, report.table()
        assert report.paid_out_sat == 0


# -- acceptance 4: automatic payout above the threshold, keeping the float ---------------


@session_loop
async def test_automatic_payout_fires_once_and_keeps_the_float(
    mint: MintProcess, fee_mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    user = await UserWallet.create(mint.url, tmp_path / "user")
    await user.fund(1000)
    async with lnurl_server(fee_mint.url) as lnurl:
        payout = {
            "lnaddress": lnurl.address(),
            "threshold_sat": 250,
            "float_sat": 40,
            "interval_s": 0.3,
        }
        cfg = bot_config(tmp_path / "bot", [mint.url], emulator_url, models=DEAR, payout=payout)
        async with bot(cfg) as daemon:
            held = await fund_bot(daemon, user, 1)
            await asyncio.sleep(1)
            assert lnurl.asked_msat == []  # below the threshold: nothing paid out
            held = await fund_bot(daemon, user, 1)
            assert held > 250
            for _ in range(100):
                done = [t for t in await daemon.wallet.store.all_transfers() if t.status == "done"]
                if done:
                    break
                await asyncio.sleep(0.1)
            assert len(done) == 1, done
            await asyncio.sleep(1.5)  # several more passes: no second payout
            transfers = await daemon.wallet.store.all_transfers()
            assert [t.status for t in transfers] == ["done"]
            left = await daemon.wallet.free_sat(mint.url)
            assert 40 <= left < 250
            assert left == held - transfers[0].amount_sat - transfers[0].fee_sat
            assert transfers[0].destination and lnurl.address() in transfers[0].destination
    report = await audit(cfg)
    assert report.ok, report.table()


# -- crash safety: lost answers of mint and melt calls are resolved, never repeated ------


@session_loop
async def test_lost_mint_and_melt_answers_are_resolved_from_the_quote_state(
    mint: MintProcess, fee_mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    calls: dict[str, int] = {}

    async def lose_first_answers(
        request: web.Request, status: int, payload: bytes
    ) -> web.Response | None:
        calls[request.path] = calls.get(request.path, 0) + 1
        if request.path in ("/v1/mint/bolt11", "/v1/melt/bolt11") and calls[request.path] == 1:
            return web.Response(status=502)  # done at the mint, the answer lost
        return None

    proxy = MintProxy(mint.url, after=lose_first_answers)
    await proxy.start()
    proxy_url = proxy.url
    try:
        cfg = bot_config(tmp_path / "bot", [proxy_url], emulator_url, models=DEAR)
        async with bot(cfg) as daemon:
            url = daemon.http_url or ""
            status, _, body = await ask(url, "hello", None, headers={})
            assert status == 402
            # a larger invoice than asked, so the bot has something to withdraw later
            invoice = await daemon.pipeline.invoice(400, transport="http")
            assert invoice is not None
            await wait_quote_paid(mint.url, invoice.quote_id)
            status, _, body = await ask(
                url, "hello", None, headers={"X-Cashu-Quote": invoice.quote_id}
            )
            assert status == 200, body  # the lost mint answer was restored (NUT-09)
            assert calls["/v1/mint/bolt11"] == 1
            held = sum((await daemon.wallet.balance_sat()).values())
            assert held == body["payment"]["charged_sat"]

            _, pay_to = await new_invoice(fee_mint.url, 60)
            rec = await daemon.wallet.pay_invoice(pay_to)
            assert rec.status == "done" and rec.amount_sat == 60
            assert calls["/v1/melt/bolt11"] == 1  # checked by its quote, not sent again
            assert await daemon.wallet.free_sat(proxy_url) == held - 60 - rec.fee_sat
            change = encode_token(
                dataclasses.replace(parse_token(body["payment"]["change"]), mint=mint.url)
            )
        receiver = await UserWallet.create(mint.url, tmp_path / "r")
        assert await receiver.receive(change) == body["payment"]["change_sat"]
        report = await audit(cfg)
        assert report.ok, report.table()
    finally:
        await proxy.stop()


@session_loop
async def test_an_interrupted_mint_and_an_unused_paid_invoice_are_refunded(
    mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    """The mint issues, then goes away before answering: recovery restores and refunds.
    A paid invoice nobody came back for is minted and kept as a refund too."""
    mode = {"now": "up"}

    async def down(request: web.Request, body: bytes) -> web.Response | None:
        return web.Response(status=502) if mode["now"] == "down" else None

    async def lose_mint(request: web.Request, status: int, payload: bytes) -> web.Response | None:
        if request.path == "/v1/mint/bolt11" and mode["now"] == "lose-mint":
            mode["now"] = "down"  # issued at the mint; the answer and the mint are gone
            return web.Response(status=502)
        return None

    proxy = MintProxy(mint.url, before=down, after=lose_mint)
    await proxy.start()
    proxy_url = proxy.url

    async def pick_up(url: str, quote_id: str) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{url}/v1/change", headers={"X-Cashu-Quote": quote_id}) as r,
        ):
            assert r.status == 200, await r.text()
            got: dict[str, Any] = await r.json()
            return got

    receiver = await UserWallet.create(mint.url, tmp_path / "r")
    try:
        cfg = bot_config(
            tmp_path / "bot", [proxy_url], emulator_url, lightning={"refund_unused_after_s": 1}
        )
        async with bot(cfg) as daemon:
            url = daemon.http_url or ""
            _, _, body = await ask(url, "hello", None)
            lost = body["error"]["lightning"]
            _, _, body = await ask(url, "hello again", None)
            unused = body["error"]["lightning"]
            await wait_quote_paid(mint.url, lost["quote"])
            await wait_quote_paid(mint.url, unused["quote"])

            mode["now"] = "lose-mint"
            status, _, body = await ask(
                url, "hello", None, headers={"X-Cashu-Quote": lost["quote"]}
            )
            assert status == 503 and "pending" in body["error"]["message"], body
            mode["now"] = "up"
            await asyncio.sleep(1.1)
            await recover_once(daemon, min_age_s=0)

            for invoice in (lost, unused):
                got = await pick_up(url, invoice["quote"])
                assert got["refunded"] is True and got["charged_sat"] == 0
                assert got["change_sat"] == got["paid_sat"] == invoice["amount_sat"]
                refund = encode_token(
                    dataclasses.replace(parse_token(got["change"]), mint=mint.url)
                )
                assert await receiver.receive(refund) == invoice["amount_sat"]
            status, _, body = await ask(
                url, "late", None, headers={"X-Cashu-Quote": unused["quote"]}
            )
            assert status == 409 and "/v1/change" in body["error"]["message"], body
        report = await audit(cfg)
        assert report.ok, report.table()
        assert report.minted_in_sat == lost["amount_sat"] + unused["amount_sat"]
        assert report.kept_sat == 0
    finally:
        await proxy.stop()


# -- the pure parts: LNURL addresses, input selection, NUT-08 blanks, /invoice DMs --------


def test_lightning_addresses_are_https_except_on_this_machine() -> None:
    assert address_url("Alice@Wallet.Example") == "https://wallet.example/.well-known/lnurlp/alice"
    assert address_url("bob@127.0.0.1:8080") == "http://127.0.0.1:8080/.well-known/lnurlp/bob"
    assert address_url("bob@localhost") == "http://localhost/.well-known/lnurlp/bob"
    for bad in ("nobody", "a@b@c", "@host", "name@", "na me@host", "x@host/path"):
        with pytest.raises(LnurlError):
            address_url(bad)


def _proofs(*amounts: int) -> list[Proof]:
    return [
        Proof(amount=a, keyset_id="00" * 8, secret=f"s{i}", C="02" + "00" * 32)
        for i, a in enumerate(amounts)
    ]


def test_inputs_cover_amount_and_fees_with_little_overpaid() -> None:
    held = _proofs(1, 2, 4, 8, 16, 32, 64, 128)
    chosen = select_inputs(held, lambda ps: 100 + -(-len(ps) * 100 // 1000))
    assert chosen is not None
    total = sum(p.amount for p in chosen)
    assert total >= 100 + -(-len(chosen) * 100 // 1000) and total - 100 <= 4
    assert select_inputs(held, lambda ps: 256) is None
    assert [p.amount for p in select_inputs(held, lambda ps: 64) or []] == [64]


def test_nut08_blanks_can_return_any_overpaid_fee() -> None:
    assert blank_outputs(0) == 0 and blank_outputs(1) == 1 and blank_outputs(2) == 1
    for overpaid in range(1, 5000):
        assert bin(overpaid).count("1") <= blank_outputs(overpaid)


def test_invoice_command_in_a_dm() -> None:
    req = parse_dm("/invoice 200 What is a mint?")
    assert (req.command, req.invoice_sat, req.question) == ("invoice", 200, "What is a mint?")
    req = parse_dm("/invoice What is a mint?")
    assert (req.command, req.invoice_sat, req.question) == ("invoice", None, "What is a mint?")
    assert parse_dm("/invoice").question == ""


@session_loop
async def test_an_lnurl_invoice_must_be_for_the_amount_asked(fee_mint: MintProcess) -> None:
    async with lnurl_server(fee_mint.url) as lnurl, aiohttp.ClientSession() as s:
        pr = await fetch_invoice(s, lnurl.address(), 21_000)
        assert invoice_sat(pr) == 21
        with pytest.raises(LnurlError, match=r"1000\.\.100000000"):
            await fetch_invoice(s, lnurl.address(), 999)
        with pytest.raises(LnurlError, match="whole sats"):
            await fetch_invoice(s, lnurl.address(), 21_500)
        lnurl.lie_by_sat = 1
        with pytest.raises(LnurlError, match="not the 21000 msat"):
            await fetch_invoice(s, lnurl.address(), 21_000)
        with pytest.raises(LnurlError, match="did not answer"):
            await fetch_invoice(s, f"x@127.0.0.1:{free_port()}", 21_000)
