"""Automatic payouts: what is free above ``payout.threshold_sat`` goes to ``payout.lnaddress``.

Every ``payout.interval_s``, for each mint: when its free balance is above the threshold,
all but ``payout.float_sat`` is paid out by Lightning (NUT-05 melt), fees included. The
invoice comes from the Lightning address (LUD-16) for the payout's amount; when the melt
quote's fee reserve and the input fee would eat into the float, the payout is made
smaller by that much and a new invoice fetched. One payout per mint per pass.
"""

from __future__ import annotations

import asyncio
import logging
import math

import aiohttp

from bot.config import PayoutConfig
from bot.lnurl import LnurlError, fetch_invoice
from mint_client.errors import InsufficientFunds, MintError, WalletError
from mint_client.lnwallet import LightningWallet
from mint_client.store import TransferRecord

log = logging.getLogger("ecashbot.payout")

#: invoices fetched for one payout before giving up this pass (each one smaller)
MAX_ROUNDS = 4
#: the fee reserve limit never goes below this (mints reserve a minimum fee), sat
MIN_FEE_LIMIT_SAT = 10


def fee_limit_sat(cfg: PayoutConfig, amount_sat: int) -> int:
    """The largest Lightning fee reserve accepted for a payout of ``amount_sat``."""
    return max(math.ceil(amount_sat * cfg.max_fee_percent / 100), MIN_FEE_LIMIT_SAT)


async def payout_once(
    cfg: PayoutConfig,
    wallet: LightningWallet,
    session: aiohttp.ClientSession,
    *,
    timeout_s: float = 20.0,
) -> list[TransferRecord]:
    """One pass over the mints; returns the payouts made."""
    if not cfg.lnaddress:
        return []
    made: list[TransferRecord] = []
    for mint in wallet.mints.urls:
        free = await wallet.free_sat(mint)
        if free <= cfg.threshold_sat:
            continue
        amount = free - cfg.float_sat
        for _ in range(MAX_ROUNDS):
            try:
                invoice = await fetch_invoice(
                    session,
                    cfg.lnaddress,
                    amount * 1000,
                    comment="ecashbot payout",
                    timeout_s=timeout_s,
                )
                rec = await wallet.pay_invoice(
                    invoice,
                    mint=mint,
                    max_fee_sat=fee_limit_sat(cfg, amount),
                    keep_sat=cfg.float_sat,
                    destination=f"{cfg.lnaddress} {invoice}",
                )
            except InsufficientFunds as exc:
                amount -= max(exc.need_sat - exc.have_sat, 1)
                if amount <= 0:
                    break
                continue
            except (LnurlError, WalletError, MintError) as exc:
                log.warning("payout from %s to %s failed: %s", mint, cfg.lnaddress, exc)
                break
            made.append(rec)
            log.info(
                "payout of %d sat from %s to %s; fees %d sat, %d sat stay free",
                rec.amount_sat,
                mint,
                cfg.lnaddress,
                rec.fee_sat,
                await wallet.free_sat(mint),
            )
            break
    return made


async def payout_loop(
    cfg: PayoutConfig, wallet: LightningWallet, session: aiohttp.ClientSession
) -> None:
    """Pay out on a schedule until cancelled."""
    while True:
        await asyncio.sleep(cfg.interval_s)
        try:
            await payout_once(cfg, wallet, session)
        except Exception:
            log.exception("payout pass failed; trying again in %s s", cfg.interval_s)
