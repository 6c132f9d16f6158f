"""The benchmark run: start everything on 127.0.0.1, run the phases, write RESULTS.md.

Phases, in this order, against one HTTP bot process (``python -m bot serve``):

1. **TTFT.** Streaming paid requests through the bot, interleaved one by one with the same
   question streamed straight from the emulator by google-genai (emulator TTFT 300 ms).
   Client-side time from sending the request to the first content delta.
2. **Throughput + CPU.** Rounds of paid non-streaming requests (emulator TTFT 0) at a fixed
   concurrency, each round preceded by a round of raw ``/v1/swap`` calls to the same mint
   at the same concurrency (parse, blind, swap, unblind: the least any redeem costs).
   The bot's CPU (utime+stime from /proc) is read before and after each bot round.
3. **Soak.** A steady mix of streaming and non-streaming paid requests; the bot's RSS is
   sampled throughout; growth is measured from after the warm-up to the end.
4. **Memory under 500 streams.** N streaming requests held open at once (long, slow
   emulator streams); the peak RSS while they are open.
5. **Nostr.** A second bot process with only Nostr on, a local relay (nostr-sdk's, in this
   process), one sender publishing N paid NIP-17 DMs; DMs answered per second (until every
   answer and change DM is back) and the bot's CPU per DM.
6. **Profile** (not in the table): a third bot process, profiled by cProfile only while a
   round of paid requests (half streaming) runs; time is attributed to components.

Every bot gets the config defaults (``bot/config.py``) with rate limits raised, plus any
``--set key=value``; each bot's log is checked for WARNING/ERROR lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench._clients import RawSwapper, Reply, ask_bot, ask_direct, sdk_client
from bench._proc import (
    HTTP_READY,
    NOSTR_READY,
    BotProc,
    cpu_seconds,
    rss_bytes,
    thread_cpu_seconds,
)
from bench._stats import Row, median, pct, table
from bot.llm.emulator import Emulator, start_emulator
from tests.support.mint import MintProcess
from tests.support.ports import free_port
from tests.support.user_wallet import UserWallet

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PAID_SAT = 64  # one proof of 64 sat per token; swapped into 7 outputs by the bot
MB = 1024 * 1024
#: ERROR lines and tracebacks found in the bots' logs, reported with the results
PROBLEMS: list[str] = []
#: the bots' own log lines worth counting: a swap retried because the mint was busy
RETRIES: list[str] = []


@dataclass(frozen=True)
class Plan:
    """Sizes of one run."""

    ttft_samples: int
    rounds: int
    per_round: int
    concurrency: int
    soak_s: float
    soak_warmup_s: float
    soak_rate: float  # paid requests per second offered during the soak
    streams: int
    dm_rounds: int
    dms: int
    profile_requests: int


FULL = Plan(
    ttft_samples=40,
    rounds=5,
    per_round=150,
    concurrency=8,
    soak_s=600,
    soak_warmup_s=60,
    soak_rate=5,
    streams=500,
    dm_rounds=3,
    dms=200,
    profile_requests=200,
)
QUICK = Plan(
    ttft_samples=8,
    rounds=2,
    per_round=40,
    concurrency=8,
    soak_s=30,
    soak_warmup_s=5,
    soak_rate=5,
    streams=100,
    dm_rounds=1,
    dms=40,
    profile_requests=40,
)


def log(msg: str) -> None:
    """Progress on stderr, with the wall clock."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Tokens:
    """Funded cashuB tokens of ``PAID_SAT`` (with DLEQ), minted pre-split by a user wallet."""

    def __init__(self, wallet: UserWallet) -> None:
        self.wallet = wallet

    async def take(self, n: int) -> list[str]:
        """``n`` fresh tokens."""
        return await self.wallet.send_tokens(PAID_SAT, n)


#: config overrides from ``--set key.path=value`` (YAML values), applied to every bot
OVERRIDES: dict[str, Any] = {}


