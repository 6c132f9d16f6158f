"""A man in the middle between the bot and a real mint, for fault injection.

The bot is configured with the proxy's URL as its mint; the proxy forwards every request
to the real mint, unless a hook decides otherwise:

* ``before(request, body)`` runs before forwarding: return a response to answer in the
  mint's place (the mint never sees the request), or None to forward it;
* ``after(request, status, payload)`` runs once the mint answered: return a response to
  send instead of the mint's (e.g. a 502: the mint did the work, the answer is lost), or
  None to pass the mint's answer on.

    async with MintProxy(mint.url, after=lose_first_swap) as proxy:
        cfg = bot_config(tmp_path / "bot", [proxy.url], emulator_url)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType

import aiohttp
from aiohttp import web

__all__ = ["After", "Before", "MintProxy"]

Before = Callable[[web.Request, bytes], Awaitable[web.StreamResponse | None]]
After = Callable[[web.Request, int, bytes], Awaitable[web.StreamResponse | None]]


class MintProxy:
    """An HTTP proxy on a free port of 127.0.0.1 in front of the mint at ``target``."""

    def __init__(
        self, target: str, *, before: Before | None = None, after: After | None = None
    ) -> None:
        self.target = target.rstrip("/")
        self.before = before
        self.after = after
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.before is not None and (answer := await self.before(request, body)):
            return answer
        async with (
            aiohttp.ClientSession() as s,
            s.request(
                request.method,
                self.target + request.path_qs,
                data=body,
                headers={"Content-Type": "application/json"},
            ) as r,
        ):
            payload = await r.read()
        if self.after is not None and (answer := await self.after(request, r.status, payload)):
            return answer
        return web.Response(status=r.status, body=payload, content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MintProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
