"""``ecashbot wallet``: the operator's money. Balance, a token out, a Lightning withdrawal.

Works on the bot's wallet under ``wallet.path`` (it may run while the bot does: every
transfer sets its ecash aside in one transaction, so the two never spend the same proof)::

    ecashbot wallet balance
    ecashbot wallet send 500
    ecashbot wallet receive cashuB...    # fund the stock change is made from
    ecashbot wallet withdraw --invoice lnbc...
    ecashbot wallet withdraw --lnaddress you@wallet.example --amount 5000
    ecashbot wallet history
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TextIO

# the wallet's modules load when a wallet command runs, not with every `ecashbot` command
if TYPE_CHECKING:
    import aiohttp

    from bot.config import Config
    from mint_client.lnwallet import LightningWallet
    from mint_client.store import TransferRecord

#: exit status of a payment still in flight at the mint (recovery finishes it)
EXIT_PENDING = 3


@contextlib.asynccontextmanager
async def open_wallet(cfg: Config) -> AsyncIterator[tuple[LightningWallet, aiohttp.ClientSession]]:
    """The bot's wallet and one HTTP session, for one command."""
    import aiohttp

    from mint_client.lnwallet import LightningWallet
    from mint_client.protocol import MintRegistry
    from mint_client.store import ProofStore
    from mint_client.wallet import load_or_create_seed

    store = ProofStore(cfg.wallet.path)
    await store.open()
    try:
        async with aiohttp.ClientSession() as session:
            mints = MintRegistry(session, cfg.mints, timeout_s=cfg.wallet.mint_timeout_s)
            yield (
                LightningWallet(
                    store,
                    mints,
                    load_or_create_seed(cfg.wallet.path),
                    cfg.unit,
                    stock_sat=cfg.locked.stock_sat,
                ),
                session,
            )
    finally:
        await store.close()


def describe(rec: TransferRecord) -> str:
    """One transfer in words, every sat accounted for."""
    what = "token" if rec.kind == "send" else "Lightning payment"
    lines = [
        f"{what} {rec.id}: {rec.status}",
        f"  amount         {rec.amount_sat} sat",
        f"  fees           {rec.fee_sat} sat (mint input fee {rec.input_fee_sat}"
        + (f", Lightning {rec.lightning_fee_sat or 0}" if rec.kind == "melt" else "")
        + ")",
        f"  change kept    {rec.change_sat or 0} sat",
        f"  from           {rec.mint} ({rec.input_sat} sat of ecash)",
    ]
    if rec.destination:
        lines.append(f"  to             {rec.destination[:120]}")
    if rec.preimage:
        lines.append(f"  preimage       {rec.preimage}")
    return "\n".join(lines)


async def balance(cfg: Config, out: TextIO) -> int:
    """Free, reserved and pending sat by mint and keyset."""
    from mint_client.errors import MintError

    async with open_wallet(cfg) as (wallet, _):
        with contextlib.suppress(MintError):
            await wallet.recover_transfers(min_age_s=60)
        rows = await wallet.balances()
    width = max([len(r.mint) for r in rows] + [len("total")])
    out.write(
        f"{'mint'.ljust(width)}  {'keyset':18}  {'free':>10}  {'reserved':>10}  {'pending':>10}\n"
    )
    for r in rows:
        out.write(
            f"{r.mint.ljust(width)}  {r.keyset_id[:18]:18}  {r.free_sat:>10}  "
            f"{r.reserved_sat:>10}  {r.pending_sat:>10}\n"
        )
    out.write(
        f"{'total'.ljust(width)}  {'':18}  {sum(r.free_sat for r in rows):>10}  "
        f"{sum(r.reserved_sat for r in rows):>10}  {sum(r.pending_sat for r in rows):>10}\n"
    )
    return 0


async def send(cfg: Config, amount_sat: int, mint: str | None, out: TextIO, err: TextIO) -> int:
    """Print a cashuB token of ``amount_sat`` from the free balance."""
    from mint_client.errors import MeltPending, MintError, WalletError

    async with open_wallet(cfg) as (wallet, _):
        try:
            rec = await wallet.send_token(amount_sat, mint=mint)
        except (WalletError, MintError) as exc:
            err.write(f"ecashbot wallet send: {exc}\n")
            return EXIT_PENDING if isinstance(exc, MeltPending) else 1
    err.write(describe(rec) + "\n")
    out.write(f"{rec.token}\n")
    return 0


