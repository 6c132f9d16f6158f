"""The benchmark run: start everything on 127.0.0.1, run the phases, write RESULTS.md.

Phases, in this order, against one HTTP bot process (``python -m bot serve``) whose stock
of small proofs (the change of locked payments) the operator funded before it started:

1. **TTFT.** Streaming paid requests through the bot, one with an ordinary token and one
   with a token locked to the bot (NUT-11 P2PK + NUT-12 DLEQ), interleaved one by one with
   the same question streamed straight from the emulator by google-genai (emulator TTFT
   300 ms), in a rotating order. Client-side time from sending the request to the first
   content delta.
2. **Throughput + CPU.** Rounds of paid non-streaming requests (emulator TTFT 0) at a fixed
   concurrency, each round: raw ``/v1/swap`` calls to the same mint at the same
   concurrency (parse, blind, swap, unblind: the least any redeem costs), then the bot
   with ordinary tokens, then the bot with locked tokens. The bot's CPU (utime+stime from
   /proc) is read before and after each bot round; its ``/metrics`` tell whether the
   locked tokens were accepted with no mint call or swapped.
3. **Memory under 500 streams.** N streaming requests held open at once (long, slow
   emulator streams); the peak RSS while they are open.
4. **Nostr.** A second bot process with only Nostr on, a local relay (nostr-sdk's, in this
   process), one sender publishing N paid NIP-17 DMs; DMs answered per second (until every
   answer and change DM is back) and the bot's CPU per DM.
5. **Profile** (not in the table): a third bot process, profiled by cProfile only while a
   round of paid requests (half streaming) runs; time is attributed to components.

**Soak**, beside all of them from the start (``bench._soak``: its own process, mint,
emulator and bot): a steady mix of streaming and non-streaming paid requests; the bot's
RSS is sampled throughout. It lasts as long as phases 1-5 (at least ``soak_min_s``), or
exactly ``--soak-minutes``; growth is measured from after the warm-up to the end.

Every bot gets the config defaults (``bot/config.py``) with rate limits raised and an
operator token (for ``/metrics``), plus any ``--set key=value``; each bot's log is checked
for WARNING/ERROR lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench._clients import (
    Locker,
    Minter,
    RawSwapper,
    Reply,
    ask_bot,
    ask_direct,
    metric_sum,
    scrape,
    sdk_client,
)
from bench._common import (
    DEFAULT_HEADER_LIMIT,
    HEADER_LIMIT,
    MB,
    OPERATOR_TOKEN,
    OVERRIDES,
    PAID_SAT,
    Tokens,
    apply_overrides,
    bot_config,
    bounded,
    log,
)
from bench._proc import (
    HTTP_READY,
    NOSTR_READY,
    BotProc,
    cpu_seconds,
    rss_bytes,
    thread_cpu_seconds,
)
from bench._soak import SoakProc, soak_row
from bench._stats import Row, median, pct, table
from bot.llm.emulator import Emulator, start_emulator
from tests.support.mint import MintProcess
from tests.support.ports import free_port

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
#: the operator's first funding token: the bot's receive splits it into small proofs
#: (~1,800 sat in 1 .. 32), from which the change of concurrent locked payments is made up
FUND_SMALL_SAT = 4096
#: ERROR lines and tracebacks found in the bots' logs, reported with the results
PROBLEMS: list[str] = []
#: the bots' own log lines worth counting: a swap retried because the mint was busy
RETRIES: list[str] = []
#: notes on how the locked-token rows were measured, under the table
LOCKED_NOTES: list[str] = []
#: wall time of each part of the run, seconds
PHASE_TIMES: list[tuple[str, float]] = []


@dataclass(frozen=True)
class Plan:
    """Sizes of one run."""

    ttft_samples: int
    rounds: int
    per_round: int
    concurrency: int
    soak_min_s: float  # the soak lasts as long as the other phases, but at least this
    soak_max_s: float  # ... and at most this
    soak_warmup_s: float
    soak_rate: float  # paid requests per second offered during the soak
    streams: int
    dm_rounds: int
    dms: int
    profile_requests: int

    @property
    def locked_payments(self) -> int:
        """Locked tokens paid to the HTTP bot: TTFT, throughput warm-up and rounds."""
        return self.ttft_samples + 2 + self.concurrency + self.rounds * self.per_round


FULL = Plan(
    ttft_samples=40,
    rounds=5,
    per_round=150,
    concurrency=8,
    soak_min_s=300,
    soak_max_s=1200,
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
    soak_min_s=30,
    soak_max_s=600,
    soak_warmup_s=10,
    soak_rate=5,
    streams=100,
    dm_rounds=1,
    dms=40,
    profile_requests=40,
)


class LockedTokens:
    """Tokens of ``PAID_SAT`` locked to the bot: minted plain, then swapped into locks."""

    def __init__(self, tokens: Tokens, locker: Locker) -> None:
        self.tokens = tokens
        self.locker = locker

    async def take(self, n: int) -> list[str]:
        """``n`` fresh locked tokens."""
        return await self.locker.lock(await self.tokens.take(n))


@contextlib.asynccontextmanager
async def timed(name: str) -> AsyncIterator[None]:
    """Record the wall time of one part of the run."""
    started = time.monotonic()
    try:
        yield
    finally:
        PHASE_TIMES.append((name, time.monotonic() - started))


async def fund_stock(bot: BotProc, tokens: Tokens, n: int, *, note: bool = True) -> None:
    """The operator funds the bot's stock before it starts: one token of ``FUND_SMALL_SAT``,
    then ``n`` of ``PAID_SAT`` (one per locked payment the run will make).

    A locked payment of ``PAID_SAT`` whose answer costs under a sat hands its whole value
    out as change from the stock: a ``PAID_SAT`` proof (the small ones reserved with it
    come back). Until a sweep refills it (``locked.sweep_interval_s``, ~a dozen such
    proofs per sweep) the stock needs one per payment. Done as ``ecashbot wallet receive``
    does it (``Wallet.receive`` on the bot's wallet directory), in this process, 16 at a
    time: one command per token would take a second each.
    """
    from bot.config import load_config
    from bot.wallet_cli import open_wallet
    from mint_client.tokens import parse_token

    cfg = load_config(bot.write_config())
    small = await tokens.take(1, FUND_SMALL_SAT)
    toks = await tokens.take(n)
    started = time.perf_counter()
    async with open_wallet(cfg) as (wallet, _):
        await wallet.receive(parse_token(small[0]))
        await bounded(n, 16, lambda i: wallet.receive(parse_token(toks[i])))
        held = await wallet.store.held_proofs(cfg.mints[0], cfg.unit)
    shape = Counter(p.amount for p in held)
    total = FUND_SMALL_SAT + n * PAID_SAT
    log(
        f"stock: the operator funded {total} sat in {n + 1} receives, "
        f"{time.perf_counter() - started:.1f} s; {len(held)} proofs"
    )
    if not note:
        return
    LOCKED_NOTES.append(
        f"before the bot started, the operator funded its change stock with {total} sat "
        f"(`Wallet.receive`, as `ecashbot wallet receive` does): one token of "
        f"{FUND_SMALL_SAT} sat, then {n} of {PAID_SAT}, one per locked payment to come, since "
        f"a locked {PAID_SAT}-sat payment whose answer costs under a sat takes a "
        f"{PAID_SAT}-sat proof out of the stock as its change until a sweep refills it; "
        f"the stock then held {len(held)} proofs ("
        + ", ".join(f"{k} of {a}" for a, k in sorted(shape.items()))
        + ")"
    )


def _locked_counts(m: dict[str, float]) -> tuple[float, float, float, float, float]:
    """accepted, swapped, sweeps done, sweeps failed, the bot's swap calls to the mint."""
    return (
        metric_sum(m, "ecashbot_locked_payments_total", 'how="accepted"'),
        metric_sum(m, "ecashbot_locked_payments_total", 'how="swapped"'),
        metric_sum(m, "ecashbot_locked_sweeps_total", 'outcome="done"'),
        metric_sum(m, "ecashbot_locked_sweeps_total", 'outcome="failed"'),
        metric_sum(m, "ecashbot_mint_call_duration_seconds_count", 'op="swap"'),
    )


# --- phases -----------------------------------------------------------------------------


async def phase_ttft(
    plan: Plan,
    emu: Emulator,
    emu_url: str,
    bot_url: str,
    tokens: Tokens,
    locked: LockedTokens,
    http: aiohttp.ClientSession,
) -> tuple[Row, Row]:
    """TTFT through the bot (ordinary and locked tokens) vs straight from the emulator."""
    emu.ttft_ms, emu.chunk_delay_ms = 300, 10
    client = sdk_client(emu_url)
    n = plan.ttft_samples + 2
    plain = await tokens.take(n)
    locks = await locked.take(n)
    direct: list[float] = []
    via_bot: list[float] = []
    via_locked: list[float] = []
    kinds = ["direct", "plain", "locked"]
    for i in range(n):
        q = f"ttft {i}: why is the sky blue?"
        got: dict[str, float] = {}
        for kind in kinds[i % 3 :] + kinds[: i % 3]:  # each kind in each position in turn
            if kind == "direct":
                got[kind] = await ask_direct(client, q)
                continue
            token = plain[i] if kind == "plain" else locks[i]
            r = await ask_bot(http, bot_url, q, token, stream=True)
            if r.status != 200 or r.ttft_s is None:
                raise RuntimeError(f"bot stream ({kind} token) failed: {r}")
            got[kind] = r.ttft_s
        if i >= 2:  # the first two warm up connections and caches
            direct.append(got["direct"] * 1000)
            via_bot.append(got["plain"] * 1000)
            via_locked.append(got["locked"] * 1000)
    await client.aio.aclose()
    log(
        f"TTFT bot median {median(via_bot):.0f} ms, locked {median(via_locked):.0f} ms, "
        f"direct median {median(direct):.0f} ms"
    )
    note = f"direct: median {median(direct):.1f} ms, p95 {pct(direct, 95):.1f} ms"
    return (
        Row(
            "TTFT, paid stream via bot ÷ google-genai direct (emulator TTFT 300 ms)",
            "ms",
            via_bot,
            median(direct),
            "ratio ≤ 1.05",
            "ratio<=",
            1.05,
            note=note,
        ),
        Row(
            "TTFT, paid stream with a token locked to the bot (NUT-11) ÷ google-genai direct",
            "ms",
            via_locked,
            median(direct),
            "ratio ≤ 1.02",
            "ratio<=",
            1.02,
            note=f"same rounds and baseline as the row above (the three interleaved); {note}",
        ),
    )


async def _bot_round(
    http: aiohttp.ClientSession, bot: BotProc, bot_url: str, toks: list[str], c: int
) -> tuple[float, float, float, list[Reply]]:
    """One round of paid non-streaming requests: rate, CPU ms per request (all threads,
    event-loop thread), the replies."""
    n = len(toks)
    cpu0 = cpu_seconds(bot.pid)
    main0, _ = thread_cpu_seconds(bot.pid)
    started = time.perf_counter()
    replies = await bounded(
        n, c, lambda i: ask_bot(http, bot_url, f"q {i}: what is ecash?", toks[i], stream=False)
    )
    elapsed = time.perf_counter() - started
    cpu1 = cpu_seconds(bot.pid)
    main1, _ = thread_cpu_seconds(bot.pid)
    bad = [r for r in replies if r.status != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} paid requests failed, e.g. {bad[0]}")
    return n / elapsed, (cpu1 - cpu0) * 1000 / n, (main1 - main0) * 1000 / n, replies


async def phase_throughput(
    plan: Plan,
    emu: Emulator,
    swapper: RawSwapper,
    bot: BotProc,
    bot_url: str,
    tokens: Tokens,
    locked: LockedTokens,
    http: aiohttp.ClientSession,
) -> tuple[Row, Row, Row, Row]:
    """Raw swap rounds and bot rounds (ordinary, then locked tokens), alternating."""
    emu.ttft_ms, emu.chunk_delay_ms = 0, 0
    mint_rates: list[float] = []
    rates: dict[str, list[float]] = {"plain": [], "locked": []}
    cpu_ms: dict[str, list[float]] = {"plain": [], "locked": []}
    loop_ms: dict[str, list[float]] = {"plain": [], "locked": []}
    latencies: dict[str, list[float]] = {"plain": [], "locked": []}
    change_bytes: dict[str, list[int]] = {"plain": [], "locked": []}
    bot_swaps = 0.0  # the bot's /v1/swap calls during the locked rounds
    sweeps_in_rounds = 0.0
    c, n = plan.concurrency, plan.per_round
    # warm-up: connections, keyset caches
    warm = await tokens.take(2 * c)
    warm_locked = await locked.take(c)
    await bounded(c, c, lambda i: swapper.swap(warm[i]))
    await bounded(c, c, lambda i: ask_bot(http, bot_url, "warm up", warm[c + i], stream=False))
    await bounded(c, c, lambda i: ask_bot(http, bot_url, "warm up", warm_locked[i], stream=False))
    for rnd in range(plan.rounds):
        raw = await tokens.take(n)
        paid = {"plain": await tokens.take(n), "locked": await locked.take(n)}

        async def swap(i: int, raw: list[str] = raw) -> float:
            return await swapper.swap(raw[i])

        started = time.perf_counter()
        await bounded(n, c, swap)
        mint_rates.append(n / (time.perf_counter() - started))
        for kind in ("plain", "locked"):
            before = _locked_counts(await scrape(http, bot_url, OPERATOR_TOKEN))
            rate, cpu_each, loop, replies = await _bot_round(http, bot, bot_url, paid[kind], c)
            after = _locked_counts(await scrape(http, bot_url, OPERATOR_TOKEN))
            rates[kind].append(rate)
            cpu_ms[kind].append(cpu_each)
            loop_ms[kind].append(loop)
            latencies[kind] += [r.total_s * 1000 for r in replies]
            change_bytes[kind] += [r.change_bytes for r in replies]
            if kind == "locked":
                bot_swaps += after[4] - before[4]
                sweeps_in_rounds += after[2] - before[2]
        log(
            f"round {rnd + 1}/{plan.rounds}: mint {mint_rates[-1]:.1f} swaps/s, "
            f"bot {rates['plain'][-1]:.1f} req/s ({cpu_ms['plain'][-1]:.1f} ms CPU each), "
            f"locked {rates['locked'][-1]:.1f} req/s ({cpu_ms['locked'][-1]:.1f} ms CPU each)"
        )
    LOCKED_NOTES.append(
        f"during the {plan.rounds} locked rounds ({plan.rounds * n} requests) the bot's "
        f"mint-call histogram counts {bot_swaps:.0f} `/v1/swap` call(s), and its sweep "
        f"counter {sweeps_in_rounds:.0f} batch sweep(s) of locked proofs in those rounds"
    )
    rounds_note = (
        f"raw swap rounds: {', '.join(f'{x:.1f}' for x in mint_rates)} /s (the raw client "
        f"retried {swapper.retried[0]} swaps on a busy mint, as the bot does); per-round ratios: "
    )

    def thr(kind: str, metric: str, target: str, limit: float) -> Row:
        ratios = [b / m for b, m in zip(rates[kind], mint_rates, strict=True)]
        lat = latencies[kind]
        sizes = change_bytes[kind]
        big = sum(1 for x in sizes if x > DEFAULT_HEADER_LIMIT)
        return Row(
            metric,
            "req/s",
            rates[kind],
            median(mint_rates),
            target,
            "ratio>=",
            limit,
            note=(
                f"{rounds_note}{', '.join(f'{x:.2f}' for x in ratios)}; bot request latency "
                f"median {median(lat):.0f} ms, p95 {pct(lat, 95):.0f} ms; change token "
                f"(`X-Cashu` header) median {median(sizes):.0f} bytes, max {max(sizes)}, "
                f"{big} of {len(sizes)} longer than {DEFAULT_HEADER_LIMIT} (aiohttp's default "
                "header limit: such a client fails to read the answer)"
            ),
        )

    def cpu(kind: str, metric: str, what: str) -> Row:
        return Row(
            metric,
            "ms",
            cpu_ms[kind],
            None,
            "≤ 10 ms",
            "<=",
            10,
            note=(
                "per round: (utime+stime after - before) ÷ requests; of which the event-loop "
                f"thread median {median(loop_ms[kind]):.1f} ms, other threads ({what}) "
                f"{median(cpu_ms[kind]) - median(loop_ms[kind]):.1f} ms"
            ),
        )

    return (
        thr(
            "plain",
            f"Throughput, paid non-streaming (concurrency {c}) ÷ raw mint /v1/swap",
            "ratio ≥ 0.9",
            0.9,
        ),
        thr(
            "locked",
            f"Throughput, paid non-streaming with locked tokens (concurrency {c}) ÷ raw mint "
            "/v1/swap",
            "ratio ≥ 3",
            3,
        ),
        cpu(
            "plain",
            "Bot CPU per paid request (HTTP, unlocked cashuB)",
            "SQLite state and proof store, executors",
        ),
        cpu(
            "locked",
            "Bot CPU per paid request (HTTP, cashuB locked to the bot)",
            "SQLite state and proof store, executors; the batch sweeps that fell in a round",
        ),
    )


async def phase_streams(
    plan: Plan, emu: Emulator, bot: BotProc, bot_url: str, tokens: Tokens
) -> Row:
    """Peak RSS of the bot with ``plan.streams`` paid streams open at once."""
    n = plan.streams
    toks = await tokens.take(n)
    idle = rss_bytes(bot.pid)
    # each stream lasts long enough for all n to be open at once (the bot redeems each
    # token at the mint first, ~10-20 per second here); at most ``opening`` wait for their
    # payment at once, so a burst of n swaps does not outlast the bot's mint timeout on a
    # busy machine (the streams already open stay open meanwhile)
    duration_s = 20 + n / 5
    opening = asyncio.Semaphore(32)
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
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        max_line_size=HEADER_LIMIT,
        max_field_size=HEADER_LIMIT,
    ) as session:

        async def one(i: int) -> str:
            nonlocal open_now, most_open
            body = {
                "model": "gemini-2.5-flash",
                "messages": [{"role": "user", "content": f"stream {i} {directives}"}],
                "stream": True,
            }
            seen = False
            await opening.acquire()
            try:
                async with session.post(
                    f"{bot_url}/v1/chat/completions", json=body, headers={"X-Cashu": toks[i]}
                ) as resp:
                    if resp.status != 200:
                        return f"HTTP {resp.status}: {(await resp.text())[:120]}"
                    async for line in resp.content:
                        if not seen and b'"content"' in line:
                            seen = True
                            opening.release()  # paid and answering: let the next one in
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
                else:
                    opening.release()

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
    plan: Plan,
    emu: Emulator,
    emu_url: str,
    mint_url: str,
    tokens: Tokens,
    swapper: RawSwapper,
    work: Path,
) -> tuple[Row, Row, Row, Row]:
    """Paid NIP-17 DMs through a relay: DMs answered per second, CPU per DM; with ordinary
    tokens, then with tokens locked to the bot (no mint call per DM)."""
    from nostr_sdk import Keys

    from mint_client.p2pk import LockKey
    from tests.support.nostr_user import DMTimeoutError, NostrUser
    from tests.support.relays import LocalRelay

    emu.ttft_ms, emu.chunk_delay_ms = 0, 0
    relay = LocalRelay()
    await relay.start()
    keys = Keys.generate()
    wallet_dir = work / "bot-nostr" / "wallet"
    cfg = bot_config(wallet_dir, mint_url, emu_url, 0)
    cfg["http"] = {"enabled": False}
    cfg["nostr"] = {
        "enabled": True,
        "nsec": keys.secret_key().to_bech32(),
        "relays": [relay.url],
        "max_concurrent_per_sender": 1_000_000,
        "retry_interval_s": 0.5,
        "reconnect_s": 0.5,
    }
    apply_overrides(cfg)
    bot = BotProc(work / "bot-nostr", cfg, NOSTR_READY)
    # the bot's lock key, made now as the bot would at start; its change stock funded
    # for the locked rounds, as for the HTTP bot
    wallet_dir.mkdir(parents=True, exist_ok=True)
    locker = Locker(swapper, LockKey.load_or_create(wallet_dir).pubkey)
    await fund_stock(bot, tokens, plan.dm_rounds * plan.dms, note=False)
    await bot.start()
    user = await NostrUser.create([relay.url])
    bot_hex = keys.public_key().to_hex()

    async def rounds(
        kind: str, take: Callable[[int], Awaitable[list[str]]]
    ) -> tuple[list[float], list[float], list[float]]:
        rates: list[float] = []
        cpu_ms: list[float] = []
        main_ms: list[float] = []
        for rnd in range(plan.dm_rounds):
            toks = await take(plan.dms)
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
                return await user.send_nip17(bot_hex, f"dm {kind} {r}/{i}: what is ecash? {t[i]}")

            cpu0 = cpu_seconds(bot.pid)
            main0, _ = thread_cpu_seconds(bot.pid)
            started = time.perf_counter()
            await bounded(plan.dms, 32, send)
            sent_s = time.perf_counter() - started
            with contextlib.suppress(DMTimeoutError):
                await user.dms_until(done, 60 + plan.dms)
            elapsed = time.perf_counter() - started
            cpu1 = cpu_seconds(bot.pid)
            main1, _ = thread_cpu_seconds(bot.pid)
            rates.append(answers / elapsed)
            cpu_ms.append((cpu1 - cpu0) * 1000 / max(answers, 1))
            main_ms.append((main1 - main0) * 1000 / max(answers, 1))
            log(
                f"nostr {kind} round {rnd + 1}: {answers}/{plan.dms} answered, {changes} change "
                f"DMs, sent in {sent_s:.1f} s, all back in {elapsed:.1f} s: "
                f"{rates[-1]:.1f} DM/s, bot CPU {cpu_ms[-1]:.1f} ms/DM"
            )
        return rates, cpu_ms, main_ms

    try:
        await asyncio.sleep(1)  # let the bot's subscription settle
        rates, cpu_ms, main_ms = await rounds("plain", tokens.take)
        locked_rates, locked_cpu, locked_main = await rounds(
            "locked", LockedTokens(tokens, locker).take
        )
    finally:
        await user.close()
        PROBLEMS.extend(f"nostr bot: {x}" for x in bot.problems())
        RETRIES.extend(bot.grep("retried"))
        await bot.stop()
        await relay.stop()
    how = (
        f"{plan.dms} DMs per round from one sender (32 in flight), timed until every answer "
        "and change DM is back"
    )
    return (
        Row(
            "Nostr NIP-17 paid DMs answered per second (instant model)",
            "DM/s",
            rates,
            None,
            "≥ 250 DM/s",
            ">=",
            250,
            note=how,
        ),
        Row(
            "Nostr NIP-17 paid DMs per second, tokens locked to the bot (no mint call per DM)",
            "DM/s",
            locked_rates,
            None,
            "≥ 250 DM/s",
            ">=",
            250,
            note=f"{how}; the same bot, after the rounds above, its change stock funded "
            "before it started",
        ),
        Row(
            "Bot CPU per paid NIP-17 DM",
            "ms",
            cpu_ms,
            None,
            "—",
            "none",
            0,
            note=_dm_cpu_note(cpu_ms, main_ms),
        ),
        Row(
            "Bot CPU per paid NIP-17 DM, token locked to the bot",
            "ms",
            locked_cpu,
            None,
            "—",
            "none",
            0,
            note=_dm_cpu_note(locked_cpu, locked_main),
        ),
    )


