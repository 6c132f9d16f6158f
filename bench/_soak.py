"""The soak, as its own process: ``python -m bench._soak SPEC.json``.

It runs beside the other phases without touching their measurements' setup: its own
nutshell mint, its own Gemini emulator, its own bot process, its own user wallet and its
own event loop. It offers a steady mix of streaming and non-streaming paid requests
(``rate`` per second, half streaming, emulator TTFT 300 ms) and samples the bot's RSS
every 2 s. It stops when told (SIGTERM), but not before ``min_s``, or at ``max_s``;
then it writes what it saw to ``out`` (JSON) for :func:`soak_row`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

import aiohttp

from bench._clients import Minter, ask_bot
from bench._common import HEADER_LIMIT, MB, OVERRIDES, Tokens, bot_config, log, set_log_prefix
from bench._proc import HTTP_READY, BotProc, rss_bytes
from bench._stats import Row, median
from tests.support.mint import _LIVE, _die_with_parent

_ROOT = Path(__file__).resolve().parents[1]
#: the issue's soak: its target is stated over ten minutes
TEN_MIN_S = 600.0


async def soak(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the soak described by ``spec``; what it saw."""
    from bot.llm.emulator import Emulator, start_emulator
    from tests.support.mint import MintProcess
    from tests.support.ports import free_port

    work = Path(spec["work"])
    min_s, max_s = float(spec["min_s"]), float(spec["max_s"])
    rate = float(spec["rate"])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    mint = MintProcess(work / "mint", input_fee_ppk=0)
    await mint.start()
    emu = Emulator(ttft_ms=300, chunk_delay_ms=10)
    running = await start_emulator(emu)
    minting = aiohttp.ClientSession(connector=aiohttp.TCPConnector(keepalive_timeout=2))
    tokens = Tokens(Minter(minting, mint.url))
    port = free_port()
    bot = BotProc(
        work / "bot", bot_config(work / "bot" / "wallet", mint.url, running.url, port), HTTP_READY
    )
    supply: list[str] = await tokens.take(200)
    refilling: asyncio.Task[None] | None = None

    async def refill() -> None:
        supply.extend(await tokens.take(200))

    await bot.start()
    url = f"http://127.0.0.1:{port}"
    samples: list[tuple[float, int]] = []
    outcomes: Counter[str] = Counter()
    tasks: set[asyncio.Task[Any]] = set()
    sent = 0
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=300),
            max_line_size=HEADER_LIMIT,
            max_field_size=HEADER_LIMIT,
        ) as http:

            async def one(i: int, token: str) -> None:
                try:
                    r = await ask_bot(
                        http, url, f"soak {i}: tell me about sats", token, stream=i % 2 == 0
                    )
                    outcomes["ok" if r.status == 200 else f"HTTP {r.status}"] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcomes[f"client error {type(exc).__name__}"] += 1

            started = time.monotonic()
            started_at = time.time()
            log(f"soak: bot pid {bot.pid}, {rate} req/s (half streaming), at least {min_s:.0f} s")
            next_sample = 0.0
            while True:
                now = time.monotonic() - started
                if now >= max_s or (stop.is_set() and now >= min_s):
                    break
                if now >= next_sample:
                    samples.append((now, rss_bytes(bot.pid)))
                    next_sample += 2.0
                while sent < int(now * rate):
                    if not supply:  # the refill fell behind: wait for it
                        if refilling is None or refilling.done():
                            refilling = asyncio.create_task(refill())
                        await refilling
                    t = asyncio.create_task(one(sent, supply.pop()))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    sent += 1
                if len(supply) < 100 and (refilling is None or refilling.done()):
                    refilling = asyncio.create_task(refill())
                emu.requests.clear()  # the emulator records every call: keep it lean
                await asyncio.sleep(0.05)
            await asyncio.gather(*tasks)
            duration = time.monotonic() - started
            samples.append((duration, rss_bytes(bot.pid)))
            log(f"soak: done after {duration:.0f} s, {sent} requests")
    finally:
        if refilling is not None:
            with contextlib.suppress(Exception):
                await refilling
        problems = bot.problems()
        retries = bot.grep("retried")
        await bot.stop()
        await minting.close()
        await running.stop()
        await mint.stop()
    return {
        "duration_s": duration,
        "started_at": started_at,
        "warmup_s": float(spec["warmup_s"]),
        "rate": rate,
        "requests": sent,
        "outcomes": dict(outcomes),
        "samples": samples,
        "problems": problems,
        "retries": retries,
    }


