"""The operator's view over HTTP: ``GET /dashboard`` (a page and its JSON) and ``/metrics``.

Everything here is behind ``operator.token`` and off while it is unset. Scripts and
Prometheus send ``Authorization: Bearer <token>``. A browser can't send a header by
navigating, so the dashboard takes the token once, from its login form (a POST, so the
token stays out of URLs and access logs) or as ``?token=`` in a bookmark, and answers
with an HttpOnly, SameSite=Strict cookie that holds an HMAC of the token, never the
token itself; changing the token logs every browser out. Tokens are compared in
constant time. The page is one static file (``bot/static/dashboard.html``): plain
JavaScript and hand-drawn SVG charts, nothing fetched from the internet.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import html
import re
import time
from importlib import resources
from typing import Any

from aiohttp import web

from bot.config import Config
from bot.metrics import CONTENT_TYPE
from bot.pipeline import Pipeline
from bot.state import StateUnavailable

__all__ = ["COOKIE", "DashboardView", "session_cookie_value"]

#: the browser's session cookie
COOKIE = "ecashbot_operator"
#: how long a browser stays logged in, seconds
COOKIE_MAX_AGE_S = 7 * 86400

_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def session_cookie_value(token: str) -> str:
    """The cookie a browser gets for ``token``: an HMAC of it, useless anywhere else."""
    return hmac.new(token.encode(), b"ecashbot dashboard session v1", hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    """Constant-time equality that does not even leak the length."""
    return hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()
    )


@functools.cache
def _page(name: str) -> tuple[str, str]:
    """A static page and its Content-Security-Policy (hashes of its inline script/style)."""
    text = (resources.files("bot") / "static" / name).read_text(encoding="utf-8")

    def allowed(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
        digests = [base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() for s in found]
        return " ".join(f"'sha256-{d}'" for d in digests) or "'none'"

    csp = (
        f"default-src 'none'; script-src {allowed('script')}; style-src {allowed('style')}; "
        "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    return text, csp


def _see_dashboard() -> web.Response:
    """303 to the dashboard (after a login or logout: no token left in the URL)."""
    return web.Response(status=303, headers={**_SECURITY_HEADERS, "Location": "/dashboard"})


class DashboardView:
    """The operator's routes over one pipeline: dashboard, its data, login, metrics."""

    def __init__(self, cfg: Config, pipeline: Pipeline) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.metrics = pipeline.metrics

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Add the dashboard (page, data, login, logout) and ``/metrics`` to ``router``."""
        router.add_get("/dashboard", self.dashboard)
        router.add_get("/dashboard/data", self.data)
        router.add_post("/dashboard/login", self.login)
        router.add_post("/dashboard/logout", self.logout)
        router.add_get("/metrics", self.prometheus)

    # -- who is asking ------------------------------------------------------------------

    def _token(self) -> str:
        token = self.cfg.operator.token
        if not token:
            raise web.HTTPNotFound(text="the operator's view is off (set operator.token)")
        return token

    def _authorized(self, request: web.Request) -> bool:
        """The bearer header, or the dashboard's cookie, carries the operator token."""
        token = self._token()
        bearer = request.headers.get("Authorization")
        if bearer is not None:
            return _same(bearer, f"Bearer {token}")
        cookie = request.cookies.get(COOKIE)
        return cookie is not None and _same(cookie, session_cookie_value(token))

    def _logged_in(self, request: web.Request, token: str) -> web.Response:
        """Set the session cookie and send the browser to a URL without the token."""
        resp = _see_dashboard()
        resp.set_cookie(
            COOKIE,
            session_cookie_value(token),
            max_age=COOKIE_MAX_AGE_S,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        return resp

    def _login_page(self, message: str = "", status: int = 401) -> web.Response:
        text, csp = _page("login.html")
        body = text.replace("{{message}}", html.escape(message))
        return web.Response(
            text=body,
            status=status,
            content_type="text/html",
            headers={**_SECURITY_HEADERS, "Content-Security-Policy": csp},
        )

    # -- the pages ----------------------------------------------------------------------

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        """``GET /dashboard``: the page once logged in, else the login form (401)."""
        token = self._token()
        given = request.query.get("token")
        if given is not None:
            if _same(given, token):
                return self._logged_in(request, token)
            return self._login_page("That is not the operator token.")
        if not self._authorized(request):
            return self._login_page()
        text, csp = _page("dashboard.html")
        return web.Response(
            text=text,
            content_type="text/html",
            headers={**_SECURITY_HEADERS, "Content-Security-Policy": csp},
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        """``POST /dashboard/login`` (form field ``token``): the session cookie."""
        token = self._token()
        form = await request.post()
        given = form.get("token")
        if isinstance(given, str) and _same(given.strip(), token):
            return self._logged_in(request, token)
        return self._login_page("That is not the operator token.")

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """``POST /dashboard/logout``: forget the session cookie."""
        self._token()
        resp = _see_dashboard()
        resp.del_cookie(COOKIE, path="/")
        return resp

    async def data(self, request: web.Request) -> web.Response:
        """``GET /dashboard/data``: everything the page shows, as JSON."""
        if not self._authorized(request):
            return _unauthorized()
        return web.json_response(await self.snapshot(), headers=_SECURITY_HEADERS)

    async def prometheus(self, request: web.Request) -> web.Response:
        """``GET /metrics``: the Prometheus text format."""
        if self.cfg.operator.metrics_require_token and not self._authorized(request):
            return _unauthorized()
        held = await self.pipeline.wallet.balance_sat()
        relays = await self.metrics.relays()
        try:
            budget = await self._budget()
        except StateUnavailable:
            budget = None
        self.metrics.set_gauges(
            held_sat={m: held.get(m, 0) for m in self.cfg.mints},
            budget_left=budget["all"]["left"] if budget else None,
            model_budget_left={m: b["left"] for m, b in budget["models"].items()} if budget else {},
            relays=relays,
        )
        return web.Response(
            body=self.metrics.exposition(),
            headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"},
        )

    # -- what is shown ------------------------------------------------------------------

    async def _budget(self) -> dict[str, Any]:
        """Today's budget under the configured limits: limit, used, left (None: no limit)."""
        b = self.cfg.budget

        def view(limit: int | None, used: int) -> dict[str, int | None]:
            left = None if limit is None else max(0, limit - b.safety_buffer - used)
            return {"limit": limit, "used": used, "left": left}

        day, used_all = "", 0
        models: dict[str, dict[str, int | None]] = {}
        for model in self.cfg.models:
            got = await self.pipeline.state.budget_left(model)
            day, used_all = str(got["date"]), int(got["used"])
            models[model] = view(b.per_model.get(model), int(got["model_used"]))
        return {
            "date": day,
            "safety_buffer": b.safety_buffer,
            "all": view(b.daily_tokens, used_all),
            "models": models,
        }

    async def snapshot(self) -> dict[str, Any]:
        """The dashboard's data: statistics, budget, wallet, mint and relay health.

        ``stats`` has the shape of ``GET /v1/stats`` (see :mod:`bot.state.base`); it and
        ``budget`` are None, with ``state_error`` set, while the state store is down.
        """
        out: dict[str, Any] = {
            "generated_at": time.time(),
            "refresh_s": self.cfg.operator.dashboard_refresh_s,
            "models": list(self.cfg.models),
            "stats": None,
            "budget": None,
            "state_error": None,
        }
        try:
            out["stats"] = await self.pipeline.state.stats()
            out["budget"] = await self._budget()
        except StateUnavailable:
            out["state_error"] = "the state store (statistics, budget) is unavailable"
        held = await self.pipeline.wallet.balance_sat()
        out["wallet"] = {"held_sat": {m: held.get(m, 0) for m in self.cfg.mints}}
        mints = []
        for url in self.cfg.mints:
            h = self.metrics.mint_health(url)
            mints.append(
                {
                    "url": url,
                    "healthy": h.healthy,
                    "calls": h.calls,
                    "errors": h.errors,
                    "last_ok_at": h.last_ok_at,
                    "last_error_at": h.last_error_at,
                    "last_error": h.last_error,
                    "last_latency_ms": None
                    if h.last_latency_s is None
                    else round(h.last_latency_s * 1000, 1),
                }
            )
        out["mints"] = mints
        relays = await self.metrics.relays()
        out["relays"] = (
            None
            if relays is None
            else [{"url": url, "status": status} for url, status in sorted(relays.items())]
        )
        return out


def _unauthorized() -> web.Response:
    return web.json_response(
        {"error": {"message": "operator token required", "code": "unauthorized"}},
        status=401,
        headers={**_SECURITY_HEADERS, "WWW-Authenticate": "Bearer"},
    )
