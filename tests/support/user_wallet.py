"""The test user's own Cashu wallet: nutshell's ``Wallet``, independent of ``mint_client``.

It plays the customer: funds itself at a FakeWallet mint, sends exact tokens (V4
``cashuB`` or V3 ``cashuA``), also P2PK-locked ones (NUT-11, with DLEQ per NUT-12),
checks their state and receives change. It is slow (a new
HTTP client per call, ~90 ms CPU per swap) and not safe for concurrent use, so every
operation of one ``UserWallet`` runs under a lock.

nutshell is imported only through :func:`nutshell`, which keeps its import side effects
(``.env`` files loaded into ``os.environ``, ``sys.tracebacklimit = 0``, loguru handlers
replaced, settings read from our environment) out of the test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

TokenState = Literal["unspent", "spent", "pending", "mixed"]

_KEEP_ENV = ("PATH", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
# Outputs per mint request in send_tokens (the mint allows 1000 by default).
_MAX_OUTPUTS = 500


class UserWalletError(Exception):
    """The user's wallet could not do what the test asked."""


class TokenAlreadySpent(UserWalletError):
    """The mint says the token's proofs are already spent (NUT-03 code 11001)."""


def _to_current_stderr(message: Any) -> None:
    """A loguru sink that looks up sys.stderr each time (pytest swaps it per test)."""
    sys.stderr.write(str(message))


@functools.cache
def nutshell() -> SimpleNamespace:
    """nutshell's wallet modules, imported once with their side effects contained.

    The import runs from an empty directory with an empty HOME and a minimal environment
    (so no ``.env`` and none of our variables configure it); afterwards ``os.environ``,
    ``sys.tracebacklimit`` and the working directory are put back, loguru gets one quiet
    stderr handler, and the settings this wallet depends on are pinned to safe values.
    """
    env = dict(os.environ)
    had_limit = hasattr(sys, "tracebacklimit")
    limit: int = getattr(sys, "tracebacklimit", 1000)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="nutshell-import-") as empty:
        try:
            os.environ.clear()
            os.environ.update({k: env[k] for k in _KEEP_ENV if k in env}, HOME=empty)
            os.chdir(empty)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                from cashu.core import base, secret, split
                from cashu.core.settings import settings
                from cashu.wallet import wallet
                from loguru import logger
        finally:
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            if had_limit:
                sys.tracebacklimit = limit
            elif hasattr(sys, "tracebacklimit"):
                del sys.tracebacklimit

    logger.remove()
    logger.add(_to_current_stderr, level="WARNING")
    # Settings may have been read before (another import of cashu.core.settings): pin
    # what the wallet's HTTP and crypto depend on.
    settings.debug = False  # True would turn off TLS checks and timeouts
    settings.tor = False
    settings.socks_host = None
    settings.socks_proxy = None
    settings.http_proxy = None
    settings.wallet_use_deprecated_h2c = False
    settings.wallet_unit = "sat"
    settings.proofs_batch_size = 200
    settings.wallet_target_amount_count = 3
    return SimpleNamespace(
        Wallet=wallet.Wallet,
        TokenV3=base.TokenV3,
        TokenV3Token=base.TokenV3Token,
        TokenV4=base.TokenV4,
        ProofSpentState=base.ProofSpentState,
        amount_split=split.amount_split,
        Tags=secret.Tags,
        settings=settings,
    )


def decode_token(token: str) -> Any:
    """A ``cashuA``/``cashuB`` string as nutshell's TokenV3/TokenV4 (V4 keeps short ids)."""
    ns = nutshell()
    token = token.strip()
    if token.startswith("cashuA"):
        return ns.TokenV3.deserialize(token)
    if token.startswith("cashuB"):
        return ns.TokenV4.deserialize(token)
    raise ValueError(f"not a cashuA/cashuB token: {token[:12]}...")


def token_amount(token: str) -> int:
    """The face value of a token in its unit."""
    amount: int = decode_token(token).amount
    return amount