async def receive(cfg: Config, token: str, out: TextIO, err: TextIO) -> int:
    """Take a token in as the bot's own money (the stock locked payments' change comes from)."""
    from mint_client.errors import MintError, PaymentError
    from mint_client.tokens import parse_token

    async with open_wallet(cfg) as (wallet, _):
        try:
            rec = await wallet.receive(parse_token(token.strip()))
        except (PaymentError, MintError) as exc:
            err.write(f"ecashbot wallet receive: {exc}\n")
            return 1
    out.write(
        f"received {rec.paid_sat} sat at {rec.mint} (mint fee {rec.fee_sat} sat): "
        f"{rec.paid_sat - rec.fee_sat} sat held\n"
    )
    return 0


async def withdraw(
    cfg: Config,
    *,
    invoice: str | None,
    lnaddress: str | None,
    amount_sat: int | None,
    mint: str | None,
    max_fee_sat: int | None,
    out: TextIO,
    err: TextIO,
) -> int:
    """Pay a bolt11 invoice, or ``amount_sat`` to a Lightning address, by a melt."""
    from bot.lnurl import fetch_invoice
    from mint_client.errors import MeltPending, MintError, WalletError

    async with open_wallet(cfg) as (wallet, session):
        try:
            if lnaddress:
                assert amount_sat is not None
                invoice = await fetch_invoice(
                    session, lnaddress, amount_sat * 1000, timeout_s=cfg.wallet.mint_timeout_s
                )
            assert invoice is not None
            rec = await wallet.pay_invoice(
                invoice,
                mint=mint,
                max_fee_sat=max_fee_sat,
                destination=f"{lnaddress} {invoice}" if lnaddress else invoice,
            )
        except (WalletError, MintError) as exc:
            err.write(f"ecashbot wallet withdraw: {exc}\n")
            return EXIT_PENDING if isinstance(exc, MeltPending) else 1
    out.write(describe(rec) + "\n")
    return 0


async def history(cfg: Config, out: TextIO) -> int:
    """Every transfer out, oldest first (a sent token can be read again here)."""
    async with open_wallet(cfg) as (wallet, _):
        transfers = await wallet.store.all_transfers()
    for rec in transfers:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(rec.created_at))
        out.write(f"{when} UTC  {describe(rec)}\n")
        if rec.token:
            out.write(f"  token          {rec.token}\n")
    if not transfers:
        out.write("no transfers yet\n")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """The ``wallet`` subcommand and its own subcommands."""
    wallet = sub.add_parser("wallet", help="the bot's money: balance, send a token, withdraw")
    wallet.add_argument("--config", help="path of config.yaml (default: ./config.yaml)")
    cmds = wallet.add_subparsers(dest="wallet_command", required=True)
    cmds.add_parser("balance", help="free, reserved and pending sat by mint and keyset")
    s = cmds.add_parser("send", help="print a cashuB token from the free balance")
    s.add_argument("amount", type=int, help="sat")
    s.add_argument("--mint", help="take it from this mint (default: the one holding most)")
    r = cmds.add_parser("receive", help="take a cashu token in (funds the change stock)")
    r.add_argument("token", help="a cashuA/cashuB token from a trusted mint")
    w = cmds.add_parser("withdraw", help="pay a Lightning invoice or address (NUT-05 melt)")
    to = w.add_mutually_exclusive_group(required=True)
    to.add_argument("--invoice", help="a bolt11 invoice with an amount")
    to.add_argument("--lnaddress", help="a Lightning address, name@host (with --amount)")
    w.add_argument("--amount", type=int, help="sat to send to --lnaddress")
    w.add_argument("--mint", help="pay from this mint (default: the one holding most)")
    w.add_argument("--max-fee", type=int, help="refuse a Lightning fee reserve above this, sat")
    cmds.add_parser("history", help="every transfer out, with the tokens sent")
    return wallet


async def run(cfg: Config, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run the ``wallet`` subcommand in ``args``."""
    cmd = args.wallet_command
    if cmd == "balance":
        return await balance(cfg, out)
    if cmd == "send":
        if args.amount <= 0:
            err.write("ecashbot wallet send: the amount must be positive\n")
            return 2
        return await send(cfg, args.amount, args.mint, out, err)
    if cmd == "receive":
        return await receive(cfg, args.token, out, err)
    if cmd == "withdraw":
        if args.lnaddress and (args.amount is None or args.amount <= 0):
            err.write("ecashbot wallet withdraw: --lnaddress needs --amount (sat, positive)\n")
            return 2
        return await withdraw(
            cfg,
            invoice=args.invoice,
            lnaddress=args.lnaddress,
            amount_sat=args.amount,
            mint=args.mint,
            max_fee_sat=args.max_fee,
            out=out,
            err=err,
        )
    return await history(cfg, out)
