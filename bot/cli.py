"""The ``ecashbot`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from bot.config import ConfigError, load_config


def _serve(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(Path(args.config) if args.config else _default_config())
    except ConfigError as exc:
        print(f"ecashbot: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
    keys = sub.add_parser("keys", help="print a new Nostr key pair for the bot")
    keys.set_defaults(func=_keys)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
