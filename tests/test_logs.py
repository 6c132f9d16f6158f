"""The bot's log: one line per paid request with its request id, plain or JSON, and no
token, nsec or operator token in any line, even when something tries to log one."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from nostr_sdk import Keys

from bot.llm.emulator import Emulator, start_emulator
from bot.logs import JsonFormatter, RedactSecrets, redact, setup_logging
from tests.bot_harness import ask
from tests.support.bot_process import BotProcess
from tests.support.log_check import SecretCatcher, find_secrets
from tests.support.mint import MintProcess
from tests.support.ports import free_port
from tests.support.user_wallet import UserWallet

NSEC = Keys.generate().secret_key().to_bech32()
TOKEN_B = "cashuBo2FteBVodHRwOi8vMTI3LjAuMC4xOjMzMzhhdWNzYXRhdIGiYWlIAJ" + "x" * 80
TOKEN_A = "cashuAeyJ0b2tlbiI6W3sibWludCI6Imh0dHA6Ly8xMjcuMC4wLjE6MzMzOCJ9XX0="
CREQ = "creqApWF0gaNhdGVub3N0cmFheKlucHJvZmlsZTFxeTg4d3VtbjhnaGo3dW45ZDNzaGp0"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing through the CLI's filter and the JSON formatter into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger("ecashbot.test-logs")
    logger.addHandler(handler)
    logger.propagate = False  # the suite's own check must not see these on purpose
    logger.setLevel(logging.DEBUG)
    try:
        yield logger, buffer
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def test_redact_replaces_tokens_requests_keys_and_the_operator_token() -> None:
    text = (
        f"a {TOKEN_B} b cashu:{TOKEN_A} c {CREQ} d {NSEC} "
        "GET /dashboard?token=op-s3cret&x=1 Authorization: Bearer op-s3cret"
    )
    clean = redact(text)
    for secret in (TOKEN_B, TOKEN_A, CREQ, NSEC, "op-s3cret"):
        assert secret not in clean
    assert "cashu[redacted]" in clean and "nsec1[redacted]" in clean
    assert "/dashboard?token=[redacted]&x=1" in clean
    # words that merely name the formats stay
    assert redact("send a cashuA or cashuB token") == "send a cashuA or cashuB token"


def test_the_filter_redacts_messages_arguments_extras_and_tracebacks(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    log, buffer = captured
    log.info("got %s from %s", TOKEN_B, NSEC, extra={"change": TOKEN_A})
    try:
        raise ValueError(f"bad token {TOKEN_B}")
    except ValueError:
        log.exception("failed on %s", CREQ)
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert len(lines) == 2
    assert not find_secrets(buffer.getvalue()) and CREQ not in buffer.getvalue()
    assert lines[0]["message"] == "got cashu[redacted] from nsec1[redacted]"
    assert lines[0]["change"] == "cashu[redacted]"
    assert lines[1]["level"] == "ERROR"
    assert "ValueError: bad token cashu[redacted]" in lines[1]["exc"]


def test_the_suites_check_finds_what_the_filter_would_redact() -> None:
    catcher = SecretCatcher()
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "change %s", (TOKEN_B,), None)
    catcher.handle(record)
    found = catcher.take()
    assert len(found) == 1 and TOKEN_B not in found[0]  # reported redacted
    assert find_secrets(f"key {NSEC}") == [NSEC]
    assert find_secrets("X-Cashu must hold a cashuA or cashuB token") == []


def test_setup_logging_writes_plain_or_json_lines() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        for fmt in ("plain", "json"):
            buffer = io.StringIO()
            setup_logging("INFO", fmt, stream=buffer)  # type: ignore[arg-type]
            logging.getLogger("ecashbot.x").info("hello %s", TOKEN_B, extra={"request_id": "r1"})
            line = buffer.getvalue().strip()
            assert TOKEN_B not in line
            if fmt == "json":
                data = json.loads(line)
                assert data["message"] == "hello cashu[redacted]" and data["request_id"] == "r1"
            else:
                assert line.endswith("INFO ecashbot.x: hello cashu[redacted]")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@pytest.mark.asyncio(loop_scope="session")
async def test_a_bot_process_logs_one_json_line_per_paid_request_and_no_secret(
    mint: MintProcess, tmp_path: Path
) -> None:
    emulator = await start_emulator(Emulator(ttft_ms=0, chunk_delay_ms=0))
    user = await UserWallet.create(mint.url, tmp_path / "user")
    await user.fund(500)
    port = free_port()
    operator = "operator-s3cret-for-the-log-test"
    config = {
        "mints": [mint.url],
        "wallet": {"path": str(tmp_path / "bot" / "data")},
        "http": {"port": port},
        "gemini": {"api_key": "test-key", "base_url": emulator.url, "api_version": "v1beta"},
        "operator": {"token": operator},
        "log": {"format": "json"},
    }
    url = f"http://127.0.0.1:{port}"
    token = await user.send_token(100)
    try:
        async with BotProcess(tmp_path / "bot", config, ready_line="HTTP listening on") as bot:
            status, _, body = await ask(url, "hello [emulator:words=20]", token)
            assert status == 200, body
            # the token in a URL ends up in the access log: redacted there
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"{url}/dashboard", params={"token": operator}, allow_redirects=False) as r,
            ):
                assert r.status == 303
    finally:
        await user.close()
        await emulator.stop()
    log = bot.log_text()
    assert operator not in log and token not in log and body["payment"]["change"] not in log
    assert not find_secrets(log)
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    paid = [r for r in records if r.get("event") == "paid_request"]
    assert len(paid) == 1
    line = paid[0]
    assert line["request_id"] == body["payment"]["request_id"]
    assert line["transport"] == "http" and line["model"] == "gemini-2.5-flash"
    assert line["outcome"] == "answered" and line["latency_ms"] >= 0
    assert line["charged_sat"] == body["payment"]["charged_sat"]
    assert line["change_sat"] == body["payment"]["change_sat"]
    assert line["output_tokens"] == body["usage"]["completion_tokens"]
    assert line["message"].startswith(f"paid request id={line['request_id']} transport=http")
    assert any("/dashboard?token=[redacted]" in r["message"] for r in records)
