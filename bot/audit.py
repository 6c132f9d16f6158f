"""``ecashbot audit``: does every sat that came in add up, to the sat?

Reads the payment record and the proof store, and asks the mints (NUT-07) whether the
proofs the bot holds are really unspent. It checks:

* per payment: paid = charged + change + mint fee; the proofs it brought in add up to
  what it paid (less the fee, when swapped; all of it, when locked to the bot); the
  proofs issued to it (its own, or from the stock) add up to its change;
* overall: received = kept + change issued + mint fees (+ what is still being resolved);
* the wallet against the record: what it holds (held, locked, reserved as stock, set
  aside) + what went out = kept + the fees locked payments paid ahead of their sweep;
  issued proofs = sum of change;
* every held or locked proof is unspent at its mint;
* transfers out (tokens sent, Lightning payments): inputs = amount + fees + change, and
  what the wallet holds = kept - everything paid out and its fees;
* every change token is delivered, picked up again, or pending.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from bot.config import Config
from mint_client.errors import MintError
from mint_client.protocol import MintRegistry
from mint_client.store import ProofStore, StoredProof


@dataclass
class AuditReport:
    """The audit's figures (sat) and every difference it found."""

    payments: int = 0
    failed: int = 0
    received_sat: int = 0
    kept_sat: int = 0
    change_sat: int = 0
    fee_sat: int = 0
    in_flight_sat: int = 0
    held_sat: int = 0
    issued_sat: int = 0
    reserved_sat: int = 0
    held_unspent_sat: int = 0
    change_delivered: int = 0
    change_picked_up: int = 0
    change_pending: int = 0
    #: of ``received_sat``: paid by Lightning invoice (NUT-04 quotes minted)
    minted_in_sat: int = 0
    transfers: int = 0
    #: out by Lightning (NUT-05 melts), as tokens, and the fees of both (done transfers)
    paid_out_sat: int = 0
    sent_out_sat: int = 0
    out_fee_sat: int = 0
    #: change that came back from transfers out (it is held again)
    out_change_sat: int = 0
    #: proofs set aside for transfers out still in flight
    spending_sat: int = 0
    #: proofs locked to the bot, taken with no mint call and not swapped yet
    locked_sat: int = 0
    #: of ``received_sat``: paid with tokens locked to the bot
    locked_in_sat: int = 0
    #: mint fees locked payments paid, which their sweeps pay (or paid) at the mint
    locked_fee_sat: int = 0
    #: batch swaps of locked proofs (done)
    sweeps: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def difference_sat(self) -> int:
        """received - (kept + change + fees + in flight): zero when the books balance."""
        return self.received_sat - (
            self.kept_sat + self.change_sat + self.fee_sat + self.in_flight_sat
        )

    @property
    def ok(self) -> bool:
        """True when nothing is off."""
        return self.difference_sat == 0 and not self.problems

    def table(self) -> str:
        """A plain-text table for the terminal."""
        rows = [
            ("payments (redeemed)", self.payments),
            ("payments refused by the mint (token kept by payer)", self.failed),
            ("received", self.received_sat),
            ("  kept (charged)", self.kept_sat),
            ("  change and refunds issued", self.change_sat),
            ("  mint fees", self.fee_sat),
            ("  still being resolved", self.in_flight_sat),
            ("  (of received: paid by Lightning invoice)", self.minted_in_sat),
            ("  (of received: paid locked to the bot)", self.locked_in_sat),
            ("difference", self.difference_sat),
            ("transfers out", self.transfers),
            ("  paid out by Lightning", self.paid_out_sat),
            ("  sent as tokens", self.sent_out_sat),
            ("  their fees (mint and Lightning)", self.out_fee_sat),
            ("  their change, kept", self.out_change_sat),
            ("sweeps of locked proofs (fees among the above)", self.sweeps),
            ("wallet: held proofs", self.held_sat),
            ("wallet: held or locked, and unspent at the mint", self.held_unspent_sat),
            ("wallet: issued as change", self.issued_sat),
            ("wallet: reserved for payments in flight", self.reserved_sat),
            ("wallet: set aside for transfers out in flight", self.spending_sat),
            ("wallet: locked to the bot, not swapped yet", self.locked_sat),
            ("change tokens delivered", self.change_delivered),
            ("change tokens picked up again", self.change_picked_up),
            ("change tokens pending delivery", self.change_pending),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"{name.ljust(width)}  {value:>12}" for name, value in rows]
        lines.append("")
        lines += [f"PROBLEM: {p}" for p in self.problems] or ["OK: the books balance."]
        return "\n".join(lines)


async def audit(cfg: Config) -> AuditReport:
    """Audit the wallet under ``cfg.wallet.path`` against its record and its mints."""
    store = ProofStore(cfg.wallet.path)
    await store.open()
    try:
        async with aiohttp.ClientSession() as session:
            mints = MintRegistry(session, cfg.mints, timeout_s=cfg.wallet.mint_timeout_s)
            return await _audit(store, mints)
    finally:
        await store.close()


