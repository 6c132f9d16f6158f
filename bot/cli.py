"""The ``ecashbot`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bot.config import ConfigError, load_config
from bot.logs import setup_logging


def _serve(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(Path(args.config) if args.config else _default_config())
    except ConfigError as exc:
        print(f"ecashbot: {exc}", file=sys.stderr)
        return 2
    # plain or JSON lines on stderr; tokens, nsec keys and the operator token redacted
    setup_logging(cfg.log_level, cfg.log.format)
    from bot.daemon import serve_forever

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await serve_forever(cfg)
        except asyncio.CancelledError:
            pass

    try:
        asyncio.run(main())
    except ValueError as exc:  # e.g. the SDK finds no API key
        print(f"ecashbot: {exc}", file=sys.stderr)
        return 2
    return 0


def _keys(args: argparse.Namespace) -> int:
    from nostr_sdk import Keys

    keys = Keys.generate()
    print(f"nsec: {keys.secret_key().to_bech32()}")
    print(f"npub: {keys.public_key().to_bech32()}")
    print("Put the nsec in config.yaml (nostr.nsec) or ECASHBOT_NOSTR__NSEC; keep it secret.")
    return 0


def _run_until_signalled(
    coro: Coroutine[Any, Any, None], *, on_signal: Callable[[], None] | None = None
) -> None:
    """Run ``coro`` until SIGINT/SIGTERM; a second signal does not interrupt the cleanup.

    ``on_signal`` runs once, at the first signal (to say that the stop has begun).
    """

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        stopping = False

        def stop() -> None:
            nonlocal stopping
            if not stopping:
                stopping = True
                if on_signal is not None:
                    on_signal()
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        try:
            await coro
        except asyncio.CancelledError:
            pass

    asyncio.run(main())


def _dev(args: argparse.Namespace) -> int:
    from bot.devstack import DevError, DevOptions, run_dev

    setup_logging("INFO")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    opts = DevOptions(
        http_port=args.port,
        data_dir=Path(args.data) if args.data else None,
        gemini_api_key=os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY"),
        mint_fee_ppk=args.mint_fee_ppk,
        tokens=args.tokens,
        token_sat=args.amount,
    )
    # under `uv run`, the printed commands need it too
    prefix = "uv run " if os.environ.get("UV") else ""

    def stopping() -> None:
        print(
            "ecashbot dev: stopping (paid requests in flight settle first)...",
            file=sys.stderr,
            flush=True,
        )

    try:
        _run_until_signalled(run_dev(opts, out=sys.stdout, run_prefix=prefix), on_signal=stopping)
    except ConfigError as exc:
        print(f"ecashbot dev: {exc}", file=sys.stderr)
        return 2
    except (DevError, OSError) as exc:
        print(f"ecashbot dev: {exc}", file=sys.stderr)
        if isinstance(exc, OSError) and "address" in str(exc).lower():
            print("ecashbot dev: is the port taken? --port 0 picks a free one", file=sys.stderr)
        return 1
    print("ecashbot dev: stopped; nothing is left running", file=sys.stderr)
    return 0


def _ask(args: argparse.Namespace) -> int:
    from bot.ask import ask_http, ask_nostr

    token = sys.stdin.readline().strip() if args.token == "-" else args.token
    if args.nostr:
        if not args.to or not args.relay:
            print("ecashbot ask: --nostr needs --to NPUB and --relay URL", file=sys.stderr)
            return 2
        coro = ask_nostr(
            args.relay,
            args.to,
            args.question,
            token,
            out=sys.stdout,
            model=args.model,
            nsec=args.nsec,
            timeout_s=args.timeout,
        )
    else:
        coro = ask_http(
            args.url,
            args.question,
            token,
            out=sys.stdout,
            model=args.model,
            max_tokens=args.max_tokens,
            timeout_s=args.timeout,
        )
    status, _ = asyncio.run(coro)
    if args.nostr:
        # nostr-sdk's native threads can crash the interpreter's teardown (SIGSEGV seen
        # once, after all output): the work is done, so leave without that teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return value

    return parse


def _audit(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(Path(args.config) if args.config else _default_config())
    except ConfigError as exc:
        print(f"ecashbot: {exc}", file=sys.stderr)
        return 2
    from bot.audit import audit

    report = asyncio.run(audit(cfg))
    print(report.table())
    return 0 if report.ok else 1


def _wallet(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(Path(args.config) if args.config else _default_config())
    except ConfigError as exc:
        print(f"ecashbot: {exc}", file=sys.stderr)
        return 2
    from bot.wallet_cli import run

    return asyncio.run(run(cfg, args, sys.stdout, sys.stderr))


def _default_config() -> Path | None:
    p = Path("config.yaml")
    return p if p.exists() else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ecashbot`` console script."""
    parser = argparse.ArgumentParser(prog="ecashbot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the bot (HTTP and Nostr DMs)")
    serve.add_argument("--config", help="path of config.yaml (default: ./config.yaml)")
    serve.set_defaults(func=_serve)
    audit = sub.add_parser(
        "audit",
        help="check the books to the sat: received = kept + change + mint fees; "
        "exits 1 on any difference",
    )
    audit.add_argument("--config", help="path of config.yaml (default: ./config.yaml)")
    audit.set_defaults(func=_audit)
    from bot.wallet_cli import add_parser as add_wallet_parser

    add_wallet_parser(sub).set_defaults(func=_wallet)
    keys = sub.add_parser("keys", help="print a new Nostr key pair for the bot")
    keys.set_defaults(func=_keys)
    dev = sub.add_parser(
        "dev", help="the whole system on 127.0.0.1: mint, relay, bot, emulated Gemini"
    )
    dev.add_argument("--port", type=int, default=8080, help="HTTP port (0: any free port)")
    dev.add_argument("--data", help="keep mint, wallets and keys here (default: a temp dir)")
    dev.add_argument(
        "--mint-fee-ppk", type=_at_least(0), default=100, help="the dev mint's input fee"
    )
    dev.add_argument("--tokens", type=_at_least(0), default=4, help="funded test tokens to print")
    dev.add_argument("--amount", type=_at_least(1), default=1000, help="sat per test token")
    dev.set_defaults(func=_dev)
    ask = sub.add_parser("ask", help="pay a bot with a token and print its answer and change")
    ask.add_argument("question")
    ask.add_argument("--token", help="a cashuB/cashuA token to pay with ('-': read stdin)")
    ask.add_argument("--url", default="http://127.0.0.1:8080", help="the bot's HTTP URL")
    ask.add_argument("--model", help="a model the bot sells (default: the bot's default)")
    ask.add_argument("--max-tokens", type=int, help="cap the answer further (HTTP)")
    ask.add_argument("--nostr", action="store_true", help="ask by NIP-17 DM instead of HTTP")
    ask.add_argument("--to", help="the bot's npub (with --nostr)")
    ask.add_argument("--relay", action="append", help="relay URL (with --nostr; repeatable)")
    ask.add_argument("--nsec", help="send from this key (default: a new throw-away key)")
    ask.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    ask.set_defaults(func=_ask)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
