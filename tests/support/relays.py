"""Nostr relays for tests: nostr-sdk's in-process relay and an independent one.

- :class:`LocalRelay`: nostr-sdk's own relay, in this process. Fast, for most tests; it
  speaks the same dialect as the SDK under test, so it cannot catch interop bugs. It
  refuses events over 64 KiB of JSON (not configurable from Python), like many public
  relays: a NIP-17 DM of more than ~28 KB of text does not fit.
- :class:`NostrRelayProcess`: the PyPI package ``nostr-relay`` 1.14 (a Python relay by
  another author, SQLite storage) in a subprocess, from a virtual environment of its own
  (its dependencies clash with ours), built once under ``~/.cache/ecashbot-test``. It
  takes events up to 256 KiB of content, keeps them across restarts, and can require
  NIP-42 AUTH.

Fixtures: ``local_relay`` and ``independent_relay`` (shared by the session; don't stop
them), ``local_relay_factory`` and ``independent_relay_factory`` (relays of the test's
own, to restart, kill or make demand AUTH). Import them into a conftest or test module.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol

import aiohttp
import nostr_sdk
import pytest
from nostr_sdk import LocalRelayBuilder, LocalRelayBuilderNip42, LocalRelayBuilderNip42Mode

from tests.support.child import ChildProcess
from tests.support.ports import free_port, port_is_listening

__all__ = [
    "NOSTR_RELAY_REQUIREMENTS",
    "IndependentRelayFactory",
    "LocalRelay",
    "LocalRelayFactory",
    "NostrRelayProcess",
    "RelayStartError",
    "ensure_nostr_relay_venv",
    "independent_relay",
    "independent_relay_factory",
    "local_relay",
    "local_relay_factory",
]

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
VENV_TIMEOUT_S = 600.0

#: nostr-relay takes events up to this many characters of content (a NIP-17 gift wrap is
#: ~2.2x its text; nostr-relay's default, 4096, refuses a DM of ~1.5 KB).
DEFAULT_MAX_EVENT_SIZE = 256 * 1024

# --- nostr-sdk's in-process relay -----------------------------------------------------


class LocalRelay:
    """nostr-sdk's in-process relay on 127.0.0.1; can be stopped and started on the same port.

    ``auth`` makes it demand NIP-42 AUTH (``"write"``, ``"read"`` or ``"both"``);
    ``auth_dm`` serves gift wraps only to the authenticated receiver. Without ``lmdb_dir``
    its events live in memory and are gone after :meth:`stop`; with it, they survive.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        auth: str | None = None,
        auth_dm: bool = False,
        lmdb_dir: Path | None = None,
    ) -> None:
        self._port = port
        self.auth = auth
        self.auth_dm = auth_dm
        self.lmdb_dir = lmdb_dir
        self._database: nostr_sdk.NostrLmdb | None = None
        self._relay: nostr_sdk.LocalRelay | None = None

    @property
    def port(self) -> int:
        """The TCP port (chosen on the first start unless given)."""
        if self._port is None:
            raise RuntimeError("relay not started yet: no port chosen")
        return self._port

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:PORT``."""
        return f"ws://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the relay serves now."""
        return self._relay is not None

    def _builder(self) -> LocalRelayBuilder:
        builder = (
            LocalRelayBuilder()
            .addr("127.0.0.1")
            .port(self.port)
            # Defaults throttle a busy test (a few REQs a second, 60 notes a minute).
            .rate_limit(nostr_sdk.RateLimit(max_reqs=1_000, notes_per_minute=1_000_000))
            .max_connections(1_000)
        )
        if self.auth is not None:
            mode = LocalRelayBuilderNip42Mode[self.auth.upper()]
            builder = builder.nip42(LocalRelayBuilderNip42(mode=mode))
        if self.auth_dm:
            builder = builder.auth_dm(True)
        if self._database is not None:
            builder = builder.database(self._database)
        return builder

    async def start(self) -> None:
        """Start serving (on the same port as before, if started before)."""
        if self._relay is not None:
            raise RuntimeError(f"relay already running on {self.url}")
        if self.lmdb_dir is not None and self._database is None:
            self.lmdb_dir.mkdir(parents=True, exist_ok=True)
            self._database = await nostr_sdk.NostrLmdb.open(str(self.lmdb_dir))
        for attempt in range(3):
            chosen = self._port is None
            if chosen:
                self._port = free_port()
            relay = self._builder().build()
            try:
                await relay.run()
            except Exception:
                if chosen and attempt < 2:
                    self._port = None  # lost the race for a free port: pick another
                    continue
                raise
            self._relay = relay
            return

    async def stop(self) -> None:
        """Close the listener and every connection (clients see a disconnect)."""
        relay, self._relay = self._relay, None
        if relay is None:
            return
        # shutdown() is tokio's Notify::notify_waiters(): it wakes only the loops that
        # wait at that instant, so a listener or session between two iterations misses
        # it and goes on serving. Repeat it until the port is closed, and a little after.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        closed_at: float | None = None
        while closed_at is None or time.monotonic() - closed_at < 0.2:
            relay.shutdown()
            if closed_at is None and not port_is_listening(self.port):
                closed_at = time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"local relay still listening on {self.port}")
            await asyncio.sleep(0.02)
        del relay  # the relay also shuts down when its last handle is dropped

    async def restart(self) -> None:
        """Stop and start again on the same port (same events only with ``lmdb_dir``)."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> LocalRelay:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LocalRelay 127.0.0.1:{self._port or '?'} {state}>"


# --- nostr-relay (PyPI) in its own virtual environment --------------------------------

#: The exact set ``nostr-relay==1.14`` resolved to when this file was written (Python
#: 3.11); pinned so a fresh machine builds the same relay.
NOSTR_RELAY_REQUIREMENTS = """\
nostr-relay==1.14
aiodns==4.0.4
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aionostr==0.20.0
aiosignal==1.4.0
aiosqlite==0.22.1
alembic==1.20.1
annotated-types==0.8.0
anyio==4.16.0
attrs==26.1.0
backports-zstd==1.8.0
brotli==1.2.1
cffi==2.1.1
click==8.5.1
coincurve==21.0.0
cryptography==50.0.2
falcon==4.4.0
frozenlist==1.8.0
greenlet==3.5.6
gunicorn==27.0.1
h11==0.16.0
httptools==0.9.0
idna==3.20
mako==1.4.3
markupsafe==3.0.4
multidict==7.2.1
propcache==0.5.4
pycares==5.2.1
pycparser==3.12
pydantic==2.14.3
pydantic-core==2.50.4
python-dotenv==1.2.4
python-rapidjson==1.25
pyyaml==6.0.3
setproctitle==1.3.8
sqlalchemy==2.1.9
typing-extensions==4.16.0
typing-inspection==0.4.5
uvicorn==0.54.0
uvloop==0.23.0
watchfiles==1.3.0
websockets==17.4
yarl==1.25.1
"""

# A plugin for nostr-relay 1.14, imported by the relay as its authenticator class.
# 1. NIP-42: its stock authenticator gives an authenticated key the roles stored for it
#    in the relay's database ("a"nonymous by default), so "auth required" would need a
#    `nostr-relay role set` per key. This one lets every authenticated key read and
#    write, and serves DMs (kinds 4 and 1059) only to their receiver, as strict DM
#    relays do.
# 2. The wire: nostr-relay speaks an early NIP-42 draft. It answers an EVENT refused
#    before AUTH with ["OK", "", false, "restricted: ..."] (no event id: nostr-sdk waits
#    for its OK and reports "timeout"; the same for any refused EVENT, e.g. too large),
#    a REQ refused with a NOTICE (the subscription silently dies), and an AUTH with
#    nothing. Clients retry after AUTH only on "auth-required:" OK/CLOSED, so a client
#    that sends REQ/EVENT right after connecting (as nostr-sdk does) races its own AUTH
#    and loses. The wrapper around web.start_client rewrites those answers as current
#    NIP-42 relays send them: OK with the event id, CLOSED for a refused REQ,
#    "auth-required:" before AUTH, and an OK for the AUTH event. Storage, filters and
#    subscriptions stay nostr-relay's own.
_RELAY_PLUGIN = '''\
"""nostr-relay plugin for ecashbot's tests: NIP-42 as relays speak it today."""

