"""Where the bot's time goes: a cProfile dump attributed to components.

cProfile measures wall time per function. Each function is put in a component by its
file (``mint_client/tokens.py`` → parsing and crypto, ``google/genai/`` → SDK, ...). A
function in no component (the standard library, C built-ins such as ``json.dumps`` or
a secp256k1 call) has its own time charged to the components of its callers, in
proportion to the time each caller spent in it, up the call graph until a component is
found. So each component's figure is its own code plus the unowned code it ran: the
figures add up to the total, with no double counting. Time the loop spends waiting in
``select`` is idle and left out. Coroutines count only while they run, not while they
wait.
"""

from __future__ import annotations

import pstats
from pathlib import Path

Func = tuple[str, int, str]

#: the loop's wait for I/O (a C method of the selector), not work
#: (component, substrings of the file path or built-in name), first match wins
COMPONENTS: list[tuple[str, tuple[str, ...]]] = [
    (
        "tokens + crypto (mint_client.tokens/crypto, cashu.core.crypto, coincurve, cbor)",
        (
            "mint_client/tokens.py",
            "mint_client/crypto.py",
            "cashu/core/crypto",
            "coincurve",
            "_libsecp256k1",
            "cbor2",
            "bip32",
        ),
    ),
    ("mint client (mint_client.protocol)", ("mint_client/protocol.py",)),
    (
        "wallet + proof store (mint_client.wallet/store, sqlite3)",
        (
            "mint_client/wallet.py",
            "mint_client/store.py",
            "mint_client/lnwallet.py",
            "sqlite3",
            "aiosqlite",
        ),
    ),
    ("google-genai SDK (google.genai)", ("google/genai", "pydantic", "google/auth")),
    ("bot LLM adapter (bot.llm)", ("bot/llm/",)),
    ("HTTP server (aiohttp.web)", ("aiohttp/web",)),
    (
        "HTTP client (aiohttp client, for mint and SDK)",
        (
            "aiohttp/client",
            "aiohttp/connector",
            "aiohttp/streams",
            "aiohttp/http_parser",
            "aiohttp/_http_parser",
            "aiohttp/http_writer",
            "aiohttp/multipart",
            "aiohttp/payload",
            "aiohttp/helpers",
            "aiohttp/cookiejar",
            "yarl",
            "multidict",
        ),
    ),
    ("state (bot.state)", ("bot/state/",)),
    ("pipeline + pricing (bot.pipeline, pricing)", ("bot/pipeline.py", "pricing/")),
    ("HTTP handler (bot.http)", ("bot/http.py",)),
    ("metrics + logs (bot.metrics/logs, logging)", ("bot/metrics.py", "bot/logs.py", "logging/")),
    ("event loop (asyncio)", ("asyncio/", "uvloop")),
]
IDLE = "idle (waiting in select)"
OTHER = "other"


def component(func: Func) -> str | None:
    """The component of a function, or None when it belongs to none."""
    filename, _, name = func
    if filename == "~" and any(
        f"of '{w}' objects" in name for w in ("select.epoll", "select.poll", "select.kqueue")
    ):
        return IDLE
    where = filename if filename != "~" else name
    for comp, needles in COMPONENTS:
        if any(n in where for n in needles):
            return comp
    return None


def attribute(prof_path: Path, requests: int) -> str:
    """A markdown table: ms per request and share per component."""
    st = pstats.Stats(str(prof_path))
    stats = st.stats  # type: ignore[attr-defined]
    cache: dict[Func, dict[str, float]] = {}

    def shares(func: Func, depth: int = 0) -> dict[str, float]:
        if func in cache:
            return cache[func]
        comp = component(func)
        if comp is not None:
            result = {comp: 1.0}
        elif depth > 30 or func not in stats:
            result = {OTHER: 1.0}
        else:
            cache[func] = {OTHER: 1.0}  # a cycle back here counts as other
            callers = stats[func][4]
            total = sum(edge[3] for edge in callers.values())
            if total <= 0:
                result = {OTHER: 1.0}
            else:
                result = {}
                for caller, edge in callers.items():
                    for c, w in shares(caller, depth + 1).items():
                        result[c] = result.get(c, 0.0) + w * edge[3] / total
        cache[func] = result
        return result

    per: dict[str, float] = {}
    for func, (_, _, tt, _, _) in stats.items():
        for comp, w in shares(func).items():
            per[comp] = per.get(comp, 0.0) + tt * w
    idle = per.pop(IDLE, 0.0)
    busy = sum(per.values())
    lines = [
        f"{requests} paid requests (half streaming, emulator TTFT 0) through a bot under "
        f"cProfile, wall time while busy {busy:.2f} s ({busy * 1000 / requests:.1f} ms per "
        f"request; cProfile itself slows Python code ~2x), idle {idle:.1f} s.",
        "",
        "| component | ms per request | share |",
        "|---|---|---|",
    ]
    for comp, t in sorted(per.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {comp} | {t * 1000 / requests:.2f} | {t * 100 / busy:.1f} % |")
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])
    lines += [
        "",
        "Top functions by own time:",
        "",
        "| function | own ms per request |",
        "|---|---|",
    ]
    shown = 0
    for func, (_, _, tt, _, _) in top:
        if component(func) == IDLE:
            continue
        filename, line, name = func
        short = filename.split("site-packages/")[-1].split("/work/main/")[-1]
        lines.append(f"| `{short}:{line} {name}` | {tt * 1000 / requests:.2f} |")
        shown += 1
        if shown == 12:
            break
    return "\n".join(lines)