class SoakProc:
    """The soak process, seen from the benchmark run."""

    def __init__(
        self, work: Path, *, min_s: float, max_s: float, warmup_s: float, rate: float
    ) -> None:
        self.work = work
        self.min_s = min_s
        self.spec = {
            "work": str(work),
            "out": str(work / "soak.json"),
            "min_s": min_s,
            "max_s": max_s,
            "warmup_s": warmup_s,
            "rate": rate,
            "overrides": OVERRIDES,
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        """Start the soak process (it logs to our stderr)."""
        self.work.mkdir(parents=True, exist_ok=True)
        spec_path = self.work / "spec.json"
        spec_path.write_text(json.dumps(self.spec))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench._soak", str(spec_path)],
            cwd=_ROOT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        _LIVE[self._proc.pid] = self._proc
        self.started = time.monotonic()

    async def finish(self) -> dict[str, Any]:
        """Tell the soak to stop (it keeps going until ``min_s``), wait, read its result."""
        proc = self._proc
        assert proc is not None
        left = self.min_s - (time.monotonic() - self.started)
        if left > 0 and proc.poll() is None:
            log(f"waiting for the soak to reach {self.min_s:.0f} s")
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + max(left, 0) + 180
        while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _LIVE.pop(proc.pid, None)
        out = Path(str(self.spec["out"]))
        try:
            text = await asyncio.to_thread(out.read_text)
        except FileNotFoundError:
            text = ""
        if proc.returncode != 0 or not text:
            raise RuntimeError(f"the soak process failed (exit {proc.returncode})")
        result: dict[str, Any] = json.loads(text)
        return result

    async def kill(self) -> None:
        """Stop it at once (the run failed)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:  # its mint and bot die with it (parent-death signal)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
        _LIVE.pop(proc.pid, None)


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def soak_row(res: dict[str, Any], alongside: str) -> Row:
    """The table row: RSS growth after the warm-up, over ten minutes of soak.

    A soak of ten minutes or more gives the measured growth. A shorter one gives the
    least-squares trend of its RSS after the warm-up, carried on to ten minutes (what the
    target is stated over), and says so; the measured growth is in the note.
    """
    duration, warmup = float(res["duration_s"]), float(res["warmup_s"])
    samples = [(float(t), int(x)) for t, x in res["samples"]]
    after = [(t, x) for t, x in samples if t >= warmup]
    start_rss = after[0][1]
    # the end: median of the last few samples, so one GC moment does not decide it
    end_rss = median([float(x) for _, x in after[-3:]])
    measured = (end_rss - start_rss) * 100 / start_rss
    slope = _slope([(t, float(x)) for t, x in after])  # bytes per second
    ten_min = slope * (TEN_MIN_S - warmup) * 100 / start_rss
    failed = sum(v for k, v in res["outcomes"].items() if k != "ok")
    minutes = duration / 60
    rate = res["rate"]
    if duration >= TEN_MIN_S - 1:
        metric = f"Bot RSS growth over a {minutes:.1f} min soak ({rate:g} req/s, {alongside})"
        value = measured
    else:
        metric = (
            f"Bot RSS growth, {minutes:.1f} min soak ({rate:g} req/s, {alongside}), "
            "trend carried to 10 min"
        )
        value = ten_min
    tenths = []
    for k in range(1, 11):
        at = duration * k / 10
        tenths.append(next((x for t, x in samples if t >= at), samples[-1][1]))
    log(
        f"soak: {res['requests']} requests over {duration:.0f} s, {failed} failed; RSS "
        f"{start_rss / MB:.1f} → {end_rss / MB:.1f} MB ({measured:+.2f} %), trend "
        f"{slope * 60 / MB:.2f} MB/min ({ten_min:+.2f} % over 10 min)"
    )
    return Row(
        metric,
        "%",
        [value],
        None,
        "< 5 % (10 min)",
        "<",
        5,
        note=(
            f"its own mint, emulator and bot process, {duration:.0f} s; {res['requests']} "
            f"requests, half streaming ({failed} failed); RSS {start_rss / MB:.1f} MB after "
            f"{warmup:.0f} s warm-up → {end_rss / MB:.1f} MB at the end: {measured:+.2f} % "
            f"measured over {(duration - warmup) / 60:.1f} min; least-squares trend "
            f"{slope * 60 / MB:.2f} MB/min = {ten_min:+.2f} % over the 10 min a full soak "
            f"covers after its warm-up; peak {max(x for _, x in samples) / MB:.1f} MB; RSS "
            "(MB) at each tenth of the soak: " + ", ".join(f"{x / MB:.1f}" for x in tenths)
        ),
    )


def main() -> int:
    """Entry point of the soak process."""
    set_log_prefix("soak")
    spec = json.loads(Path(sys.argv[1]).read_text())
    OVERRIDES.update(spec["overrides"])
    result = asyncio.run(soak(spec))
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
