"""``ecashbot dev`` and ``ecashbot ask`` as a user runs them: real processes, real ports.

One ``python -m bot dev --port 0`` runs for the whole module, without a Gemini key, so the
local emulator answers. The tests read its printed report, pay with the funded tokens it
printed (each token pays once: each test uses its own), run the printed curl command and
the OpenAI snippet, receive change with the printed ``cashu`` CLI settings, ask over HTTP
and over Nostr with ``ecashbot ask``, and finally press Ctrl-C (SIGINT to its process
group, as a terminal does) and check that no process and no port of it is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp
import pytest
import pytest_asyncio

from bot.devstack import READY_LINE, DevMint, DevStack, instructions
from mint_client.minting import mint_token
from mint_client.tokens import Token, parse_token
from tests.support.fixtures import UserWalletFactory
from tests.support.ports import port_is_listening

pytestmark = pytest.mark.asyncio(loop_scope="session")

#: the repository root, where ``python -m bot`` finds the package
ROOT = Path(__file__).resolve().parents[1]
#: the virtualenv's scripts (ecashbot, cashu, python): first on the PATH of what we run
VENV_BIN = Path(sys.executable).parent
#: mint start-up (4-8 s, more on a loaded machine), relay, emulator, bot, four tokens
START_TIMEOUT_S = 120.0
#: one command (an ask, curl, the cashu CLI)
COMMAND_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
TOKEN_SAT = 1000
QUESTION = "Why is the sky blue?"
#: ``ecashbot ask`` from this virtualenv
ASK = (sys.executable, "-m", "bot", "ask")

RECEIPT = re.compile(
    r"^receipt: (?P<model>\S+)(?: \([^)]*\))?: (?P<input>\d+) tokens in, (?P<output>\d+) out; "
    r"charged (?P<charged>\d+) sat, mint fee (?P<fee>\d+) sat, change (?P<change>\d+) sat"
    r"(?: \((?P<extra>.*)\))?$",
    re.MULTILINE,
)
CHANGE = re.compile(r"^change: (cashuB\S+)$", re.MULTILINE)
PAID_LOG = re.compile(
    r"paid request id=(?P<id>\S+) transport=(?P<transport>\S+) model=(?P<model>\S+) "
    r"in=\d+ out=\d+ paid=(?P<paid>\d+) fee=(?P<fee>\d+) charged=(?P<charged>\d+) "
    r"change=(?P<change>\d+) outcome=answered latency_ms=\d+"
)


# --- the dev process and its report ----------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What ``ecashbot dev`` printed, read back."""

    text: str
    http_url: str
    npub: str
    relay_url: str
    mint_url: str
    emulator_url: str
    data_dir: Path
    fee_ppk: int
    tokens: tuple[str, ...]

    def line(self, starts_with: str) -> str:
        """The one printed line that starts so."""
        found = [ln for ln in self.text.splitlines() if ln.startswith(starts_with)]
        assert len(found) == 1, f"{len(found)} lines start with {starts_with!r}:\n{self.text}"
        return found[0]

    def heredoc(self, opening: str) -> str:
        """A printed ``... <<'EOF'`` block, from its opening line to ``EOF``."""
        lines = self.text.splitlines()
        start = lines.index(opening)
        end = lines.index("EOF", start)
        return "\n".join(lines[start : end + 1]) + "\n"


def _field(text: str, pattern: str) -> str:
    m = re.search(pattern, text, re.MULTILINE)
    assert m, f"{pattern!r} not in the report:\n{text}"
    return m.group(1)


