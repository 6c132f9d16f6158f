"""Never lose a sat: change picked up again, lost swaps restored, crashes refunded, and
an audit that balances to the sat. Against a real mint, a real bot process and the SDK."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from bot.audit import audit
from bot.daemon import recover_once
from bot.llm.emulator import Emulator, start_emulator
from mint_client.tokens import encode_token, parse_token
from tests.bot_harness import ask, bot, bot_config
from tests.support.fixtures import MintFactory
from tests.support.mint import MintProcess
from tests.support.mint_proxy import MintProxy
from tests.support.ports import free_port, wait_http
from tests.support.user_wallet import UserWallet

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def pick_up(url: str, **how: str) -> tuple[int, dict[str, Any]]:
    headers = {"X-Cashu": how["token"]} if "token" in how else {}
    body = {"request_id": how["request_id"]} if "request_id" in how else None
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/change", headers=headers, json=body) as r,
    ):
        return r.status, await r.json()


async def test_change_lost_by_the_client_is_picked_up_later(
    mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    wallet = await UserWallet.create(mint.url, tmp_path / "wallet")
    await wallet.fund(1000)
    token = await wallet.send_token(300)
    cfg = bot_config(tmp_path / "bot", [mint.url], emulator_url)
    async with bot(cfg) as daemon:
        url = daemon.http_url or ""
        # the client sends its paid request and goes away without reading the response
        async with aiohttp.ClientSession() as s:
            r = await s.post(
                f"{url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hello"}]},
                headers={"X-Cashu": token},
            )
            r.close()
        await daemon.pipeline.drain()
        assert await wallet.token_state(token) == "spent"

        status, first = await pick_up(url, token=token)
        assert status == 200, first
        assert first["change"].startswith("cashuB") and first["already_received"] is False
        assert first["charged_sat"] + first["change_sat"] + first["fee_sat"] == 300
        status, second = await pick_up(url, request_id=first["request_id"])
        assert status == 200 and second["change"] == first["change"]

        receiver = await UserWallet.create(mint.url, tmp_path / "r")
        assert await receiver.receive(first["change"]) == first["change_sat"]
        status, third = await pick_up(url, token=token)
        assert status == 200
        assert third["already_received"] is True
        assert "already received" in third["message"]

        status, unknown = await pick_up(url, token=await wallet.send_token(10))
        assert status == 404 and unknown["error"]["code"] == "change_not_found"
        report = await audit(cfg)
        assert report.ok, report.table()
        assert report.change_picked_up == 1


async def test_a_swap_lost_with_the_mint_is_restored_and_refunded(
    mint_factory: MintFactory, emulator_url: str, tmp_path: Path
) -> None:
    """The mint does the swap and dies before answering: the bot restores it later."""
    mint = await mint_factory()
    killed: list[bool] = []

    async def kill_on_first_swap(
        request: web.Request, status: int, payload: bytes
    ) -> web.Response | None:
        if request.path == "/v1/swap" and not killed:
            killed.append(True)
            await mint.kill()  # processed the swap, then died before answering
            return web.Response(status=502)
        return None

    proxy = MintProxy(mint.url, after=kill_on_first_swap)
    await proxy.start()
    proxy_url = proxy.url
    try:
        wallet = await UserWallet.create(mint.url, tmp_path / "wallet")
        await wallet.fund(500)
        token = await wallet.send_token(200)
        via_proxy = encode_token(dataclasses.replace(parse_token(token), mint=proxy_url))
        cfg = bot_config(tmp_path / "bot", [proxy_url], emulator_url)
        async with bot(cfg) as daemon:
            status, _, body = await ask(daemon.http_url or "", "hi", via_proxy)
            assert status == 503, body
            assert "pending" in body["error"]["message"]
            await mint.restart()
            await recover_once(daemon, min_age_s=0)
            status, got = await pick_up(daemon.http_url or "", token=via_proxy)
            assert status == 200, got
            assert got["refunded"] is True
            assert got["change_sat"] == 200 - got["fee_sat"]
        refund = encode_token(dataclasses.replace(parse_token(got["change"]), mint=mint.url))
        receiver = await UserWallet.create(mint.url, tmp_path / "r")
        assert await receiver.receive(refund) == got["change_sat"]
        report = await audit(cfg)
        assert report.ok, report.table()
        assert report.difference_sat == 0
    finally:
        await proxy.stop()


def _start_bot(cfg_path: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bot", "serve", "--config", str(cfg_path)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def test_a_bot_killed_between_redeem_and_answer_refunds_after_restart(
    mint: MintProcess, tmp_path: Path
) -> None:
    emu = Emulator(ttft_ms=0, chunk_delay_ms=0)
    running = await start_emulator(emu)
    port = free_port()
    cfg_data = {
        "mints": [mint.url],
        "wallet": {"path": str(tmp_path / "bot")},
        "http": {"port": port},
        "gemini": {"api_key": "k", "base_url": running.url, "api_version": "v1beta"},
    }
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_data))
    log = tmp_path / "bot.log"
    url = f"http://127.0.0.1:{port}"
    proc = _start_bot(cfg_path, log)
    try:
        await wait_http(f"{url}/health", 30)
        wallet = await UserWallet.create(mint.url, tmp_path / "wallet")
        await wallet.fund(500)
        token = await wallet.send_token(250)
        # the model takes 30 s: the bot is killed while it waits, after redeeming
        pending = asyncio.create_task(ask(url, "slow [emulator:delay-ms=30000]", token))
        for _ in range(200):
            if await wallet.token_state(token) == "spent":
                break
            await asyncio.sleep(0.05)
        assert await wallet.token_state(token) == "spent"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        with pytest.raises(aiohttp.ClientError):
            await pending
        proc = _start_bot(cfg_path, log)
        await wait_http(f"{url}/health", 30)
        status, got = await pick_up(url, token=token)
        assert status == 200, got
        assert got["refunded"] is True and got["charged_sat"] == 0
        assert got["change_sat"] == 250 - got["fee_sat"]
        receiver = await UserWallet.create(mint.url, tmp_path / "r")
        assert await receiver.receive(got["change"]) == got["change_sat"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        await running.stop()
    report = await audit(bot_config(tmp_path / "bot", [mint.url], running.url))
    assert report.ok, report.table()


async def test_the_audit_cli_finds_a_corrupted_journal_row(
    mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    wallet = await UserWallet.create(mint.url, tmp_path / "wallet")
    await wallet.fund(1000)
    cfg_data = {
        "mints": [mint.url],
        "wallet": {"path": str(tmp_path / "bot")},
        "gemini": {"api_key": "k", "base_url": emulator_url, "api_version": "v1beta"},
    }
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_data))
    cfg = bot_config(tmp_path / "bot", [mint.url], emulator_url)
    async with bot(cfg) as daemon:
        for _ in range(3):
            status, _, body = await ask(daemon.http_url or "", "hi", await wallet.send_token(200))
            assert status == 200, body

    def run_audit() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bot", "audit", "--config", str(cfg_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    clean = await asyncio.to_thread(run_audit)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "OK: the books balance." in clean.stdout

    # one payment's record now claims a sat more was charged than its proofs show
    with contextlib.closing(sqlite3.connect(tmp_path / "bot" / "wallet.sqlite3")) as db:
        (pid,) = db.execute("SELECT id FROM payments WHERE status='settled' LIMIT 1").fetchone()
        db.execute("UPDATE payments SET charged_sat = charged_sat + 1 WHERE id=?", (pid,))
        db.commit()
    broken = await asyncio.to_thread(run_audit)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert f"PROBLEM: payment {pid}" in broken.stdout
