"""The operator's view after a scripted run of real paid requests (HTTP and a Nostr DM,
a real mint, the Gemini emulator): the dashboard in a real headless Chromium shows the
statistics of ``GET /v1/stats``, ``GET /metrics`` counts exactly what was paid, and both
stay closed without the operator token."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from nostr_sdk import Keys
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from bot.daemon import Daemon
from bot.dashboard import COOKIE
from bot.llm.emulator import Emulator, start_emulator
from tests.bot_harness import ask, bot, bot_config
from tests.support.mint import MintProcess
from tests.support.nostr_user import NostrUser, ReceivedDM
from tests.support.relays import LocalRelay
from tests.support.user_wallet import UserWallet

pytestmark = pytest.mark.asyncio(loop_scope="session")

REPO = Path(__file__).resolve().parent.parent
#: where the screenshot goes (gitignored); TEST_ARTIFACTS_DIR overrides it
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR") or REPO / "test-artifacts")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

OPERATOR_TOKEN = "operator-token-for-the-dashboard-test"
BEARER = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
DAILY_TOKENS = 100_000
LITE_TOKENS = 20_000
# prices high enough that every answer costs whole sats
MODELS = {
    "gemini-2.5-flash": {
        "input_msat_per_1k": 20_000,
        "output_msat_per_1k": 100_000,
        "thinking_budget": 200,
    },
    "gemini-2.5-flash-lite": {
        "input_msat_per_1k": 10_000,
        "output_msat_per_1k": 50_000,
        "request_msat": 1_500,
    },
}
RECEIPT = re.compile(r"charged (\d+) sat, mint fee (\d+) sat, change (\d+) sat")


@dataclass
class ScriptedRun:
    """A bot after its script: what each HTTP payment said, and its statistics."""

    daemon: Daemon
    url: str
    mint_url: str
    relay_url: str
    #: the ``payment`` object (plus ``model``) of every paid HTTP request
    http_payments: list[dict[str, Any]]
    #: GET /v1/stats after the run
    stats: dict[str, Any]


async def _dm_answer_and_change(user: NostrUser) -> None:
    got: dict[str, str] = {}

    def done(dm: ReceivedDM) -> bool:
        if dm.text.startswith("cashuB"):
            got["change"] = dm.text
        elif RECEIPT.search(dm.text):
            got["answer"] = dm.text
        return len(got) == 2

    await user.dms_until(done, 30)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def run(
    mint: MintProcess, local_relay: LocalRelay, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ScriptedRun]:
    emulator = await start_emulator(Emulator(ttft_ms=0, chunk_delay_ms=0))
    user = await UserWallet.create(mint.url, tmp_path_factory.mktemp("dashboard-user"))
    await user.fund(3000)
    bot_keys = Keys.generate()
    cfg = bot_config(
        tmp_path_factory.mktemp("dashboard-bot"),
        [mint.url],
        emulator.url,
        models=MODELS,
        operator={"token": OPERATOR_TOKEN},
        budget={"daily_tokens": DAILY_TOKENS, "per_model": {"gemini-2.5-flash-lite": LITE_TOKENS}},
        nostr={
            "enabled": True,
            "nsec": bot_keys.secret_key().to_bech32(),
            "relays": [local_relay.url],
            "retry_interval_s": 0.5,
            "reconnect_s": 0.5,
        },
    )
    script = [
        ("one [emulator:words=50]", None, False),
        ("two [emulator:words=80]", "gemini-2.5-flash-lite", True),
        ("three [emulator:error=500]", None, False),
        ("four [emulator:words=10] [emulator:thoughts=20]", None, True),
        ("five [emulator:words=30]", "gemini-2.5-flash-lite", False),
    ]
    try:
        async with bot(cfg) as daemon, await NostrUser.create([local_relay.url]) as alice:
            url = daemon.http_url or ""
            payments: list[dict[str, Any]] = []
            for question, model, stream in script:
                status, _, body = await ask(
                    url, question, await user.send_token(150), model=model, stream=stream
                )
                assert status in (200, 502), body
                final = body[-2] if stream else body
                payments.append({**final["payment"], "model": model or cfg.default_model})
            # a question without a token: refused with a 402, counted as a refusal
            status, _, _ = await ask(url, "six", None)
            assert status == 402
            # one question over Nostr
            token = await user.send_token(150)
            await alice.send_nip17(bot_keys.public_key().to_hex(), f"seven\n{token}")
            await _dm_answer_and_change(alice)
            async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/stats", headers=BEARER) as r:
                assert r.status == 200
                stats = await r.json()
            yield ScriptedRun(daemon, url, mint.url, local_relay.url, payments, stats)
    finally:
        await user.close()
        await emulator.stop()


# -- /metrics ---------------------------------------------------------------------------


class Scrape:
    """A parsed /metrics page."""

    def __init__(self, text: str) -> None:
        self.samples = [
            s for family in text_string_to_metric_families(text) for s in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        found = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert found, f"no sample {name} {labels}"
        return sum(found)

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.samples)


async def _scrape(url: str, headers: dict[str, str]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics", headers=headers) as r:
        return r.status, await r.text()


async def test_metrics_count_exactly_what_the_scripted_run_paid(run: ScriptedRun) -> None:
    status, text = await _scrape(run.url, BEARER)
    assert status == 200
    m = Scrape(text)
    life = run.stats["lifetime"]
    assert life["requests"] == 6 and life["refunds"] == 1

    # requests, tokens and sats: the same numbers as the statistics
    assert m.value("ecashbot_paid_requests_total") == life["requests"]
    assert m.value("ecashbot_paid_requests_total", outcome="refunded") == life["refunds"]
    assert m.value("ecashbot_paid_requests_total", transport="nostr") == 1
    assert m.value("ecashbot_paid_requests_total", transport="http") == 5
    assert m.value("ecashbot_tokens_total", kind="input") == life["input_tokens"]
    assert m.value("ecashbot_tokens_total", kind="output") == life["output_tokens"]
    assert m.value("ecashbot_tokens_total", kind="thinking") == life["thinking_tokens"] > 0
    for kind, counter in [
        ("charged", "charged_sat"),
        ("change", "change_sat"),
        ("fee", "fee_sat"),
        ("refund", "refund_sat"),
    ]:
        assert m.value("ecashbot_sats_total", kind=kind) == life[counter], kind
    for model, by in run.stats["by_model"].items():
        lt = by["lifetime"]
        assert m.value("ecashbot_paid_requests_total", model=model) == lt["requests"]
        assert m.value("ecashbot_sats_total", model=model, kind="charged") == lt["charged_sat"]

    # ... and the same as the HTTP responses said, payment by payment
    http = run.http_payments
    for kind, field in [("paid", "paid_sat"), ("charged", "charged_sat"), ("fee", "fee_sat")]:
        assert m.value("ecashbot_sats_total", transport="http", kind=kind) == sum(
            p[field] for p in http
        )
    assert m.value("ecashbot_sats_total", transport="http", kind="change") == sum(
        p["change_sat"] for p in http if not p["refunded"]
    )
    assert m.value("ecashbot_sats_total", transport="http", kind="refund") == sum(
        p["change_sat"] for p in http if p["refunded"]
    )

    # latency, time to first token, refusals
    assert m.value("ecashbot_paid_request_duration_seconds_count") == 6
    assert m.value("ecashbot_time_to_first_token_seconds_count") == 5  # not the failed one
    assert m.value("ecashbot_refused_requests_total", reason="payment_required") == 1
    assert not m.has("ecashbot_mint_call_errors_total")

    # mint, relay, wallet, budget
    assert m.value("ecashbot_mint_call_duration_seconds_count", mint=run.mint_url, op="swap") >= 6
    assert m.value("ecashbot_mint_up", mint=run.mint_url) == 1
    assert m.value("ecashbot_relay_connected", relay=run.relay_url) == 1
    held = run.stats["wallet"]["held_sat"]
    assert m.value("ecashbot_wallet_held_sat", mint=run.mint_url) == held[run.mint_url]
    assert held[run.mint_url] == life["charged_sat"]
    used = run.stats["budget"]["today"]
    assert m.value("ecashbot_budget_left_tokens", model="all") == DAILY_TOKENS - used["tokens"]
    assert (
        m.value("ecashbot_budget_left_tokens", model="gemini-2.5-flash-lite")
        == LITE_TOKENS - used["by_model"]["gemini-2.5-flash-lite"]
    )


async def test_metrics_need_the_operator_token(run: ScriptedRun) -> None:
    assert (await _scrape(run.url, {}))[0] == 401
    assert (await _scrape(run.url, {"Authorization": "Bearer wrong"}))[0] == 401


async def test_metrics_can_be_open_and_everything_is_off_without_a_token(
    mint: MintProcess, tmp_path: Path
) -> None:
    open_cfg = bot_config(
        tmp_path / "open",
        [mint.url],
        "http://127.0.0.1:9",
        operator={"token": "t0ken", "metrics_require_token": False},
    )
    async with bot(open_cfg) as daemon:
        status, text = await _scrape(daemon.http_url or "", {})
        assert status == 200 and "ecashbot_paid_requests" in text
    off_cfg = bot_config(tmp_path / "off", [mint.url], "http://127.0.0.1:9")
    async with bot(off_cfg) as daemon, aiohttp.ClientSession() as s:
        for path in ("/metrics", "/dashboard", "/dashboard/data"):
            async with s.get(f"{daemon.http_url}{path}") as r:
                assert r.status == 404, path


# -- logging in -------------------------------------------------------------------------


async def test_the_dashboard_takes_the_token_once_and_keeps_an_httponly_cookie(
    run: ScriptedRun,
) -> None:
    url = run.url
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/dashboard") as r:
            assert r.status == 401
            assert 'action="/dashboard/login"' in await r.text()
        async with s.get(f"{url}/dashboard/data") as r:
            assert r.status == 401
        async with s.get(f"{url}/dashboard", params={"token": "wrong"}) as r:
            assert r.status == 401
            assert "not the operator token" in await r.text()
        # a bookmark with ?token= : the cookie, and a URL without the token
        async with s.get(
            f"{url}/dashboard", params={"token": OPERATOR_TOKEN}, allow_redirects=False
        ) as r:
            assert r.status == 303 and r.headers["Location"] == "/dashboard"
            set_cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
        session = r.cookies[COOKIE].value
        assert OPERATOR_TOKEN not in session
        # the login form: the same cookie
        async with s.post(
            f"{url}/dashboard/login", data={"token": OPERATOR_TOKEN}, allow_redirects=False
        ) as r:
            assert r.status == 303 and r.cookies[COOKIE].value == session
        async with s.post(f"{url}/dashboard/login", data={"token": "nope"}) as r:
            assert r.status == 401
        cookies = {COOKIE: session}
        async with s.get(f"{url}/dashboard", cookies=cookies) as r:
            assert r.status == 200
            assert "script-src 'sha256-" in r.headers["Content-Security-Policy"]
        async with s.get(f"{url}/dashboard/data", cookies=cookies) as r:
            assert r.status == 200
            assert (await r.json())["stats"]["lifetime"] == run.stats["lifetime"]
        async with s.get(f"{url}/metrics", cookies=cookies) as r:
            assert r.status == 200
        async with s.get(f"{url}/dashboard/data", cookies={COOKIE: "0" * 64}) as r:
            assert r.status == 401
        async with s.post(f"{url}/dashboard/logout", cookies=cookies, allow_redirects=False) as r:
            assert r.status == 303 and r.cookies[COOKIE].value == ""


# -- the dashboard in Chromium ----------------------------------------------------------


def _chromium() -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def _num(text: str) -> int:
    return int(text.replace(",", ""))


def _tokens(totals: dict[str, int]) -> int:
    return totals["input_tokens"] + totals["output_tokens"]


def _check_dashboard_in_chromium(run: ScriptedRun, screenshot: Path) -> None:
    """Log in through the form, wait for the data, compare every number, screenshot."""
    stats = run.stats
    driver = _chromium()
    try:
        driver.get(f"{run.url}/dashboard")
        box = driver.find_element(By.ID, "token")
        box.send_keys(OPERATOR_TOKEN)
        box.submit()
        WebDriverWait(driver, 20).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-generated-at")
        )
        assert driver.current_url == f"{run.url}/dashboard"  # no token in the URL
        assert driver.execute_script("return document.cookie") == ""  # HttpOnly

        def text(css: str) -> str:
            return str(driver.find_element(By.CSS_SELECTOR, css).text)

        # the stat cards: tokens and sats of today, the month, the peak day, lifetime
        for card, totals in [
            ("today", stats["today"]),
            ("month", stats["month"]),
            ("peak", stats["peak_day"]),
            ("lifetime", stats["lifetime"]),
        ]:
            fields = f"#card-{card} [data-field=%s]"
            assert _num(text(fields % "tokens")) == _tokens(totals), card
            for f in ("charged_sat", "requests", "refunds", "input_tokens", "output_tokens"):
                assert _num(text(fields % f)) == totals[f], (card, f)
        assert stats["peak_day"]["date"] in text("#card-peak h2")

        # the charts draw exactly the hourly and daily statistics
        for chart, rows in [("hourly", stats["hourly"]), ("daily", stats["daily"])]:
            for series in ("input_tokens", "output_tokens", "charged_sat"):
                shown = [
                    int(e.get_attribute("data-value") or "-1")
                    for e in driver.find_elements(
                        By.CSS_SELECTOR, f"#chart-{chart} [data-series={series}]"
                    )
                ]
                assert shown == [r[series] for r in rows], (chart, series)

        # the per-model table
        for model, by in stats["by_model"].items():
            row = f'#models-table tr[data-model="{model}"]'
            for period in ("today", "lifetime"):
                t = by[period]
                cell = f'{row} [data-field="{period}.%s"]'
                assert _num(text(cell % "requests")) == t["requests"]
                assert _num(text(cell % "tokens")) == _tokens(t)
                assert _num(text(cell % "charged_sat")) == t["charged_sat"]
                assert _num(text(cell % "refunds")) == t["refunds"]
        lite = stats["budget_left"]["gemini-2.5-flash-lite"]
        assert (
            _num(text('tr[data-model="gemini-2.5-flash-lite"] [data-field="budget.left"]'))
            == lite["model_left"]
        )

        # the budget left today, the wallet by mint, mint and relay health
        assert _num(text("#budget-all-left")) == stats["budget_left"]["gemini-2.5-flash"]["left"]
        for mint, sat in stats["wallet"]["held_sat"].items():
            assert _num(text(f'#wallet-table tr[data-mint="{mint}"] [data-field=held_sat]')) == sat
        assert text(f'#mints-table tr[data-mint="{run.mint_url}"] [data-field=status]') == "ok"
        assert (
            text(f'#relays-table tr[data-relay="{run.relay_url}"] [data-field=status]')
            == "connected"
        )

        # the whole page, not only the window
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": int(height), "deviceScaleFactor": 1, "mobile": False},
        )
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()


async def test_dashboard_in_chromium_shows_the_statistics(run: ScriptedRun) -> None:
    screenshot = ARTIFACTS / "dashboard.png"
    await asyncio.to_thread(_check_dashboard_in_chromium, run, screenshot)
    assert screenshot.stat().st_size > 10_000