def parse_report(text: str) -> Report:
    """Read the printed report: URLs, npub, data directory and the funded tokens."""
    return Report(
        text=text,
        http_url=_field(text, r"^HTTP:\s+(http://\S+)$"),
        npub=_field(text, r"^npub:\s+(npub1\w+)$"),
        relay_url=_field(text, r"^relay:\s+(ws://\S+)$"),
        mint_url=_field(text, r"^mint:\s+(http://\S+)$"),
        emulator_url=_field(text, r"^model:\s+emulator (http://\S+) \(answers are EMULATED"),
        data_dir=Path(_field(text, r"^data\s+(\S+) \(deleted on exit\)$")),
        fee_ppk=int(_field(text, r"^mint ready .* input fee (\d+) ppk")),
        tokens=tuple(re.findall(r"^token: (cashuB\S+)$", text, re.MULTILINE)),
    )


def port_of(url: str) -> int:
    """The port of ``scheme://host:port``."""
    return int(url.rsplit(":", 1)[1].split("/")[0])


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without a Gemini key, bot settings or uv's marker; venv first on PATH.

    Without ``UV`` the report prints bare ``ecashbot``/``cashu``/``python`` commands, which
    this PATH resolves to the virtualenv's scripts.
    """
    drop = {"GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL", "UV"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ECASHBOT_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


Stat = tuple[str, int, int, int, int]


def _stat(pid: int) -> Stat | None:
    """(state, ppid, pgid, session, start time) of a live process from /proc, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[19])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def process_tree(root: int) -> dict[int, Stat]:
    """``root`` and all its descendants, by pid."""
    tree: dict[int, Stat] = {}
    stat = _stat(root)
    assert stat is not None
    tree[root] = stat
    grew = True
    while grew:
        grew = False
        for pid in _all_pids():
            s = _stat(pid)
            if pid not in tree and s is not None and s[1] in tree:
                tree[pid] = s
                grew = True
    return tree


class DevProcess:
    """``python -m bot dev --port 0`` in its own process group; stdout and stderr to files."""

    def __init__(self, log_dir: Path) -> None:
        self.stdout_path = log_dir / "dev.stdout"
        self.stderr_path = log_dir / "dev.stderr"
        self.proc: asyncio.subprocess.Process | None = None
        #: processes of its tree seen so far: pid -> (state, ppid, pgid, session, start)
        self.known: dict[int, Stat] = {}
        self.report: Report | None = None
        self._files: list[IO[bytes]] = []

    def stdout(self) -> str:
        """Everything it printed so far (the report)."""
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        """Its log so far."""
        return self.stderr_path.read_text(errors="replace")

    def _failure(self, what: str) -> str:
        return f"{what}\n--- stdout:\n{self.stdout()[-4000:]}\n--- stderr:\n{self.stderr()[-4000:]}"

    async def start(self) -> Report:
        """Start it and wait for its report to end with the ready line."""
        out = self.stdout_path.open("wb")
        err = self.stderr_path.open("wb")
        self._files = [out, err]
        self.proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bot", "dev", "--port", "0"),
            cwd=ROOT,
            env=clean_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # a process group of its own, as in a terminal
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while READY_LINE not in self.stdout():
            if self.proc.returncode is not None:
                raise AssertionError(self._failure(f"dev exited with {self.proc.returncode}"))
            if time.monotonic() > deadline:
                raise AssertionError(self._failure(f"dev not ready in {START_TIMEOUT_S} s"))
            await asyncio.sleep(0.1)
        self.report = parse_report(self.stdout())
        return self.report

    async def wait_exit(self, within_s: float) -> int | None:
        """Its exit status once it exited, or None if it still runs after ``within_s``."""
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), within_s)
        except TimeoutError:
            return None

    async def wait_log(self, pattern: re.Pattern[str], count: int, within_s: float) -> list[str]:
        """Wait until its log holds ``count`` matches of ``pattern``; the matched lines."""
        deadline = time.monotonic() + within_s
        while True:
            lines = [ln for ln in self.stderr().splitlines() if pattern.search(ln)]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Teardown, also after a failure: SIGINT, then SIGKILL its group and whatever of
        its tree is left, and remove its temporary directory if it could not."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(AssertionError):
                self.known.update(process_tree(self.proc.pid))
            for sig in (signal.SIGINT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, sig)
                if await self.wait_exit(STOP_TIMEOUT_S) is not None:
                    break
        for pid, stat in self.known.items():
            now = _stat(pid)
            if now is not None and now[4] == stat[4]:  # the same process, not a reused pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        for f in self._files:
            f.close()
        if self.report is not None:
            shutil.rmtree(self.report.data_dir, ignore_errors=True)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def dev_process(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevProcess]:
    process = DevProcess(tmp_path_factory.mktemp("dev"))
    try:
        yield process
    finally:
        await process.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def dev(dev_process: DevProcess) -> Report:
    """The running dev system's report."""
    return await dev_process.start()