import contextvars
import json

from nostr_relay import web
from nostr_relay.auth import Action, Authenticator

DM_KINDS = {4, 1059}
_connection = contextvars.ContextVar("ecashbot_connection")


class AnyKeyAuthenticator(Authenticator):
    async def authenticate(self, auth_event_json, challenge=""):
        token = await super().authenticate(auth_event_json, challenge)
        token["roles"] = set(token["roles"]) | {"r", "w"}
        state = _connection.get(None)
        if state is not None:
            state["authed"] = True
        return token

    async def evaluate_target(self, auth_token, action, target):
        if action == Action.query.value:
            me = auth_token.get("pubkey")
            for query in getattr(target, "filters", None) or []:
                if query.kinds is not None and not (set(query.kinds) & DM_KINDS):
                    continue
                tags = dict(query.tags or [])
                own_inbox = tags.get("p") == {me}
                own_outbox = list(query.authors or []) == [me]
                if not (own_inbox or own_outbox):
                    return False
            return True
        return await super().evaluate_target(auth_token, action, target)


def _auth_reason(state, reason):
    if reason.startswith("restricted") and not state["authed"]:
        return "auth-required: " + reason.split(": ", 1)[-1]
    return reason


_original_start_client = web.start_client


async def start_client(storage, ws_send, ws_recv, *args, **kwargs):
    state = {"authed": False, "last": None, "answered": False}
    _connection.set(state)

    async def send(data):
        last = state["last"]
        if last is None or not data.startswith(("[\\"OK\\"", "[\\"NOTICE\\"")):
            return await ws_send(data)
        what, ref = last
        msg = json.loads(data)
        if msg[0] == "OK" and what == "EVENT" and msg[1] == "":
            data = json.dumps(["OK", ref, msg[2], _auth_reason(state, msg[3])])
        elif msg[0] == "NOTICE" and what == "REQ":
            data = json.dumps(["CLOSED", ref, _auth_reason(state, msg[1])])
        elif msg[0] == "NOTICE" and what == "AUTH":
            data = json.dumps(["OK", ref, False, "auth-required: " + msg[1]])
            state["answered"] = True
        return await ws_send(data)

    async def recv():
        last = state["last"]
        if last is not None and last[0] == "AUTH" and not state["answered"] and state["authed"]:
            await ws_send(json.dumps(["OK", last[1], True, ""]))
        state["last"], state["answered"] = None, False
        data = await ws_recv()
        try:
            msg = json.loads(data)
        except ValueError:
            return data
        if isinstance(msg, list) and len(msg) >= 2:
            if msg[0] in ("EVENT", "AUTH") and isinstance(msg[1], dict):
                state["last"] = (msg[0], str(msg[1].get("id", "")))
            elif msg[0] == "REQ":
                state["last"] = ("REQ", str(msg[1]))
        return data

    return await _original_start_client(storage, send, recv, *args, **kwargs)


