"""``ecashbot dev``: the whole system on one machine, in one process tree, on 127.0.0.1.

A nutshell mint with the FakeWallet backend (its invoices count as paid) in a child
process, nostr-sdk's relay and — without a Gemini key — the local Gemini emulator in
this process, the embedded state store and the bot itself (HTTP and Nostr DMs). It
mints funded test tokens at the dev mint and prints how to spend them. Leaving the
``async with`` (Ctrl-C) stops everything in reverse order and deletes the temporary
data directory; the mint also dies with this process if it is killed (Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import nostr_sdk

from bot.config import Config, RedisConfig, load_config
from bot.daemon import running
from bot.llm.emulator import RunningEmulator, start_emulator
from bot.llm.gemini import Gemini
from mint_client.errors import MintError
from mint_client.minting import MintingAPI, active_keyset, mint_token
from mint_client.tokens import normalize_mint_url

__all__ = [
    "DevError",
    "DevMint",
    "DevOptions",
    "DevRelay",
    "DevStack",
    "dev_stack",
    "instructions",
    "run_dev",
]

HOST = "127.0.0.1"
MINT_START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
#: what the printed examples ask
EXAMPLE_QUESTION = "Why is the sky blue?"
#: the line that ends the start-up report (a parent process may wait for it)
READY_LINE = "ecashbot dev is running"

Progress = Callable[[str], None]


class DevError(RuntimeError):
    """A part of the dev system did not come up; the message says which and why."""


def free_port(host: str = HOST, wanted: int = 0) -> int:
    """``wanted`` if it is free, else a TCP port nobody listens on right now (the OS picks
    it; a race stays possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as servers bind: a port whose old connections linger in TIME_WAIT is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, wanted))
        except OSError:
            if not wanted:
                raise
            sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_listening(port: int, host: str = HOST) -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


# --- the mint ---------------------------------------------------------------------------

# Run in the mint's child process before nutshell: on Linux, die with our process even
# if it is SIGKILLed (PR_SET_PDEATHSIG), then run ``python -m cashu.mint``. A stub in
# the child instead of ``preexec_fn``, which is unsafe once threads (tokio's) exist.
_MINT_STUB = """\
import ctypes, os, runpy, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
except Exception:
    pass
if os.getppid() != parent:
    os._exit(1)
sys.argv = ["cashu.mint"]
runpy.run_module("cashu.mint", run_name="__main__", alter_sys=True)
"""