async def run(*argv: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> tuple[int, str]:
    """Run a command to its end; its exit status and stdout + stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env or clean_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(
            f"{shlex.join(argv)[:300]} did not end in {COMMAND_TIMEOUT_S} s"
        ) from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def bash(script: str, *, cwd: Path, **env: str) -> tuple[int, str]:
    """Run a printed command line as a user pastes it into a shell."""
    return await run("bash", "-c", script, env=clean_env(**env), cwd=cwd)


def fee_sat(token: Token, fee_ppk: int) -> int:
    """NUT-02: what the mint keeps when the token is swapped."""
    return math.ceil(len(token.proofs) * fee_ppk / 1000)


async def assert_change_redeems(
    change: str, change_sat: int, report: Report, user_wallet: UserWalletFactory
) -> None:
    """The change is a cashuB of the dev mint worth ``change_sat``, and an independent
    wallet (nutshell's) receives it there."""
    assert change.startswith("cashuB")
    token = parse_token(change)
    assert token.mint == report.mint_url
    assert token.unit == "sat"
    assert token.amount == change_sat
    wallet = await user_wallet(report.mint_url)
    assert await wallet.receive(change) == change_sat - fee_sat(token, wallet.input_fee_ppk)


def read_ask_output(out: str) -> tuple[str, str, dict[str, str]]:
    """``ecashbot ask``'s output: the answer, the change token, the receipt's fields."""
    receipt = RECEIPT.search(out)
    change = CHANGE.search(out)
    assert receipt and change, out
    answer = out[: change.start()].strip()
    return answer, change.group(1), receipt.groupdict()


# --- the report ------------------------------------------------------------------------


async def test_report_says_what_runs_where(dev: Report, dev_process: DevProcess) -> None:
    text = dev.text
    for step in ("relay ready", "model ready", "mint ready", "tokens ready", "bot listening"):
        assert re.search(rf"^{step}\s", text, re.MULTILINE), f"no {step!r} line:\n{text}"
    assert "EMULATED" in dev.line("model ready")
    assert "EMULATED" in dev.line("bot listening")
    assert len(dev.tokens) == 4
    for t in dev.tokens:
        token = parse_token(t)
        assert token.mint == dev.mint_url and token.amount == TOKEN_SAT
    # every printed command is bare (not under uv here) and points at this system
    assert dev.line("curl ").startswith(f"curl -sS {dev.http_url}/v1/chat/completions ")
    http_ask = dev.line("ecashbot ask " + shlex.quote(QUESTION) + " --url")
    assert http_ask.endswith(f"--url {dev.http_url} --token {dev.tokens[2]}")
    nostr_ask = dev.line("ecashbot ask " + shlex.quote(QUESTION) + " --nostr")
    assert f"--to {dev.npub} --relay {dev.relay_url} --token {dev.tokens[3]}" in nostr_ask
    cli = [ln for ln in text.splitlines() if ln.startswith("MINT_URL=")]
    assert [ln.split(" cashu ")[1] for ln in cli] == [
        "receive <change token>",
        "invoice 1000",
        "balance",
    ]
    assert all(ln.startswith(f"MINT_URL={dev.mint_url} CASHU_DIR=") for ln in cli)
    assert dev.fee_ppk == 100  # nutshell's default, so the examples show a mint fee
    assert dev.data_dir.is_dir()
    # all of it on 127.0.0.1
    for url in (dev.http_url, dev.relay_url, dev.mint_url, dev.emulator_url):
        assert "://127.0.0.1:" in url
        assert port_is_listening(port_of(url)), url
    assert "Traceback" not in dev_process.stderr()


async def test_commands_under_uv_run_and_with_fewer_tokens(tmp_path: Path) -> None:
    stack = DevStack(
        http_url="http://127.0.0.1:8080",
        mint_url="http://127.0.0.1:3338",
        relay_url="ws://127.0.0.1:7777",
        npub="npub1example",
        default_model="gemini-2.5-flash",
        emulator_url="http://127.0.0.1:8089",
        data_dir=tmp_path,
        temporary=True,
        cashu_dir=tmp_path / "cashu wallet",
        tokens=("cashuBfirst",),
        token_sat=1000,
        mint_fee_ppk=100,
        mint=DevMint(tmp_path / "mint"),
    )
    text = instructions(stack, run_prefix="uv run ")
    lines = text.splitlines()
    # the project's commands run under uv too; curl does not
    assert [ln for ln in lines if ln.startswith("uv run ecashbot ask ")] != []
    assert "uv run python - <<'EOF'" in lines
    assert all(" uv run cashu " in ln for ln in lines if ln.startswith("MINT_URL="))
    assert "CASHU_DIR=" + shlex.quote(str(tmp_path / "cashu wallet")) + " " in text
    curl = next(ln for ln in lines if ln.startswith("curl "))
    assert "X-Cashu: cashuBfirst" in curl
    body = json.loads(shlex.split(curl)[-1])
    assert body["messages"][0]["content"] == QUESTION
    # one token: the other examples show a placeholder, not an empty or reused token
    assert text.count("cashuBfirst") == 2  # its "token:" line and curl
    assert "--token cashuB...\n" in text + "\n"


# --- acceptance 1: the printed curl command, change received by the printed cashu CLI --


async def test_printed_curl_answers_and_printed_cashu_cli_receives_the_change(
    dev: Report, dev_process: DevProcess, tmp_path: Path
) -> None:
    curl = dev.line("curl ")
    assert f"X-Cashu: {dev.tokens[0]}" in curl
    status, out = await bash(curl, cwd=tmp_path)
    assert status == 0, out
    body = json.loads(out)
    answer = body["choices"][0]["message"]["content"]
    assert answer.startswith(f"Emulated answer to: {QUESTION}")
    payment = body["payment"]
    assert payment["paid_sat"] == TOKEN_SAT
    assert payment["charged_sat"] + payment["fee_sat"] + payment["change_sat"] == TOKEN_SAT
    assert payment["refunded"] is False
    change = payment["change"]
    assert change.startswith("cashuB") and parse_token(change).amount == payment["change_sat"]

    # the printed cashu CLI lines, as pasted (HOME: none of this machine's ~/.cashu/.env)
    receive = next(ln for ln in dev.text.splitlines() if ln.endswith(" receive <change token>"))
    balance = next(ln for ln in dev.text.splitlines() if ln.endswith(" cashu balance"))
    home = tmp_path / "home"
    home.mkdir()
    status, out = await bash(
        receive.replace("<change token>", change), cwd=tmp_path, HOME=str(home)
    )
    assert status == 0, out
    received = payment["change_sat"] - fee_sat(parse_token(change), dev.fee_ppk)
    assert f"Received {received} sat" in out, out
    status, out = await bash(balance, cwd=tmp_path, HOME=str(home))
    assert status == 0, out
    assert f"Balance: {received} sat" in out, out

    lines = await dev_process.wait_log(PAID_LOG, 1, 30)
    logged = [m for ln in lines if (m := PAID_LOG.search(ln)) and m["id"] == payment["request_id"]]
    assert len(logged) == 1, dev_process.stderr()
    m = logged[0]
    assert m["transport"] == "http"
    assert (int(m["paid"]), int(m["fee"]), int(m["charged"]), int(m["change"])) == (
        payment["paid_sat"],
        payment["fee_sat"],
        payment["charged_sat"],
        payment["change_sat"],
    )


async def test_printed_openai_snippet_answers_and_returns_change(
    dev: Report, tmp_path: Path, user_wallet: UserWalletFactory
) -> None:
    snippet = dev.heredoc("python - <<'EOF'")
    assert dev.tokens[1] in snippet
    status, out = await bash(snippet, cwd=tmp_path)
    assert status == 0, out
    assert re.search(f"^Emulated answer to: {re.escape(QUESTION)}", out, re.MULTILINE), out
    change = re.search(r"^change: (cashuB\S+)$", out, re.MULTILINE)
    assert change, out
    token = parse_token(change.group(1))
    assert 0 < token.amount < TOKEN_SAT
    await assert_change_redeems(change.group(1), token.amount, dev, user_wallet)


# --- acceptance 2: ecashbot ask over HTTP and Nostr ------------------------------------


async def test_ask_over_http(
    dev: Report, dev_process: DevProcess, user_wallet: UserWalletFactory
) -> None:
    status, out = await run(*ASK, QUESTION, "--url", dev.http_url, "--token", dev.tokens[2])
    assert status == 0, out
    answer, change, r = read_ask_output(out)
    assert answer.startswith(f"Emulated answer to: {QUESTION}"), out
    assert "receipt: gemini-2.5-flash (Gemini emulator):" in out, out  # labelled as such
    charged, fee, change_sat = int(r["charged"]), int(r["fee"]), int(r["change"])
    assert f"paid {TOKEN_SAT} sat" in (r["extra"] or ""), out
    assert charged + fee + change_sat == TOKEN_SAT
    assert fee == fee_sat(parse_token(dev.tokens[2]), dev.fee_ppk)
    assert int(r["input"]) > 0 and int(r["output"]) > 0
    await assert_change_redeems(change, change_sat, dev, user_wallet)
    request_id = re.search(r"request (\w+)", r["extra"] or "")
    assert request_id, out
    logged = await dev_process.wait_log(re.compile(rf"id={request_id[1]} transport=http "), 1, 30)
    m = PAID_LOG.search(logged[0]) if logged else None
    assert m, dev_process.stderr()
    assert (int(m["paid"]), int(m["fee"]), int(m["charged"]), int(m["change"])) == (
        TOKEN_SAT,
        fee,
        charged,
        change_sat,
    )


async def test_ask_over_nostr(
    dev: Report, dev_process: DevProcess, user_wallet: UserWalletFactory
) -> None:
    status, out = await run(
        *ASK,
        QUESTION,
        "--nostr",
        "--to",
        dev.npub,
        "--relay",
        dev.relay_url,
        "--token",
        dev.tokens[3],
    )
    assert status == 0, out
    answer, change, r = read_ask_output(out)
    assert answer.startswith(f"Emulated answer to: {QUESTION}"), out
    assert "receipt: gemini-2.5-flash (Gemini emulator):" in out, out  # labelled as such
    assert "-- " not in answer  # the bot's receipt line became ask's receipt
    charged, fee, change_sat = int(r["charged"]), int(r["fee"]), int(r["change"])
    assert charged + fee + change_sat == TOKEN_SAT  # what the token was worth
    assert fee == fee_sat(parse_token(dev.tokens[3]), dev.fee_ppk)
    await assert_change_redeems(change, change_sat, dev, user_wallet)
    logged = await dev_process.wait_log(re.compile(r"transport=nostr "), 1, 30)
    m = PAID_LOG.search(logged[0]) if logged else None
    assert m, dev_process.stderr()
    assert (int(m["paid"]), int(m["charged"]), int(m["change"])) == (
        TOKEN_SAT,
        charged,
        change_sat,
    )


async def test_ask_when_the_model_fails_gets_a_refund(
    dev: Report, user_wallet: UserWalletFactory
) -> None:
    # a token of our own from the dev mint's faucet (FakeWallet: the invoice pays itself)
    async with aiohttp.ClientSession() as session:
        token = await mint_token(session, dev.mint_url, 200)
    status, out = await run(
        *ASK, "[emulator:error=500] hi", "--url", dev.http_url, "--token", token
    )
    assert status == 1, out
    assert re.search(r"^refunded: ", out, re.MULTILINE), out
    _, change, r = read_ask_output(out)
    assert "REFUNDED" in (r["extra"] or ""), out
    assert int(r["charged"]) == 0
    assert int(r["fee"]) == fee_sat(parse_token(token), dev.fee_ppk)
    assert int(r["fee"]) + int(r["change"]) == 200
    await assert_change_redeems(change, int(r["change"]), dev, user_wallet)


async def test_ask_without_a_token_shows_the_payment_request(dev: Report) -> None:
    status, out = await run(*ASK, QUESTION, "--url", dev.http_url)
    assert status == 1, out
    assert re.search(r"^payment required: \d+ sat in sat ecash from: ", out, re.MULTILINE), out
    assert dev.mint_url in out
    assert re.search(r"^payment request: creqA\S+$", out, re.MULTILINE), out


# --- Ctrl-C: nothing left running or listening -----------------------------------------


def listening_ports(pids: set[int] | None) -> dict[int, set[int]]:
    """Port -> pids listening on it, of ``pids`` (None: of every process), from
    /proc/net/tcp* and the processes' file descriptors."""
    by_inode: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for row in Path(table).read_text().splitlines()[1:]:
                cols = row.split()
                if cols[3] == "0A":  # LISTEN
                    by_inode[cols[9]] = int(cols[1].rsplit(":", 1)[1], 16)
    ports: dict[int, set[int]] = {}
    for pid in _all_pids() if pids is None else pids:
        with contextlib.suppress(FileNotFoundError, PermissionError, ProcessLookupError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(FileNotFoundError, OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in by_inode:
                        ports.setdefault(by_inode[link[8:-1]], set()).add(pid)
    return ports


async def test_ctrl_c_stops_everything(dev: Report, dev_process: DevProcess) -> None:
    assert dev_process.proc is not None
    root = dev_process.proc.pid
    tree = process_tree(root)
    dev_process.known.update(tree)  # killed at teardown if this test fails
    assert len(tree) >= 2, tree  # the bot and the mint at least
    ports = listening_ports(set(tree))
    printed = {port_of(u) for u in (dev.http_url, dev.relay_url, dev.mint_url, dev.emulator_url)}
    assert printed <= set(ports), (printed, ports)
    sessions = {s[3] for s in tree.values()}
    groups = {s[2] for s in tree.values()}

    os.killpg(root, signal.SIGINT)  # what Ctrl-C in its terminal does
    status = await dev_process.wait_exit(STOP_TIMEOUT_S)
    assert status == 0, dev_process.stderr()[-4000:]
    err = dev_process.stderr()
    assert "ecashbot dev: stopped" in err
    assert "Traceback" not in err, err[-4000:]

    def left() -> list[str]:
        found = []
        for pid in _all_pids():
            s = _stat(pid)
            if s is None or s[0] == "Z":  # gone, or a zombie its new parent reaps
                continue
            if (pid in tree and tree[pid][4] == s[4]) or s[2] in groups or s[3] in sessions:
                found.append(f"{pid} {s}")
        return found

    # the mint is stopped and reaped by the dev process (and, were that to fail, killed
    # as the dev process exits, by PR_SET_PDEATHSIG): nothing may be left at all
    assert left() == []
    # a port that still answers must be a stranger's that took the freed port since (other
    # tests pick free ports too): none of ours may hold one, and none may be unaccounted
    still = {p for p in ports if port_is_listening(p)}
    owners = listening_ports(None)
    ours = {p for p in still if not owners.get(p) or owners[p] & set(tree)}
    assert ours == set(), {p: owners.get(p) for p in still}
    assert not dev.data_dir.exists()  # the temporary data directory is gone too