web.start_client = start_client
'''


class RelayStartError(RuntimeError):
    """The relay did not come up; the message carries the tail of its log."""


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ecashbot-test"


def _run_checked(cmd: list[str], log: IO[bytes]) -> None:
    log.write(f"$ {' '.join(cmd)}\n".encode())
    log.flush()
    subprocess.run(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        check=True,
        timeout=VENV_TIMEOUT_S,
    )


def _build_venv(venv: Path, requirements: Path, log: IO[bytes]) -> None:
    python = venv / "bin" / "python"
    uv = shutil.which("uv")
    if uv is not None:
        _run_checked([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], log)
        _run_checked([uv, "pip", "install", "--python", str(python), "-r", str(requirements)], log)
    else:
        _run_checked([sys.executable, "-m", "venv", str(venv)], log)
        _run_checked([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)], log)


def ensure_nostr_relay_venv(cache_root: Path | None = None) -> Path:
    """The virtual environment holding ``nostr-relay`` (created once; blocking).

    It lives at ``~/.cache/ecashbot-test/nostr-relay-<hash of the pins>`` (or under
    ``$XDG_CACHE_HOME``); ``uv venv`` + ``uv pip install`` when ``uv`` is on PATH, else
    ``python -m venv`` + pip. A file lock makes concurrent test runs build it once; a
    half-built one (no ``.complete`` marker) is thrown away and built again.
    """
    root = cache_root or _cache_root()
    digest = hashlib.sha256(
        f"{sys.version_info[:2]}\n{NOSTR_RELAY_REQUIREMENTS}".encode()
    ).hexdigest()[:12]
    venv = root / f"nostr-relay-{digest}"
    marker = venv / ".complete"
    if marker.exists():
        return venv
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        requirements = root / f"{venv.name}.requirements.txt"
        requirements.write_text(NOSTR_RELAY_REQUIREMENTS)
        log_path = root / f"{venv.name}.build.log"
        with log_path.open("wb") as log:
            try:
                _build_venv(venv, requirements, log)
            except (subprocess.SubprocessError, OSError) as exc:
                shutil.rmtree(venv, ignore_errors=True)
                raise RelayStartError(
                    f"could not build the nostr-relay venv at {venv}: {exc}\n"
                    + log_path.read_text(errors="replace")[-4000:]
                ) from exc
        marker.write_text(NOSTR_RELAY_REQUIREMENTS)
    return venv


class NostrRelayProcess(ChildProcess):
    """The PyPI relay ``nostr-relay`` (1.14, uvicorn + SQLite) in a subprocess, for tests.

    Its database lives in ``data_dir`` and survives :meth:`stop`, :meth:`kill` and
    :meth:`restart`, which keep the port. ``auth_required=True`` turns on NIP-42: the
    relay sends an AUTH challenge on connect and accepts EVENTs and REQs only after the
    client authenticated (any key will do); it serves DMs (kinds 4, 1059) only to the
    key they are addressed to. Refusals are worded as current relays word them
    (``OK false``/``CLOSED`` with ``auth-required:`` before AUTH, ``restricted:``
    after), thanks to a small plugin: see ``_RELAY_PLUGIN`` for what nostr-relay itself
    would send.
    """

    name = "nostr-relay"
    log_name = "relay.log"
    start_error = RelayStartError
    start_timeout_s = START_TIMEOUT_S
    stop_timeout_s = STOP_TIMEOUT_S

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        auth_required: bool = False,
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
        venv: Path | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.auth_required = auth_required
        self.max_event_size = max_event_size
        self._venv = venv

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:PORT``."""
        return f"ws://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        """The relay's SQLite database (kept across restarts)."""
        return self.data_dir / "nostr.sqlite3"

    @property
    def config_path(self) -> Path:
        """The YAML config written before each start."""
        return self.data_dir / "config.yaml"

    def _label(self) -> str:
        return super()._label() + (" auth" if self.auth_required else "")

    # --- how it runs --------------------------------------------------------------------

    def _config(self) -> dict[str, object]:
        urls = [f"ws://127.0.0.1:{self.port}", f"ws://localhost:{self.port}"]
        return {
            "DEBUG": False,
            "relay_name": "ecashbot test relay (nostr-relay)",
            "relay_description": "independent relay for ecashbot's tests",
            "storage": {
                "sqlalchemy.url": f"sqlite+aiosqlite:///{self.db_path}",
                "num_concurrent_reqs": 10,
                "num_concurrent_adds": 2,
                # The stock list minus is_not_hellthread (it only looks at kinds 1, 7).
                "validators": [
                    "nostr_relay.validators.is_not_too_large",
                    "nostr_relay.validators.is_signed",
                    "nostr_relay.validators.is_recent",
                ],
            },
            # Checked against len(event.content), in characters.
            "max_event_size": self.max_event_size,
            "gunicorn": {"bind": f"127.0.0.1:{self.port}", "workers": 1, "loglevel": "info"},
            "authentication": {
                "enabled": self.auth_required,
                "authenticator_class": "ecashbot_relay_plugin.AnyKeyAuthenticator",
                # nostr-relay reads "relay_urls" (its sample config says "valid_urls").
                "relay_urls": urls + [u + "/" for u in urls],
                "actions": {"save": "w", "query": "r"},
            },
            "message_timeout": 1800,
            "subscription_limit": 64,
            "max_limit": 6000,
        }

    def _env(self) -> dict[str, str]:
        env = {
            key: os.environ[key]
            for key in ("PATH", "LANG", "LC_ALL", "TMPDIR")
            if key in os.environ
        }
        env.update(
            HOME=str(self.data_dir / "home"),
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(self.data_dir / "plugins"),
        )
        return env

    def _argv(self) -> list[str]:
        assert self._venv is not None
        nostr_relay = str(self._venv / "bin" / "nostr-relay")
        return [nostr_relay, "-c", str(self.config_path), "serve", "--use-uvicorn"]

    def _prepare(self) -> None:
        for sub in ("home", "plugins"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        (self.data_dir / "plugins" / "ecashbot_relay_plugin.py").write_text(_RELAY_PLUGIN)
        # JSON is YAML: no YAML writer needed.
        self.config_path.write_text(json.dumps(self._config(), indent=2))

    async def start(self) -> None:
        """Build the relay's venv if needed, start it, wait until it answers a REQ."""
        if self._venv is None:
            self._venv = await asyncio.to_thread(ensure_nostr_relay_venv)
        await super().start()

    async def _is_ready(self, new_log: bytes) -> bool:
        # The log line proves that *our* process listens, not a stranger.
        if f"running on http://127.0.0.1:{self.port}".encode() not in new_log:
            return False
        timeout = aiohttp.ClientTimeout(total=2)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with aiohttp.ClientSession(timeout=timeout) as session:
                return await self._answers_req(session)
        return False

    async def _answers_req(self, session: aiohttp.ClientSession) -> bool:
        """A websocket REQ gets EOSE (or, with AUTH on, at least the AUTH challenge)."""
        async with session.ws_connect(self.url) as ws:
            await ws.send_str(json.dumps(["REQ", "ready", {"kinds": [0], "limit": 1}]))
            while True:
                msg = await ws.receive(timeout=2)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return False
                kind = json.loads(msg.data)[0]
                if kind in ("EOSE", "AUTH"):
                    return True


# --- pytest fixtures ----------------------------------------------------------------------


class LocalRelayFactory(Protocol):
    """Start an in-process relay of one's own: ``await local_relay_factory(auth="both")``."""

    async def __call__(
        self, *, auth: str | None = None, auth_dm: bool = False, persistent: bool = False
    ) -> LocalRelay: ...


class IndependentRelayFactory(Protocol):
    """Start a nostr-relay process of one's own: ``await independent_relay_factory()``."""

    async def __call__(self, *, auth_required: bool = False) -> NostrRelayProcess: ...


@pytest.fixture(scope="session")
async def local_relay() -> AsyncIterator[LocalRelay]:
    """nostr-sdk's in-process relay shared by the session (don't stop it in a test)."""
    relay = LocalRelay()
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


@pytest.fixture
async def local_relay_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[LocalRelayFactory]:
    """In-process relays of the test's own (to stop, restart, require AUTH...)."""
    started: list[LocalRelay] = []

    async def factory(
        *, auth: str | None = None, auth_dm: bool = False, persistent: bool = False
    ) -> LocalRelay:
        lmdb_dir = tmp_path_factory.mktemp("local-relay") if persistent else None
        relay = LocalRelay(auth=auth, auth_dm=auth_dm, lmdb_dir=lmdb_dir)
        started.append(relay)
        await relay.start()
        return relay

    try:
        yield factory
    finally:
        for relay in started:
            await relay.stop()


@pytest.fixture(scope="session")
async def independent_relay(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[NostrRelayProcess]:
    """A nostr-relay process shared by the session, no AUTH (don't stop it in a test)."""
    async with NostrRelayProcess(tmp_path_factory.mktemp("nostr-relay")) as relay:
        yield relay


@pytest.fixture
async def independent_relay_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[IndependentRelayFactory]:
    """nostr-relay processes of the test's own (to kill, restart, require AUTH...)."""
    started: list[NostrRelayProcess] = []

    async def factory(*, auth_required: bool = False) -> NostrRelayProcess:
        relay = NostrRelayProcess(
            tmp_path_factory.mktemp("own-nostr-relay"), auth_required=auth_required
        )
        started.append(relay)
        await relay.start()
        return relay

    try:
        yield factory
    finally:
        for relay in started:
            await relay.stop()