def _dm_cpu_note(cpu_ms: list[float], main_ms: list[float]) -> str:
    return (
        f"per round: (utime+stime after - before) ÷ DMs; of which the event-loop thread "
        f"median {median(main_ms):.1f} ms, other threads {median(cpu_ms) - median(main_ms):.1f} "
        "ms (SQLite state, proof store and outbox; the executor threads in which nostr-sdk "
        "opens each gift wrap and seals the two replies, answer and change)"
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
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        max_line_size=HEADER_LIMIT,
        max_field_size=HEADER_LIMIT,
    ) as http:
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
        soak = SoakProc(
            work / "soak",
            min_s=plan.soak_min_s,
            max_s=plan.soak_max_s,
            warmup_s=plan.soak_warmup_s,
            rate=plan.soak_rate,
        )
        soak.start()
        log("starting the mint (nutshell, FakeWallet, fee 0)")
        mint = MintProcess(work / "mint", input_fee_ppk=0)
        bot: BotProc | None = None
        running = None
        # the mint-facing session: pooled connections are dropped after 2 s idle, before
        # the mint's server (uvicorn, keep-alive 5 s) closes them under a request
        minting = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2)
        )
        try:
            await mint.start()
            emu = Emulator(ttft_ms=300, chunk_delay_ms=10)
            running = await start_emulator(emu)
            tokens = Tokens(Minter(minting, mint.url))
            port = free_port()
            bot = BotProc(
                work / "bot-http",
                bot_config(work / "bot-http" / "wallet", mint.url, running.url, port),
                HTTP_READY,
            )
            async with timed("setup: funding the change stock"):
                await fund_stock(bot, tokens, plan.locked_payments + plan.concurrency)
            await bot.start()
            bot_url = f"http://127.0.0.1:{port}"
            log(f"mint {mint.url}, emulator {running.url}, bot {bot_url} (pid {bot.pid})")
            rows: list[Row] = []
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=300),
                max_line_size=HEADER_LIMIT,
                max_field_size=HEADER_LIMIT,
            ) as http:
                async with http.get(f"{bot_url}/v1/models") as resp:
                    pubkey = (await resp.json())["payment"]["p2pk_pubkey"]
                if not pubkey:
                    raise RuntimeError("the bot advertises no lock key (locked.enabled off?)")
                swapper = RawSwapper(minting, mint.url)
                await swapper.load()
                locked = LockedTokens(tokens, Locker(swapper, pubkey))
                before = _locked_counts(await scrape(http, bot_url, OPERATOR_TOKEN))
                async with timed("1. TTFT"):
                    rows += await phase_ttft(plan, emu, running.url, bot_url, tokens, locked, http)
                async with timed("2. throughput + CPU"):
                    rows += await phase_throughput(
                        plan, emu, swapper, bot, bot_url, tokens, locked, http
                    )
                after = _locked_counts(await scrape(http, bot_url, OPERATOR_TOKEN))
            _note_locked(plan, before, after)
            async with timed(f"3. {plan.streams} streams"):
                rows.append(await phase_streams(plan, emu, bot, bot_url, tokens))
            PROBLEMS.extend(f"HTTP bot: {x}" for x in bot.problems())
            RETRIES.extend(bot.grep("retried"))
            await bot.stop()
            bot = None
            async with timed("4. Nostr"):
                rows += await phase_nostr(plan, emu, running.url, mint.url, tokens, swapper, work)
            async with timed("5. profile"):
                profile = await phase_profile(plan, emu, running.url, mint.url, tokens, work)
            others_end = time.time()
            async with timed("soak: the wait for its end"):
                soaked = await soak.finish()
        except BaseException:
            await soak.kill()
            raise
        finally:
            await minting.close()
            if bot is not None:
                await bot.stop()
            if running is not None:
                await running.stop()
            await mint.stop()
    PROBLEMS.extend(f"soak bot: {x}" for x in soaked["problems"])
    RETRIES.extend(soaked["retries"])
    duration = float(soaked["duration_s"])
    others_s = others_end - float(soaked["started_at"])  # the soak's time beside the rest
    alongside = (
        "beside phases 1-5"
        if duration <= others_s + 5
        else f"beside phases 1-5 for its first {others_s / 60:.1f} min"
    )
    rows.insert(7, soak_row(soaked, alongside))
    took = time.monotonic() - t_start
    report = render(rows, profile, plan, quick, took, load_before, os.getloadavg())
    await asyncio.to_thread(out.write_text, report)
    print(table(rows))
    print()
    print(profile)
    log(f"done in {took / 60:.1f} min; wrote {out}")
    return 0


