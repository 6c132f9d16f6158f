"""The daemon: builds every long-lived resource from the config, and closes it again.

Resources are opened in order and closed in reverse, aiohttp's ``cleanup_ctx`` style:
one HTTP session for all mint calls, one SQLite store, one model client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from bot.config import Config
from bot.http import make_app, runner_args
from bot.llm.gemini import Gemini
from bot.metrics import Metrics
from bot.nostr import NostrTransport
from bot.outbox import Outbox
from bot.payout import payout_loop
from bot.pipeline import LLM, Pipeline
from bot.state import State, StateUnavailable, open_state
from mint_client.lnwallet import LightningWallet
from mint_client.p2pk import LockKey
from mint_client.protocol import MintRegistry
from mint_client.store import ProofStore
from mint_client.wallet import load_or_create_seed

log = logging.getLogger("ecashbot")


@dataclass
class Daemon:
    """The running bot: its pipeline, wallet and (when enabled) HTTP listener."""

    cfg: Config
    pipeline: Pipeline
    wallet: LightningWallet
    state: State
    http_url: str | None
    nostr: NostrTransport | None


@contextlib.asynccontextmanager
async def running(cfg: Config, llm: LLM | None = None) -> AsyncIterator[Daemon]:
    """Start the bot from ``cfg``; on exit, let paid requests settle, then close all."""
    async with contextlib.AsyncExitStack() as stack:
        # idle connections are dropped before a mint's server would close them (uvicorn:
        # 5 s), so a request rarely meets a connection closed under it
        connector = aiohttp.TCPConnector(limit=200, limit_per_host=100, keepalive_timeout=3)
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
        state = open_state(cfg.redis.url, cfg.wallet.path / "state.sqlite3")
        stack.push_async_callback(state.close)
        store = ProofStore(cfg.wallet.path)
        await store.open()
        stack.push_async_callback(store.close)
        metrics = Metrics()
        mints = MintRegistry(
            session, cfg.mints, timeout_s=cfg.wallet.mint_timeout_s, observer=metrics.mint_call
        )
        wallet = LightningWallet(
            store,
            mints,
            load_or_create_seed(cfg.wallet.path),
            cfg.unit,
            # loaded even when locked tokens are off: it signs the sweep of those taken before
            lock_key=LockKey.load_or_create(cfg.wallet.path),
            min_lock_s=cfg.locked.min_lock_s,
            takes_locked=cfg.locked.enabled,
            stock_sat=cfg.locked.stock_sat,
        )
        model: LLM
        if llm is None:
            gemini = Gemini(cfg.gemini)
            stack.push_async_callback(gemini.aclose)
            model = gemini
        else:
            model = llm
        pipeline = Pipeline(cfg, wallet, mints, model, state, metrics)
        stack.push_async_callback(pipeline.drain)
        http_url = None
        if cfg.http.enabled:
            runner = web.AppRunner(make_app(cfg, pipeline), **runner_args(cfg))
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, cfg.http.host, cfg.http.port)
            await site.start()
            port = _bound_port(runner)
            http_url = f"http://{cfg.http.host}:{port}"
            log.info("HTTP listening on %s", http_url)
        nostr = None
        if cfg.nostr.enabled:
            outbox = Outbox(cfg.wallet.path)
            await outbox.open()
            stack.push_async_callback(outbox.close)
            nostr = NostrTransport(cfg, pipeline, state, outbox)
            await nostr.start()
            stack.push_async_callback(nostr.stop)
            metrics.relay_source = nostr.relay_status
        daemon = Daemon(
            cfg=cfg,
            pipeline=pipeline,
            wallet=wallet,
            state=state,
            http_url=http_url,
            nostr=nostr,
        )
        # payments a crash left half done: resolve them now, then keep watching
        await recover_once(daemon, min_age_s=0)
        try:
            await pipeline.reclaim_locked(since=time.time() - RECLAIM_LOCKED_S)
        except StateUnavailable:
            log.warning("locked payments' claims not renewed at start-up (state down)")
        recovery = asyncio.create_task(_recovery_loop(daemon), name="recovery")
        stack.push_async_callback(_cancel, recovery)
        sweeps = asyncio.create_task(_sweep_loop(daemon), name="sweep")
        stack.push_async_callback(_cancel, sweeps)
        if cfg.payout.lnaddress:
            payouts = asyncio.create_task(payout_loop(cfg.payout, wallet, session), name="payout")
            stack.push_async_callback(_cancel, payouts)
        yield daemon


#: at start-up, the replay claims of locked payments this recent are renewed
RECLAIM_LOCKED_S = 3600


async def recover_once(daemon: Daemon, *, min_age_s: float) -> None:
    """One recovery pass: finish interrupted payments, deliver change a crash held back."""
    try:
        undelivered = await daemon.pipeline.recover(min_age_s=min_age_s)
    except Exception:
        log.exception("recovery pass failed; retrying later")
        return
    if daemon.nostr is not None:
        for rec in undelivered:
            try:
                await daemon.nostr.deliver_recovered(rec)
            except Exception:
                log.exception("payment %s: delivery after recovery failed; retrying later", rec.id)


async def _recovery_loop(daemon: Daemon) -> None:
    while True:
        await asyncio.sleep(daemon.cfg.wallet.recovery_interval_s)
        await recover_once(daemon, min_age_s=daemon.cfg.wallet.recovery_min_age_s)


async def sweep_once(daemon: Daemon) -> None:
    """Swap the locked proofs accepted so far into the bot's own, one batch per mint."""
    max_inputs = daemon.cfg.locked.sweep_max_inputs
    metrics = daemon.pipeline.metrics
    for mint in daemon.cfg.mints:
        while True:
            try:
                done = await daemon.wallet.sweep(mint, max_inputs=max_inputs)
            except Exception as exc:
                metrics.sweep("failed")
                log.warning("sweep at %s failed (%s); retrying later", mint, exc)
                break
            if done is None:
                break
            metrics.sweep("done")
            if len(done.input_ys) < max_inputs:
                break


async def _sweep_loop(daemon: Daemon) -> None:
    while True:
        await asyncio.sleep(daemon.cfg.locked.sweep_interval_s)
        await sweep_once(daemon)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    raise RuntimeError("HTTP site did not bind")


async def serve_forever(cfg: Config) -> None:
    """Run until cancelled (SIGINT/SIGTERM)."""
    async with running(cfg):
        await asyncio.Event().wait()