async def _audit(store: ProofStore, mints: MintRegistry) -> AuditReport:
    r = AuditReport()
    proofs = await store.all_proofs()
    by_payment: dict[str | None, Counter[str]] = {}
    #: what each payment was given: its change (issued), stock reserved for it
    given: dict[str | None, Counter[str]] = {}
    for sp in proofs:
        by_payment.setdefault(sp.payment_id, Counter())[sp.state] += sp.proof.amount
        if sp.state in ("issued", "reserved"):
            given.setdefault(sp.given_to, Counter())[sp.state] += sp.proof.amount
    in_flight: set[str] = set()
    for rec in await store.all_payments():
        if rec.status == "failed":
            r.failed += 1
            continue
        r.payments += 1
        r.received_sat += rec.paid_sat
        r.fee_sat += rec.fee_sat
        if rec.token_hash.startswith("quote:"):
            r.minted_in_sat += rec.paid_sat
        if rec.locked:
            r.locked_in_sat += rec.paid_sat
        states = by_payment.get(rec.id, Counter())
        if rec.status in ("redeeming", "redeemed"):
            r.in_flight_sat += rec.paid_sat - rec.fee_sat
            in_flight.add(rec.id)
            continue
        if rec.locked:
            r.locked_fee_sat += rec.fee_sat
        charged, change = rec.charged_sat or 0, rec.change_sat or 0
        r.kept_sat += charged
        r.change_sat += change
        if rec.paid_sat != charged + change + rec.fee_sat:
            r.problems.append(
                f"payment {rec.id}: paid {rec.paid_sat} != charged {charged} + change "
                f"{change} + fee {rec.fee_sat}"
            )
        # the proofs it brought in (kept since, swept, spent, or given as change to any
        # payment), and the proofs given to it as change (its own, or from the stock)
        brought = sum(states.values())
        expected = rec.paid_sat if rec.locked else rec.paid_sat - rec.fee_sat
        got = given.get(rec.id, Counter())
        if brought != expected or got["issued"] != change or got["reserved"]:
            r.problems.append(
                f"payment {rec.id}: proofs brought in {brought} (expected {expected}) / "
                f"issued to it {got['issued']} / reserved for it {got['reserved']} do not "
                f"match charged {charged} / change {change}"
            )
        if rec.change_token:
            if rec.pickups:
                r.change_picked_up += 1
            if rec.delivered_at is not None:
                r.change_delivered += 1
            elif not rec.pickups:
                r.change_pending += 1
    r.held_sat = sum(sp.proof.amount for sp in proofs if sp.state == "held")
    r.issued_sat = sum(sp.proof.amount for sp in proofs if sp.state == "issued")
    r.reserved_sat = sum(sp.proof.amount for sp in proofs if sp.state == "reserved")
    r.spending_sat = sum(sp.proof.amount for sp in proofs if sp.state == "spending")
    r.locked_sat = sum(sp.proof.amount for sp in proofs if sp.state == "locked")
    await _audit_transfers(store, proofs, r)
    out = r.paid_out_sat + r.sent_out_sat + r.out_fee_sat
    # what the wallet owns, less what payments still in flight brought in
    owned = sum(
        sp.proof.amount
        for sp in proofs
        if sp.state in ("held", "spending", "locked", "reserved") and sp.payment_id not in in_flight
    )
    if owned + out != r.kept_sat + r.locked_fee_sat:
        r.problems.append(
            f"wallet owns {owned} sat (held {r.held_sat}, set aside {r.spending_sat}, locked "
            f"{r.locked_sat}) but the record kept {r.kept_sat} (+ {r.locked_fee_sat} sat of "
            f"fees locked payments paid ahead) and paid out {out} (fees included)"
        )
    if r.issued_sat != r.change_sat:
        r.problems.append(f"wallet issued {r.issued_sat} sat but the record {r.change_sat}")
    held = [sp for sp in proofs if sp.state in ("held", "locked")]
    for mint in sorted({sp.mint for sp in held}):
        mine = [sp for sp in held if sp.mint == mint]
        try:
            at_mint = await mints.api(mint).check_state(sp.proof.Y() for sp in mine)
        except MintError as exc:
            r.problems.append(f"mint {mint} could not be asked: {exc.message}")
            continue
        for sp in mine:
            state = at_mint.get(sp.proof.Y(), "unknown")
            if state == "UNSPENT":
                r.held_unspent_sat += sp.proof.amount
            else:
                r.problems.append(
                    f"{sp.state} proof {sp.proof.Y()[:16]} ({sp.proof.amount} sat) is {state} "
                    f"at {mint}"
                )
    return r


async def _audit_transfers(store: ProofStore, proofs: list[StoredProof], r: AuditReport) -> None:
    """Every transfer out adds up, and its proofs agree with it."""
    inputs: Counter[str] = Counter()
    back: Counter[str] = Counter()
    for sp in proofs:
        if sp.spent_by is not None and sp.payment_id != sp.spent_by:
            inputs[sp.spent_by] += sp.proof.amount
        if sp.payment_id is not None and sp.payment_id != sp.spent_by:
            back[sp.payment_id] += sp.proof.amount
    for t in await store.all_transfers():
        if t.status == "failed":
            if inputs[t.id]:
                r.problems.append(f"transfer {t.id}: failed but still holds {inputs[t.id]} sat")
            continue
        if t.kind == "sweep":
            r.sweeps += t.status == "done"
        else:
            r.transfers += 1
        if inputs[t.id] != t.input_sat:
            r.problems.append(
                f"transfer {t.id}: its inputs are {inputs[t.id]} sat, the record says {t.input_sat}"
            )
        if t.status != "done":
            continue
        change = t.change_sat or 0
        if t.input_sat != t.amount_sat + t.fee_sat + change:
            r.problems.append(
                f"transfer {t.id}: inputs {t.input_sat} != amount {t.amount_sat} + fees "
                f"{t.fee_sat} + change {change}"
            )
        if back[t.id] != change:
            r.problems.append(
                f"transfer {t.id}: {back[t.id]} sat came back, the record says {change}"
            )
        if t.kind == "melt":
            r.paid_out_sat += t.amount_sat
        else:
            r.sent_out_sat += t.amount_sat
        r.out_fee_sat += t.fee_sat
        r.out_change_sat += change