def _note_locked(
    plan: Plan,
    before: tuple[float, float, float, float, float],
    after: tuple[float, float, float, float, float],
) -> None:
    accepted, swapped, sweeps, failed, _ = (a - b for a, b in zip(after, before, strict=True))
    paid = plan.locked_payments
    log(
        f"locked: {accepted:.0f} of {paid} accepted with no mint call, {swapped:.0f} swapped; "
        f"{sweeps:.0f} sweeps done, {failed:.0f} failed"
    )
    LOCKED_NOTES.insert(
        0,
        f"`ecashbot_locked_payments_total` on the bot's `/metrics`: of the {paid} locked "
        f"tokens paid in phases 1-2, **{accepted:.0f} were accepted with no mint call and "
        f"{swapped:.0f} swapped** (what the bot does when its stock can't make the change); "
        f"{sweeps:.0f} batch sweeps of locked proofs done meanwhile (every "
        f"`locked.sweep_interval_s`, default), {failed:.0f} failed",
    )


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
    notes += "\n- **Locked tokens**: " + "; ".join(LOCKED_NOTES) + "."
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
    notes += "\n- **Wall time** of each part: " + ", ".join(
        f"{name} {secs:.0f} s" for name, secs in PHASE_TIMES
    )
    return f"""# Benchmark results

`{" ".join(["uv run python -m bench", *sys.argv[1:]])}` on {now}, code {_git()},
{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs,
load average {load_before[0]:.2f} before / {load_after[0]:.2f} after; took {took_s / 60:.1f} min.
Mint, emulator, relay, clients and bot all share this machine, so numbers are noisy; the
soak (its own mint, emulator and bot, {plan.soak_rate:g} paid requests/s) runs beside
every other phase and takes its share of the 2 cores.
Bot config: the defaults of `bot/config.py` (rate limits raised, an operator token for
`/metrics`){overrides}.

{table(rows)}

Samples: TTFT per request; throughput, CPU and DM/s per round ({plan.rounds} rounds of
{plan.per_round} requests, {plan.dm_rounds} of {plan.dms} DMs); one value for the memory
rows. Ratios divide medians. Tokens: cashuB, {PAID_SAT} sat in one proof with DLEQ, fee 0;
locked ones: the same, swapped by the client at the mint into a proof whose secret is a
NUT-11 P2PK lock to the bot's key (`GET /v1/models` → `payment.p2pk_pubkey`, no locktime,
SIG_INPUTS), with the mint's DLEQ.

{notes}

## Where the bot spends its time (cProfile, separate pass)

{profile}
"""


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the suite."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a short run (~3 min) to check it works"
    )
    parser.add_argument(
        "--soak-minutes",
        type=float,
        metavar="N",
        help="soak for exactly N minutes (e.g. 10, the issue's full soak; the run then lasts "
        "at least that long); default: as long as the other phases, at least "
        f"{FULL.soak_min_s / 60:g} min ({QUICK.soak_min_s:g} s with --quick)",
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
    if args.soak_minutes is not None:
        if args.soak_minutes <= plan.soak_warmup_s / 60:
            parser.error(f"--soak-minutes must exceed the warm-up ({plan.soak_warmup_s:g} s)")
        secs = args.soak_minutes * 60
        plan = dataclasses.replace(plan, soak_min_s=secs, soak_max_s=secs)
    return asyncio.run(run(plan, args.quick, args.out))