def _apply(cfg: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in OVERRIDES.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return cfg


def bot_config(wallet_dir: Path, mint_url: str, emulator_url: str, port: int) -> dict[str, Any]:
    """The HTTP bot: defaults, except rate limits raised far above any load here."""
    return _apply(
        {
            "mints": [mint_url],
            "wallet": {"path": str(wallet_dir)},
            "http": {"enabled": True, "host": "127.0.0.1", "port": port},
            "gemini": {
                "api_key": "bench-key",
                "base_url": emulator_url,
                "api_version": "v1beta",
                "timeout_s": 600,
            },
            "rate_limit": {
                "requests_capacity": 1_000_000,
                "requests_per_s": 1_000_000,
                "tokens_capacity": 10_000_000_000,
                "tokens_per_s": 1_000_000_000,
            },
            "nostr": {"enabled": False},
            "log_level": "INFO",
        }
    )


async def bounded(n: int, concurrency: int, job: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """Run ``job(0..n-1)`` with at most ``concurrency`` at once; results in order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Any:
        async with gate:
            return await job(i)

    return await asyncio.gather(*(one(i) for i in range(n)))


# --- phases -----------------------------------------------------------------------------


async def phase_ttft(
    plan: Plan,
    emu: Emulator,
    emu_url: str,
    bot_url: str,
    tokens: Tokens,
    http: aiohttp.ClientSession,
) -> Row:
    """TTFT through the bot vs straight from the emulator, one request at a time."""
    emu.ttft_ms, emu.chunk_delay_ms = 300, 10
    client = sdk_client(emu_url)
    toks = await tokens.take(plan.ttft_samples + 2)
    direct: list[float] = []
    via_bot: list[float] = []
    for i, token in enumerate(toks):
        q = f"ttft {i}: why is the sky blue?"
        d = await ask_direct(client, q)
        r = await ask_bot(http, bot_url, q, token, stream=True)
        if r.status != 200 or r.ttft_s is None:
            raise RuntimeError(f"bot stream failed: {r}")
        if i >= 2:  # the first two warm up connections and caches
            direct.append(d * 1000)
            via_bot.append(r.ttft_s * 1000)
    await client.aio.aclose()
    log(f"TTFT bot median {median(via_bot):.0f} ms, direct median {median(direct):.0f} ms")
    return Row(
        "TTFT, paid stream via bot ÷ google-genai direct (emulator TTFT 300 ms)",
        "ms",
        via_bot,
        median(direct),
        "ratio ≤ 1.05",
        "ratio<=",
        1.05,
        note=f"direct: median {median(direct):.1f} ms, p95 {pct(direct, 95):.1f} ms",
    )


async def phase_throughput(
    plan: Plan,
    emu: Emulator,
    mint_url: str,
    bot: BotProc,
    bot_url: str,
    tokens: Tokens,
    http: aiohttp.ClientSession,
) -> tuple[Row, Row]:
    """Raw swap rounds and bot rounds, alternating; bot CPU per request."""
    emu.ttft_ms, emu.chunk_delay_ms = 0, 0
    swapper = RawSwapper(http, mint_url)
    await swapper.load()
    mint_rates: list[float] = []
    bot_rates: list[float] = []
    cpu_ms: list[float] = []
    loop_ms: list[float] = []  # of which the event-loop (main) thread
    latencies: list[float] = []
    c, n = plan.concurrency, plan.per_round
    # warm-up: connections, keyset caches
    warm = await tokens.take(2 * c)
    await bounded(c, c, lambda i: swapper.swap(warm[i]))
    await bounded(c, c, lambda i: ask_bot(http, bot_url, "warm up", warm[c + i], stream=False))
    for rnd in range(plan.rounds):
        raw = await tokens.take(n)
        paid = await tokens.take(n)

        async def swap(i: int, raw: list[str] = raw) -> float:
            return await swapper.swap(raw[i])

        async def pay(i: int, paid: list[str] = paid) -> Reply:
            return await ask_bot(http, bot_url, f"q {i}: what is ecash?", paid[i], stream=False)

        started = time.perf_counter()
        await bounded(n, c, swap)
        mint_rates.append(n / (time.perf_counter() - started))
        cpu0 = cpu_seconds(bot.pid)
        main0, _ = thread_cpu_seconds(bot.pid)
        started = time.perf_counter()
        replies = await bounded(n, c, pay)
        elapsed = time.perf_counter() - started
        cpu1 = cpu_seconds(bot.pid)
        main1, _ = thread_cpu_seconds(bot.pid)
        bad = [r for r in replies if r.status != 200]
        if bad:
            raise RuntimeError(f"{len(bad)} paid requests failed, e.g. {bad[0]}")
        bot_rates.append(n / elapsed)
        cpu_ms.append((cpu1 - cpu0) * 1000 / n)
        loop_ms.append((main1 - main0) * 1000 / n)
        latencies += [r.total_s * 1000 for r in replies]
        log(
            f"round {rnd + 1}/{plan.rounds}: mint {mint_rates[-1]:.1f} swaps/s, "
            f"bot {bot_rates[-1]:.1f} req/s, bot CPU {cpu_ms[-1]:.1f} ms/request"
        )
    ratios = [b / m for b, m in zip(bot_rates, mint_rates, strict=True)]
    thr = Row(
        f"Throughput, paid non-streaming (concurrency {c}) ÷ raw mint /v1/swap",
        "req/s",
        bot_rates,
        median(mint_rates),
        "ratio ≥ 0.9",
        "ratio>=",
        0.9,
        note=(
            f"raw swap rounds: {', '.join(f'{x:.1f}' for x in mint_rates)} /s; "
            f"per-round ratios: {', '.join(f'{x:.2f}' for x in ratios)}; "
            f"bot request latency median {median(latencies):.0f} ms, "
            f"p95 {pct(latencies, 95):.0f} ms"
        ),
    )
    cpu = Row(
        "Bot CPU per paid request (HTTP, unlocked cashuB)",
        "ms",
        cpu_ms,
        None,
        "≤ 10 ms",
        "<=",
        10,
        note=(
            "per round: (utime+stime after - before) ÷ requests; of which the event-loop "
            f"thread median {median(loop_ms):.1f} ms, other threads (SQLite state and proof "
            f"store, executors) {median(cpu_ms) - median(loop_ms):.1f} ms"
        ),
    )
    return thr, cpu


async def phase_soak(
    plan: Plan,
    emu: Emulator,
    bot: BotProc,
    bot_url: str,
    tokens: Tokens,
    http: aiohttp.ClientSession,
) -> Row:
    """Steady paid load; RSS growth of the bot after the warm-up."""
    emu.ttft_ms, emu.chunk_delay_ms = 300, 10
    total = int(plan.soak_s * plan.soak_rate) + 10
    log(f"soak: minting {total} tokens")
    toks = await tokens.take(total)
    log(f"soak: {plan.soak_s:.0f} s at {plan.soak_rate} req/s (half streaming)")
    samples: list[tuple[float, int]] = []
    failures = 0
    tasks: set[asyncio.Task[Any]] = set()
    started = time.monotonic()

    async def one(i: int) -> None:
        nonlocal failures
        r = await ask_bot(
            http, bot_url, f"soak {i}: tell me about sats", toks[i], stream=i % 2 == 0
        )
        if r.status != 200:
            failures += 1

    async def sampler() -> None:
        while True:
            samples.append((time.monotonic() - started, rss_bytes(bot.pid)))
            await asyncio.sleep(2)

    sampling = asyncio.create_task(sampler())
    i = 0
    while (now := time.monotonic() - started) < plan.soak_s and i < len(toks):
        due = int(now * plan.soak_rate)
        while i < min(due, len(toks)):
            t = asyncio.create_task(one(i))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            i += 1
        emu.requests.clear()  # the emulator records every call: keep the bench lean
        await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)
    samples.append((time.monotonic() - started, rss_bytes(bot.pid)))
    sampling.cancel()
    after = [rss for t, rss in samples if t >= plan.soak_warmup_s]
    start_rss = after[0]
    # the end: median of the last few samples, so one GC moment does not decide it
    end_rss = median([float(x) for x in after[-3:]])
    growth = (end_rss - start_rss) * 100 / start_rss
    log(
        f"soak: {i} requests, {failures} failed; RSS {start_rss / MB:.1f} MB after warm-up, "
        f"{end_rss / MB:.1f} MB at the end ({growth:+.2f} %)"
    )
    return Row(
        f"Bot RSS growth over a {plan.soak_s / 60:.3g} min soak ({plan.soak_rate} req/s)",
        "%",
        [growth],
        None,
        "< 5 %",
        "<",
        5,
        note=(
            f"{i} requests ({failures} failed); RSS {start_rss / MB:.1f} MB after "
            f"{plan.soak_warmup_s:.0f} s warm-up → {end_rss / MB:.1f} MB; peak "
            f"{max(x for _, x in samples) / MB:.1f} MB; RSS (MB) at each tenth of the soak: "
            + ", ".join(f"{x / MB:.1f}" for x in _tenths(samples, plan.soak_s))
        ),
    )


def _tenths(samples: list[tuple[float, int]], duration_s: float) -> list[int]:
    """The first RSS sample at or after each tenth of the soak (1/10 ... 10/10)."""
    out = []
    for k in range(1, 11):
        at = duration_s * k / 10
        out.append(next((x for t, x in samples if t >= at), samples[-1][1]))
    return out


async def phase_streams(
    plan: Plan, emu: Emulator, bot: BotProc, bot_url: str, tokens: Tokens
) -> Row:
    """Peak RSS of the bot with ``plan.streams`` paid streams open at once."""
    n = plan.streams
    toks = await tokens.take(n)
    idle = rss_bytes(bot.pid)
    # each stream lasts long enough for all n to be open at once (the bot redeems each
    # token at the mint first, ~10-20 per second here)
    duration_s = 20 + n / 5
    delay_ms = 500
    words = int(duration_s * 1000 / delay_ms)
    directives = (
        f"[emulator:words={words}] [emulator:words-per-chunk=1] "
        f"[emulator:chunk-delay-ms={delay_ms}] [emulator:ttft-ms=0]"
    )
    emu.requests.clear()
    open_now = 0
    most_open = 0
    peak = idle
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=duration_s * 3 + 300)
    log(f"streams: {n} concurrent, each ~{duration_s:.0f} s long; idle RSS {idle / MB:.1f} MB")
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int) -> str:
            nonlocal open_now, most_open
            body = {
                "model": "gemini-2.5-flash",
                "messages": [{"role": "user", "content": f"stream {i} {directives}"}],
                "stream": True,
            }
            seen = False
            try:
                async with session.post(
                    f"{bot_url}/v1/chat/completions", json=body, headers={"X-Cashu": toks[i]}
                ) as resp:
                    if resp.status != 200:
                        return f"HTTP {resp.status}: {(await resp.text())[:120]}"
                    async for line in resp.content:
                        if not seen and b'"content"' in line:
                            seen = True
                            open_now += 1
                            most_open = max(most_open, open_now)
                        if b'"error"' in line:
                            return f"stream error: {line[:160].decode(errors='replace')}"
                    return "ok"
            except (aiohttp.ClientError, TimeoutError) as exc:
                return f"client error: {type(exc).__name__}"
            finally:
                if seen:
                    open_now -= 1

        jobs = asyncio.gather(*(one(i) for i in range(n)))
        while not jobs.done():
            peak = max(peak, rss_bytes(bot.pid))
            await asyncio.sleep(0.25)
        statuses = jobs.result()
    emu.requests.clear()
    failures = Counter(s for s in statuses if s != "ok")
    failed = sum(failures.values())
    log(f"streams: peak RSS {peak / MB:.1f} MB, at most {most_open} open at once, {failed} failed")
    return Row(
        f"Bot peak RSS, {n} concurrent paid streams",
        "MB",
        [peak / MB],
        idle / MB,
        "≤ 250 MB",
        "<=",
        250,
        note=f"{most_open} of {n} streams were open at once at most; {failed} failed"
        + (
            f" ({'; '.join(f'{v} times {k}' for k, v in failures.most_common(3))})"
            if failed
            else ""
        )
        + "; baseline = RSS before the phase",
    )


async def phase_nostr(
    plan: Plan, emu: Emulator, emu_url: str, mint_url: str, tokens: Tokens, work: Path
) -> tuple[Row, Row]:
    """Paid NIP-17 DMs through a relay: DMs answered per second, CPU per DM."""
    from nostr_sdk import Keys

    from tests.support.nostr_user import DMTimeoutError, NostrUser
    from tests.support.relays import LocalRelay

    emu.ttft_ms, emu.chunk_delay_ms = 0, 0
    relay = LocalRelay()
    await relay.start()
    keys = Keys.generate()
    cfg = bot_config(work / "bot-nostr" / "wallet", mint_url, emu_url, 0)
    cfg["http"] = {"enabled": False}
    cfg["nostr"] = {
        "enabled": True,
        "nsec": keys.secret_key().to_bech32(),
        "relays": [relay.url],
        "max_concurrent_per_sender": 1_000_000,
        "retry_interval_s": 0.5,
        "reconnect_s": 0.5,
    }
    _apply(cfg)
    bot = BotProc(work / "bot-nostr", cfg, NOSTR_READY)
    await bot.start()
    rates: list[float] = []
    cpu_ms: list[float] = []
    user = await NostrUser.create([relay.url])
    bot_hex = keys.public_key().to_hex()
    try:
        await asyncio.sleep(1)  # let the bot's subscription settle
        for rnd in range(plan.dm_rounds):
            toks = await tokens.take(plan.dms)
            user.drain()
            answers = 0
            changes = 0

            def done(dm: Any) -> bool:
                nonlocal answers, changes
                if dm.text.startswith("cashuB"):
                    changes += 1
                elif dm.text.startswith("Emulated answer"):
                    answers += 1
                return answers >= plan.dms and changes >= plan.dms

            async def send(i: int, r: int = rnd, t: list[str] = toks) -> Any:
                return await user.send_nip17(bot_hex, f"dm {r}/{i}: what is ecash? {t[i]}")

            cpu0 = cpu_seconds(bot.pid)
            started = time.perf_counter()
            await bounded(plan.dms, 32, send)
            sent_s = time.perf_counter() - started
            with contextlib.suppress(DMTimeoutError):
                await user.dms_until(done, 60 + plan.dms)
            elapsed = time.perf_counter() - started
            cpu1 = cpu_seconds(bot.pid)
            rates.append(answers / elapsed)
            cpu_ms.append((cpu1 - cpu0) * 1000 / max(answers, 1))
            log(
                f"nostr round {rnd + 1}: {answers}/{plan.dms} answered, {changes} change DMs, "
                f"sent in {sent_s:.1f} s, all back in {elapsed:.1f} s: {rates[-1]:.1f} DM/s, "
                f"bot CPU {cpu_ms[-1]:.1f} ms/DM"
            )
    finally:
        await user.close()
        PROBLEMS.extend(f"nostr bot: {x}" for x in bot.problems())
        RETRIES.extend(bot.grep("retried"))
        await bot.stop()
        await relay.stop()
    return (
        Row(
            "Nostr NIP-17 paid DMs answered per second (instant model)",
            "DM/s",
            rates,
            None,
            "≥ 250 DM/s",
            ">=",
            250,
            note=f"{plan.dms} DMs per round from one sender (32 in flight), timed until every "
            "answer and change DM is back",
        ),
        Row(
            "Bot CPU per paid NIP-17 DM",
            "ms",
            cpu_ms,
            None,
            "—",
            "none",
            0,
        ),
    )


async def phase_profile(
    plan: Plan, emu: Emulator, emu_url: str, mint_url: str, tokens: Tokens, work: Path
) -> str:
    """A round of paid requests through a bot under cProfile, attributed."""
    from bench._profile import attribute

    emu.ttft_ms, emu.chunk_delay_ms = 0, 0
    port = free_port()
    prof = RESULTS.parent / "bot.prof"  # kept for `python -m pstats`
    prof.unlink(missing_ok=True)
    bot = BotProc(
        work / "bot-prof",
        bot_config(work / "bot-prof" / "wallet", mint_url, emu_url, port),
        HTTP_READY,
        profile_to=prof,
    )
    await bot.start()
    url = f"http://127.0.0.1:{port}"
    n = plan.profile_requests
    c = plan.concurrency
    toks = await tokens.take(n + c)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        # warm up (connections, keyset caches, lazy imports) before profiling starts
        await bounded(c, c, lambda i: ask_bot(http, url, "warm up", toks[n + i], stream=i % 2 == 0))
        bot.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.2)
        replies = await bounded(
            n, c, lambda i: ask_bot(http, url, f"p {i}: what is ecash?", toks[i], stream=i % 2 == 0)
        )
        await asyncio.sleep(0.5)  # let settlement and logging finish inside the profile
        bot.send_signal(signal.SIGUSR2)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if prof.exists():
                break
        await asyncio.sleep(0.5)  # dump_stats may still be writing
    bad = [r for r in replies if r.status != 200]
    problems = bot.problems()
    PROBLEMS.extend(f"profiled bot: {x}" for x in problems)
    RETRIES.extend(bot.grep("retried"))
    await bot.stop()
    if bad or problems:
        log(f"profile: {len(bad)} requests failed; bot log problems: {problems[:3]}")
    return attribute(prof, n)


# --- the run ----------------------------------------------------------------------------


def _git() -> str:
    """HEAD's short id, with "+ local changes" when the tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "bot", "mint_client", "pricing"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + local changes" if dirty else "")


async def run(plan: Plan, quick: bool, out: Path) -> int:
    """Start mint, emulator and bots, run every phase, print the table and write ``out``."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    t_start = time.monotonic()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ecashbot-bench-") as tmp:
        work = Path(tmp)
        log("starting the mint (nutshell, FakeWallet, fee 0)")
        mint = MintProcess(work / "mint", input_fee_ppk=0)
        await mint.start()
        emu = Emulator(ttft_ms=300, chunk_delay_ms=10)
        running = await start_emulator(emu)
        bot: BotProc | None = None
        try:
            wallet = await UserWallet.create(mint.url, work / "user")
            tokens = Tokens(wallet)
            port = free_port()
            bot = BotProc(
                work / "bot-http",
                bot_config(work / "bot-http" / "wallet", mint.url, running.url, port),
                HTTP_READY,
            )
            await bot.start()
            bot_url = f"http://127.0.0.1:{port}"
            log(f"mint {mint.url}, emulator {running.url}, bot {bot_url} (pid {bot.pid})")
            rows: list[Row] = []
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=300)
            ) as http:
                rows.append(await phase_ttft(plan, emu, running.url, bot_url, tokens, http))
                rows += await phase_throughput(plan, emu, mint.url, bot, bot_url, tokens, http)
                rows.append(await phase_soak(plan, emu, bot, bot_url, tokens, http))
            streams = await phase_streams(plan, emu, bot, bot_url, tokens)
            rows.insert(3, streams)
            PROBLEMS.extend(f"HTTP bot: {x}" for x in bot.problems())
            RETRIES.extend(bot.grep("retried"))
            await bot.stop()
            bot = None
            rows += await phase_nostr(plan, emu, running.url, mint.url, tokens, work)
            profile = await phase_profile(plan, emu, running.url, mint.url, tokens, work)
            await wallet.close()
        finally:
            if bot is not None:
                await bot.stop()
            await running.stop()
            await mint.stop()
    took = time.monotonic() - t_start
    report = render(rows, profile, plan, quick, took, load_before, os.getloadavg())
    await asyncio.to_thread(out.write_text, report)
    print(table(rows))
    print()
    print(profile)
    log(f"done in {took / 60:.1f} min; wrote {out}")
    return 0


def render(
    rows: list[Row],
    profile: str,
    plan: Plan,
    quick: bool,
    took_s: float,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> str:
    """RESULTS.md: conditions, the table, notes per row, the profile."""
    notes = "\n".join(f"- **{r.metric}**: {r.note}" for r in rows if r.note)
    shown = "\n".join(f"    {p[:300]}" for p in PROBLEMS[:20])
    notes += f"\n- **Bot logs**: {len(PROBLEMS)} WARNING/ERROR/traceback lines" + (
        f":\n\n{shown}" if shown else "."
    )
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    overrides = "".join(f", `{k}: {v}`" for k, v in OVERRIDES.items())
    notes += (
        f"\n- **Mint busy**: the bots retried {len(RETRIES)} swaps or payments after a "
        "passing mint failure (nutshell's SQLite lock; back-off 0.25 s, 0.5 s, ...)."
    )
    return f"""# Benchmark results

`{" ".join(["uv run python -m bench", *sys.argv[1:]])}` on {now}, code {_git()},
{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs,
load average {load_before[0]:.2f} before / {load_after[0]:.2f} after; took {took_s / 60:.1f} min.
Mint, emulator, relay, clients and bot all share this machine, so numbers are noisy.
Bot config: the defaults of `bot/config.py` (rate limits raised){overrides}.

{table(rows)}

Samples: TTFT per request; throughput, CPU and DM/s per round ({plan.rounds} rounds of
{plan.per_round} requests, {plan.dm_rounds} of {plan.dms} DMs); one value for the memory
rows. Ratios divide medians. Tokens: cashuB, {PAID_SAT} sat in one proof with DLEQ, fee 0.

{notes}

## Where the bot spends its time (cProfile, separate pass)

{profile}
"""


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the suite."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a short run (~2-3 min) to check it works"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a bot config key, YAML value, e.g. --set fast_path.overlap=false",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default {RESULTS}")
    args = parser.parse_args(argv)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set wants KEY=VALUE, not {item!r}")
        OVERRIDES[key] = yaml.safe_load(value)
    plan = QUICK if args.quick else FULL
    return asyncio.run(run(plan, args.quick, args.out))