def _is_spent_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "11001" in text or "already spent" in text


class UserWallet:
    """A customer's wallet at one mint (nutshell ``Wallet``, SQLite in ``data_dir``)."""

    def __init__(self, wallet: Any, mint_url: str, data_dir: Path) -> None:
        self._wallet = wallet
        self.mint_url: str = wallet.url
        self.data_dir = data_dir
        self._lock = asyncio.Lock()

    @classmethod
    async def create(cls, mint_url: str, data_dir: Path) -> UserWallet:
        """Open (or create) the wallet database in ``data_dir`` and load the mint's keysets."""
        ns = nutshell()
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        wallet = await ns.Wallet.with_db(url=mint_url, db=str(data_dir), name="wallet")
        await wallet.load_mint()  # swallows errors: check that it really loaded
        if not getattr(wallet, "keyset_id", None):
            raise UserWalletError(f"could not load keysets of {mint_url}")
        await wallet.load_proofs(reload=True)
        return cls(wallet, mint_url, data_dir)

    @property
    def nutshell_wallet(self) -> Any:
        """The underlying nutshell ``Wallet`` (not safe for concurrent use)."""
        return self._wallet

    @property
    def keyset_id(self) -> str:
        """The active keyset id this wallet mints and swaps into (full id)."""
        keyset_id: str = self._wallet.keyset_id
        return keyset_id

    @property
    def input_fee_ppk(self) -> int:
        """The active keyset's input fee, as the wallet learned it from ``/v1/keysets``."""
        fee: int = self._wallet.keysets[self._wallet.keyset_id].input_fee_ppk
        return fee

    async def lock_pubkey(self) -> str:
        """This wallet's own P2PK public key (NUT-11): 33-byte compressed point, hex.

        nutshell derives it (path ``m/129372'/0'/0'/0'``) from the wallet's mnemonic,
        which is generated per database, so every ``UserWallet`` has its own key.
        :meth:`receive` signs inputs locked to it (as ``data``, in ``pubkeys`` or in
        ``refund``).
        """
        async with self._lock:
            pubkey: str = await self._wallet.create_p2pk_pubkey()
            return pubkey

    async def close(self) -> None:
        """Close the wallet's database pool and its last HTTP client."""
        async with self._lock:
            client = getattr(self._wallet, "httpx", None)
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
            await self._wallet.db.engine.dispose()

    # --- money in -----------------------------------------------------------------------

    async def _mint_paid(self, amount_sat: int, split: list[int] | None) -> list[Any]:
        """Mint quote + mint (NUT-04); FakeWallet invoices count as paid."""
        quote = await self._wallet.request_mint(amount_sat)
        deadline = time.monotonic() + 15
        while True:
            try:
                proofs: list[Any] = await self._wallet.mint(
                    amount_sat, quote_id=quote.quote, split=split
                )
                return proofs
            except Exception as exc:
                if "paid" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def fund(self, amount_sat: int, split: list[int] | None = None) -> None:
        """Add ``amount_sat`` of fresh ecash to the wallet (mint quote + mint).

        ``split`` picks the proof denominations (powers of two summing to the amount),
        e.g. ``[1024]`` so that any smaller send needs a swap.
        """
        async with self._lock:
            await self._mint_paid(amount_sat, split)

    async def balance(self) -> int:
        """Spendable sats: proofs in the wallet, minus those handed out in sent tokens."""
        async with self._lock:
            await self._wallet.load_proofs(reload=True)
            return sum(p.amount for p in self._wallet.proofs if not p.reserved)

    # --- money out ----------------------------------------------------------------------

    async def _exact_proofs(self, amount_sat: int) -> list[Any]:
        """Proofs worth exactly ``amount_sat``, swapping (and paying the fee) if needed."""
        w = self._wallet
        await w.load_proofs(reload=True)
        available = w.active_proofs(w.proofs)
        if sum(p.amount for p in available) < amount_sat:
            raise UserWalletError(
                f"balance too low: want {amount_sat}, have {sum(p.amount for p in available)}"
            )
        chosen: list[Any] = w.coinselect(available, amount_sat)
        if sum(p.amount for p in chosen) != amount_sat:
            _, chosen = await w.swap_to_send(available, amount_sat, include_fees=False)
        if sum(p.amount for p in chosen) != amount_sat:
            raise UserWalletError(f"could not make exactly {amount_sat} sat")
        await w.set_reserved_for_send(chosen, reserved=True)
        return chosen

    async def _encode(self, proofs: list[Any], version: Literal[3, 4], include_dleq: bool) -> str:
        ns = nutshell()
        if include_dleq and not all(p.dleq for p in proofs):
            raise UserWalletError("some proofs carry no DLEQ proof")
        if version == 4:
            token: str = await self._wallet.serialize_proofs(
                proofs, include_dleq=include_dleq, legacy=False
            )
            return token
        if version == 3:
            v3 = ns.TokenV3(token=[ns.TokenV3Token(mint=self.mint_url, proofs=proofs)], _unit="sat")
            token = v3.serialize(include_dleq=include_dleq)
            return token
        raise ValueError(f"token version must be 3 or 4, not {version!r}")

    async def send_token(
        self, amount_sat: int, version: Literal[3, 4] = 4, include_dleq: bool = True
    ) -> str:
        """A token worth exactly ``amount_sat`` (the wallet pays any swap fee itself)."""
        if amount_sat <= 0:
            raise ValueError("amount must be positive")
        async with self._lock:
            proofs = await self._exact_proofs(amount_sat)
            return await self._encode(proofs, version, include_dleq)

    async def send_tokens(
        self,
        amount_sat: int,
        n: int,
        version: Literal[3, 4] = 4,
        include_dleq: bool = True,
    ) -> list[str]:
        """``n`` distinct tokens of exactly ``amount_sat`` each, made fast.

        The ecash is minted fresh, already split into the tokens' denominations (one mint
        request per up to 500 outputs, no swap, no fee); the wallet's balance is untouched.
        """
        if amount_sat <= 0 or n <= 0:
            raise ValueError("amount and n must be positive")
        ns = nutshell()
        per_token: list[int] = ns.amount_split(amount_sat)
        per_request = max(1, _MAX_OUTPUTS // len(per_token))
        tokens: list[str] = []
        async with self._lock:
            while len(tokens) < n:
                k = min(per_request, n - len(tokens))
                proofs = await self._mint_paid(amount_sat * k, per_token * k)
                if [p.amount for p in proofs] != per_token * k:
                    raise UserWalletError("mint returned proofs in an unexpected order")
                await self._wallet.set_reserved_for_send(proofs, reserved=True)
                size = len(per_token)
                for i in range(k):
                    chunk = proofs[i * size : (i + 1) * size]
                    tokens.append(await self._encode(chunk, version, include_dleq))
        return tokens

    async def send_locked(
        self,
        amount_sat: int,
        pubkey: str,
        *,
        locktime_s: int | None = None,
        refund_pubkeys: Sequence[str] = (),
        include_dleq: bool = True,
        sig_all: bool = False,
        n_sigs: int = 1,
        extra_pubkeys: Sequence[str] = (),
        version: Literal[3, 4] = 4,
    ) -> str:
        """A token worth exactly ``amount_sat`` whose proofs are P2PK-locked to ``pubkey``.

        The wallet swaps (paying any fee itself) into outputs whose secrets are NUT-11
        ``["P2PK", {"data": pubkey, "nonce": ..., "tags": [...]}]``, one fresh nonce per
        proof, made by nutshell's ``create_p2pk_lock``. Tags, in nutshell's order:
        ``pubkeys`` (``extra_pubkeys``, if any), ``refund`` (if any), ``locktime`` (unix
        time ``locktime_s`` from now; zero or negative gives a locktime already passed),
        ``sigflag`` (always, ``SIG_INPUTS`` or ``SIG_ALL``), ``n_sigs`` (only if > 1).
        """
        if amount_sat <= 0:
            raise ValueError("amount must be positive")
        if n_sigs < 1:
            raise ValueError("n_sigs must be at least 1")
        ns = nutshell()
        tags = ns.Tags()
        if extra_pubkeys:
            tags["pubkeys"] = list(extra_pubkeys)
        if refund_pubkeys:
            tags["refund"] = list(refund_pubkeys)
        nutshell_locktime: int | None = None
        if locktime_s is not None and locktime_s > 0:
            nutshell_locktime = locktime_s
        elif locktime_s is not None:  # nutshell ignores 0; same place in the tags
            tags["locktime"] = str(int(time.time()) + locktime_s)
        w = self._wallet
        async with self._lock:
            secret_lock = await w.create_p2pk_lock(
                pubkey,
                locktime_seconds=nutshell_locktime,
                tags=tags,
                sig_all=sig_all,
                n_sigs=n_sigs,
            )
            await w.load_proofs(reload=True)
            available = w.active_proofs(w.proofs)
            if sum(p.amount for p in available) < amount_sat:
                raise UserWalletError(
                    f"balance too low: want {amount_sat}, have {sum(p.amount for p in available)}"
                )
            # Always a swap (the outputs carry the lock); include_fees=False: the send
            # side is exactly amount_sat, the swap fee comes out of the kept change.
            _, locked = await w.swap_to_send(
                available, amount_sat, secret_lock=secret_lock, include_fees=False
            )
            # nutshell stored the locked proofs as ours: reserve them at once so that no
            # later send picks them as inputs.
            await w.set_reserved_for_send(locked, reserved=True)
            if sum(p.amount for p in locked) != amount_sat:
                raise UserWalletError(f"could not make exactly {amount_sat} sat")
            return await self._encode(locked, version, include_dleq)

    # --- state and receive --------------------------------------------------------------

    async def token_state(self, token: str) -> TokenState:
        """NUT-07 state of the token's proofs: unspent, spent, pending, or mixed."""
        ns = nutshell()
        proofs = decode_token(token).proofs
        async with self._lock:
            response = await self._wallet.check_proof_state(proofs)
        states = {s.state for s in response.states}
        if len(response.states) != len(proofs):
            raise UserWalletError("mint answered checkstate for the wrong number of proofs")
        if len(states) != 1:
            return "mixed"
        names: dict[Any, TokenState] = {
            ns.ProofSpentState.unspent: "unspent",
            ns.ProofSpentState.spent: "spent",
            ns.ProofSpentState.pending: "pending",
        }
        return names[states.pop()]

    async def receive(self, token: str) -> int:
        """Swap a token into this wallet; the sats received after the mint's fee.

        P2PK-locked proofs are signed with this wallet's key when it is the lock's
        ``data``, in its ``pubkeys`` or in its ``refund`` tag (nutshell signs each input
        for SIG_INPUTS, or the first input over inputs + outputs for SIG_ALL, which needs
        all inputs' secrets equal but for the nonce); the mint decides whether that is
        enough: before the locktime only the lock keys count, after it the refund keys
        too. Proofs not locked to this wallet go unsigned and the mint refuses the swap.

        Raises TokenAlreadySpent if the mint says the proofs are spent.
        """
        decoded = decode_token(token)
        mint = decoded.mint.rstrip("/")
        if mint != self.mint_url.rstrip("/"):
            raise UserWalletError(f"token is from {mint}, this wallet uses {self.mint_url}")
        proofs = decoded.proofs
        w = self._wallet
        async with self._lock:
            if any(p.id not in w.keysets and len(p.id) != 16 for p in proofs):
                await w.load_mint_keysets()
            await w._expand_short_keyset_ids(proofs)  # V4 carries 16-hex short ids
            try:
                kept, _ = await w.redeem(proofs)
            except Exception as exc:
                if _is_spent_error(exc):
                    raise TokenAlreadySpent(str(exc)) from exc
                raise
        return sum(p.amount for p in kept)