class DevMint:
    """A nutshell mint (FakeWallet: every invoice counts as paid) in its own process group.

    It runs from an empty directory with HOME pointed at another, on a minimal
    environment, so neither ``.env`` files nor our variables configure it. Its key and
    port are kept in ``data_dir``, so a restart on the same directory serves the same
    keysets at the same URL (the port, if it is still free).
    """

    def __init__(self, data_dir: Path, *, input_fee_ppk: int = 0) -> None:
        self.data_dir = data_dir
        self.input_fee_ppk = input_fee_ppk
        self.port = 0
        #: the port of the previous start on ``data_dir``, if any
        self.previous_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The mint's stdout and stderr, appended across starts."""
        return self.data_dir / "mint.log"

    def _private_key(self) -> str:
        path = self.data_dir / "private_key"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return path.read_text().strip()

    def _env(self) -> dict[str, str]:
        home = self.data_dir / "home"
        env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TMPDIR") if k in os.environ}
        env.update(
            HOME=str(home),
            CASHU_DIR=str(home / ".cashu"),
            PYTHONUNBUFFERED="1",
            LOG_LEVEL="INFO",
            DEBUG="FALSE",
            MINT_BACKEND_BOLT11_SAT="FakeWallet",
            FAKEWALLET_BRR="TRUE",
            # 0 makes the cashu CLI hang while it waits for an invoice
            FAKEWALLET_DELAY_INCOMING_PAYMENT="1",
            MINT_PRIVATE_KEY=self._private_key(),
            MINT_LISTEN_HOST=HOST,
            MINT_LISTEN_PORT=str(self.port),
            MINT_DATABASE=str(self.data_dir / "db"),
            MINT_AUTH_DATABASE=str(self.data_dir / "db"),
            MINT_INPUT_FEE_PPK=str(self.input_fee_ppk),
            MINT_RATE_LIMIT="FALSE",
            MINT_INFO_NAME="ecashbot dev mint",
            MINT_INFO_DESCRIPTION="FakeWallet: test ecash, worth nothing",
        )
        return env

    def _port(self) -> int:
        """The port of the last start on this directory if it is free, else a new one.

        Tokens, the bot's wallet and the cashu CLI's wallet name the mint by its URL: with
        ``--data`` it should not move between starts.
        """
        path = self.data_dir / "port"
        try:
            self.previous_port = int(path.read_text())
        except (FileNotFoundError, ValueError):
            self.previous_port = None
        port = free_port(wanted=self.previous_port or 0)
        path.write_text(f"{port}\n")
        return port

    def spawn(self) -> None:
        """Start the mint process on a free port; :meth:`wait_ready` waits for it."""
        for sub in ("db", "home", "cwd"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self.port = self._port()
        self._log = self.log_path.open("ab")
        self._log.write(f"\n===== ecashbot dev: start on port {self.port} =====\n".encode())
        self._log.flush()
        self._log_offset = self.log_path.stat().st_size
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _MINT_STUB, str(os.getpid())],
            cwd=self.data_dir / "cwd",
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C is ours to pass on
        )

    def log_tail(self, n_bytes: int = 3000) -> str:
        """The end of the mint's log, for error messages."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n_bytes))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    def _ours(self) -> bool:
        """Whether the log shows *our* process listening (not a stranger on the port)."""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f"running on http://{HOST}:{self.port}".encode() in f.read()

    async def wait_ready(self, within_s: float = MINT_START_TIMEOUT_S) -> None:
        """Wait until the mint answers ``GET /v1/info``; :class:`DevError` if it can't."""
        proc = self._proc
        assert proc is not None, "spawn() first"
        deadline = time.monotonic() + within_s
        timeout = aiohttp.ClientTimeout(total=1)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if proc.poll() is not None:
                    raise DevError(
                        f"the mint exited with {proc.returncode} during start; the end of "
                        f"{self.log_path}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with session.get(f"{self.url}/v1/info") as resp:
                        if resp.status == 200 and self._ours():
                            return
                if time.monotonic() > deadline:
                    raise DevError(
                        f"the mint is not ready after {within_s} s; the end of "
                        f"{self.log_path}:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.1)

    async def wait_exited(self, poll_s: float = 0.5) -> int:
        """Wait until the mint process exits on its own; its exit status."""
        while True:
            proc = self._proc
            if proc is not None and proc.poll() is not None:
                return proc.returncode
            await asyncio.sleep(poll_s)

    async def start(self) -> None:
        """Spawn and wait; a lost race for the port is retried on another one."""
        for attempt in range(3):
            self.spawn()
            try:
                await self.wait_ready()
                return
            except DevError:
                await self.stop()
                if "address already in use" not in self.log_tail().lower() or attempt == 2:
                    raise

    async def stop(self) -> None:
        """SIGTERM the mint's process group, SIGKILL after a grace period; reap it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
                if await _reaped(proc, STOP_TIMEOUT_S):
                    break
            # anything its process group left behind goes too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None


async def _reaped(proc: subprocess.Popen[bytes], within_s: float) -> bool:
    """Wait up to ``within_s`` for ``proc`` to exit; True once it is reaped."""
    deadline = time.monotonic() + within_s
    while True:
        if proc.poll() is not None:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


# --- the relay --------------------------------------------------------------------------


class DevRelay:
    """nostr-sdk's relay in this process, on a free port of 127.0.0.1, events in memory."""

    def __init__(self) -> None:
        self.port = 0
        self._relay: nostr_sdk.LocalRelay | None = None

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:PORT``."""
        return f"ws://{HOST}:{self.port}"

    async def start(self) -> None:
        """Listen on a free port (a lost race for it is retried on another one)."""
        for attempt in range(3):
            self.port = free_port()
            relay = (
                nostr_sdk.LocalRelayBuilder()
                .addr(HOST)
                .port(self.port)
                # the defaults throttle a busy client to a few REQs a second
                .rate_limit(nostr_sdk.RateLimit(max_reqs=1_000, notes_per_minute=100_000))
                .build()
            )
            try:
                await relay.run()
            except Exception:
                if attempt == 2:
                    raise
                continue
            self._relay = relay
            return

    async def stop(self) -> None:
        """Close the listener and every connection."""
        relay, self._relay = self._relay, None
        if relay is None:
            return
        # shutdown() wakes only the tasks waiting at that instant (tokio's
        # notify_waiters): repeat it until the port is closed, and a little after.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        closed_at: float | None = None
        while closed_at is None or time.monotonic() - closed_at < 0.2:
            relay.shutdown()
            if closed_at is None and not port_is_listening(self.port):
                closed_at = time.monotonic()
            if time.monotonic() > deadline:
                raise DevError(f"the relay still listens on port {self.port}")
            await asyncio.sleep(0.02)


# --- the whole stack --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DevOptions:
    """What ``ecashbot dev`` is asked for."""

    #: the bot's HTTP port; 0 = any free port
    http_port: int = 8080
    #: where mint, bot wallet and cashu CLI wallet live; None = a temporary directory
    data_dir: Path | None = None
    #: a Gemini key: real Gemini answers; None = the local emulator
    gemini_api_key: str | None = None
    #: the dev mint's input fee (NUT-02), as nutshell's default
    mint_fee_ppk: int = 100
    #: funded test tokens to mint, and their value in sat
    tokens: int = 4
    token_sat: int = 1000


@dataclass(frozen=True, slots=True)
class DevStack:
    """Where everything of a running dev system is."""

    http_url: str
    mint_url: str
    relay_url: str
    npub: str
    default_model: str
    #: the emulator's URL when it answers instead of Gemini
    emulator_url: str | None
    data_dir: Path
    #: the data directory is deleted on exit
    temporary: bool
    #: a directory for the cashu CLI's wallet
    cashu_dir: Path
    tokens: tuple[str, ...]
    token_sat: int
    #: the input fee of the dev mint's keyset, as the mint reports it
    mint_fee_ppk: int
    #: the mint's process, watched while the system runs
    mint: DevMint = field(repr=False, compare=False)

    @property
    def emulated(self) -> bool:
        """True when the emulator answers, not Gemini."""
        return self.emulator_url is not None


def _nsec(path: Path) -> str:
    """The bot's Nostr key, kept in the data directory (the same npub with ``--data``)."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(nostr_sdk.Keys.generate().secret_key().to_bech32())
    return path.read_text().strip()


def dev_config(
    *,
    mint_url: str,
    relay_url: str,
    http_port: int,
    wallet_dir: Path,
    nsec: str,
    gemini: dict[str, Any],
) -> Config:
    """The bot's config for dev: defaults and ``ECASHBOT_`` env, with the dev system's parts.

    The keys dev owns (mints, http, wallet, nostr, redis, and the ``gemini`` keys given)
    win over the environment; other Gemini settings (timeout, attempts) stay configurable.
    """
    base = load_config(None, mints=[mint_url])
    return base.model_copy(
        update={
            "mints": [normalize_mint_url(mint_url)],
            "http": base.http.model_copy(update={"enabled": True, "host": HOST, "port": http_port}),
            "wallet": base.wallet.model_copy(update={"path": wallet_dir}),
            "nostr": base.nostr.model_copy(
                update={"enabled": True, "nsec": nsec, "relays": [relay_url]}
            ),
            "gemini": base.gemini.model_copy(update=gemini),
            "redis": RedisConfig(url=None),
        }
    )


@contextlib.asynccontextmanager
async def dev_stack(opts: DevOptions, progress: Progress) -> AsyncIterator[DevStack]:
    """Start mint, relay, model and bot; report each as it is ready; stop all on exit."""
    if opts.http_port and port_is_listening(opts.http_port):  # fail before the slow parts
        raise DevError(
            f"port {opts.http_port} of {HOST} is taken; --port N picks another, --port 0 any"
        )
    temporary = opts.data_dir is None
    data_dir = (
        Path(tempfile.mkdtemp(prefix="ecashbot-dev-"))
        if opts.data_dir is None
        else opts.data_dir.resolve()
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            for sub in ("mint", "bot", "cashu-wallet"):
                (data_dir / sub).mkdir(parents=True, exist_ok=True)
            kept = "deleted on exit" if temporary else "kept"
            progress(f"data           {data_dir} ({kept})")

            # the mint first: it takes seconds, and is best forked before tokio's threads
            mint = DevMint(data_dir / "mint", input_fee_ppk=opts.mint_fee_ppk)
            stack.push_async_callback(mint.stop)
            started = time.monotonic()
            mint.spawn()

            relay = DevRelay()
            await relay.start()
            stack.push_async_callback(relay.stop)
            progress(f"relay ready    {relay.url} (nostr-sdk's relay, in this process)")

            emulator: RunningEmulator | None = None
            if opts.gemini_api_key is None:
                emulator = await start_emulator(host=HOST)
                stack.push_async_callback(emulator.stop)
                progress(
                    f"model ready    EMULATED: the local Gemini emulator at {emulator.url} "
                    "answers, not Gemini (set GEMINI_API_KEY for real answers)"
                )
            else:
                progress("model ready    Gemini (GEMINI_API_KEY is set): real answers")

            try:
                await mint.wait_ready()
            except DevError:
                if "address already in use" not in mint.log_tail().lower():
                    raise
                await mint.stop()
                await mint.start()
            try:
                async with aiohttp.ClientSession() as session:
                    # with --data, the keyset (and its fee) may predate this --mint-fee-ppk
                    api = MintingAPI(session, mint.url, timeout_s=20)
                    fee_ppk = (await active_keyset(api, "sat")).input_fee_ppk
                    progress(
                        f"mint ready     {mint.url} (nutshell, FakeWallet: its invoices count "
                        f"as paid; input fee {fee_ppk} ppk) in {time.monotonic() - started:.1f} s"
                    )
                    if mint.previous_port not in (None, mint.port):
                        progress(
                            f"               (port {mint.previous_port} of the last run was "
                            "taken: tokens and change from then name the old URL)"
                        )
                    tokens = await asyncio.gather(
                        *(mint_token(session, mint.url, opts.token_sat) for _ in range(opts.tokens))
                    )
            except (MintError, aiohttp.ClientError, TimeoutError) as exc:
                raise DevError(
                    f"the dev mint did not make test tokens: {exc}; the end of its log:\n"
                    f"{mint.log_tail()}"
                ) from exc
            progress(f"tokens ready   {opts.tokens} x {opts.token_sat} sat, minted at the dev mint")

            gemini_cfg: dict[str, Any]
            if emulator is not None:
                gemini_cfg = {
                    "api_key": "ecashbot-dev-emulator",
                    "base_url": emulator.url,
                    "api_version": "v1beta",
                    "timeout_s": 30.0,
                }
            else:
                gemini_cfg = {"api_key": opts.gemini_api_key}
            cfg = dev_config(
                mint_url=mint.url,
                relay_url=relay.url,
                http_port=opts.http_port,
                wallet_dir=data_dir / "bot",
                nsec=_nsec(data_dir / "bot" / "nostr.nsec"),
                gemini=gemini_cfg,
            )
            model = Gemini(cfg.gemini)
            stack.push_async_callback(model.aclose)
            if emulator is not None:
                model.label = "Gemini emulator"
            daemon = await stack.enter_async_context(running(cfg, model))
            assert daemon.http_url is not None and daemon.nostr is not None
            progress(
                f"bot listening  HTTP {daemon.http_url}, Nostr {daemon.nostr.npub} on {relay.url}"
                + (" (answers EMULATED)" if emulator is not None else "")
            )
            yield DevStack(
                http_url=daemon.http_url,
                mint_url=mint.url,
                relay_url=relay.url,
                npub=daemon.nostr.npub,
                default_model=cfg.default_model,
                emulator_url=emulator.url if emulator is not None else None,
                data_dir=data_dir,
                temporary=temporary,
                cashu_dir=data_dir / "cashu-wallet",
                tokens=tuple(tokens),
                token_sat=opts.token_sat,
                mint_fee_ppk=fee_ppk,
                mint=mint,
            )
    finally:
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)


def instructions(stack: DevStack, run_prefix: str = "") -> str:
    """The ready-to-paste part of the report: URLs, tokens, and commands that use them.

    ``run_prefix`` goes before the project's commands (``"uv run "`` under uv).
    """
    tokens = list(stack.tokens)
    # one token per example: a token pays once (with fewer, a placeholder says so)
    first, second, third, fourth = (tokens + ["cashuB..."] * 4)[:4]
    q = shlex.quote(EXAMPLE_QUESTION)
    model = stack.default_model
    messages = [{"role": "user", "content": EXAMPLE_QUESTION}]
    body = json.dumps({"model": model, "messages": messages})
    wallet = f"MINT_URL={stack.mint_url} CASHU_DIR={shlex.quote(str(stack.cashu_dir))}"
    source = (
        f"emulator {stack.emulator_url} (answers are EMULATED, not Gemini)"
        if stack.emulated
        else "Gemini"
    )
    lines = [
        f"HTTP:  {stack.http_url}",
        f"npub:  {stack.npub}",
        f"relay: {stack.relay_url}",
        f"mint:  {stack.mint_url}",
        f"model: {source}",
        "",
        f"Funded test tokens, {stack.token_sat} sat each from the dev mint (one question each;",
        "what the answer does not use comes back as a change token):",
        *(f"token: {t}" for t in tokens),
        "",
        "1. Ask with curl (pays with the first token; the change is in payment.change):",
        f"curl -sS {stack.http_url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-H 'X-Cashu: {first}' -d {shlex.quote(body)}",
        "",
        "2. Ask with the OpenAI Python client (second token):",
        f"{run_prefix}python - <<'EOF'",
        "from openai import OpenAI",
        f'client = OpenAI(base_url="{stack.http_url}/v1", api_key="unused",',
        f'                default_headers={{"X-Cashu": "{second}"}})',
        "raw = client.chat.completions.with_raw_response.create(",
        f"    model={json.dumps(model)}, messages={json.dumps(messages)})",
        "print(raw.parse().choices[0].message.content)",
        'print("change:", raw.headers.get("X-Cashu"))',
        "EOF",
        "",
        "3. Ask with ecashbot's own client, over HTTP (third token) and over Nostr (fourth):",
        f"{run_prefix}ecashbot ask {q} --url {stack.http_url} --token {third}",
        f"{run_prefix}ecashbot ask {q} --nostr --to {stack.npub} --relay {stack.relay_url} "
        f"--token {fourth}",
        "",
        "4. The cashu CLI as your wallet at the dev mint (receive change; 'invoice' mints more",
        "   test ecash, paid at once by the FakeWallet; a ./.env or ~/.cashu/.env of yours",
        "   would override these settings):",
        f"{wallet} {run_prefix}cashu receive <change token>",
        f"{wallet} {run_prefix}cashu invoice 1000",
        f"{wallet} {run_prefix}cashu balance",
    ]
    return "\n".join(lines)


async def run_dev(opts: DevOptions, *, out: IO[str], run_prefix: str = "") -> None:
    """Start the dev system, print the report to ``out``, serve until cancelled.

    Raises :class:`DevError` when the mint dies under it: without a mint nothing works.
    """

    def progress(line: str) -> None:
        print(line, file=out, flush=True)

    progress(f"ecashbot dev: the whole system on {HOST}, in this process tree.")
    async with dev_stack(opts, progress) as stack:
        progress("")
        progress(instructions(stack, run_prefix))
        progress("")
        progress(
            f"{READY_LINE}: one log line per paid request follows (stderr). "
            "Ctrl-C stops everything."
        )
        code = await stack.mint.wait_exited()
        raise DevError(
            f"the mint exited with {code}; stopping. The end of its log:\n{stack.mint.log_tail()}"
        )
