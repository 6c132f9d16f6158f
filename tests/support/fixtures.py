"""pytest fixtures: session mints (fee 0 and 100 ppk), own mints, user wallets, emulators.

Use them with ``from tests.support.fixtures import *`` in a conftest or test module.
Every mint started here is stopped at teardown, also when a test fails; mints that
survive anyway (a hard exit of pytest) are killed at interpreter exit, and on Linux die
with the test process.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import pytest
import pytest_asyncio

from bot.llm.emulator import Emulator, start_emulator
from tests.support.mint import MintProcess
from tests.support.user_wallet import UserWallet

__all__ = [
    "MintFactory",
    "UserWalletFactory",
    "emulator",
    "emulator_url",
    "fee_mint",
    "mint",
    "mint_factory",
    "session_user_wallet",
    "user_wallet",
]


class MintFactory(Protocol):
    """Start a mint of one's own: ``await mint_factory(input_fee_ppk=0)``."""

    async def __call__(self, input_fee_ppk: int = 0) -> MintProcess: ...


class UserWalletFactory(Protocol):
    """A new, empty user wallet at a mint: ``await user_wallet(mint)``."""

    async def __call__(self, mint: MintProcess | str) -> UserWallet: ...


@contextlib.asynccontextmanager
async def _started_mint(data_dir: Path, input_fee_ppk: int) -> AsyncIterator[MintProcess]:
    process = MintProcess(data_dir, input_fee_ppk=input_fee_ppk)
    try:
        await process.start()
        yield process
    finally:
        await process.stop()


@pytest.fixture(scope="session")
async def mint(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MintProcess]:
    """A nutshell FakeWallet mint without fees, shared by the whole session."""
    async with _started_mint(tmp_path_factory.mktemp("mint"), 0) as process:
        yield process


@pytest.fixture(scope="session")
async def fee_mint(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MintProcess]:
    """A nutshell FakeWallet mint charging input_fee_ppk=100, shared by the session."""
    async with _started_mint(tmp_path_factory.mktemp("fee-mint"), 100) as process:
        yield process


@pytest.fixture
async def mint_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[MintFactory]:
    """Mints of the test's own (to kill, restart...), all stopped at teardown."""
    started: list[MintProcess] = []

    async def factory(input_fee_ppk: int = 0) -> MintProcess:
        process = MintProcess(tmp_path_factory.mktemp("own-mint"), input_fee_ppk=input_fee_ppk)
        started.append(process)
        await process.start()
        return process

    try:
        yield factory
    finally:
        for process in started:
            await process.stop()


@contextlib.asynccontextmanager
async def _wallets(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[UserWalletFactory]:
    opened: list[UserWallet] = []

    async def factory(mint: MintProcess | str) -> UserWallet:
        url = mint.url if isinstance(mint, MintProcess) else mint
        wallet = await UserWallet.create(url, tmp_path_factory.mktemp("user-wallet"))
        opened.append(wallet)
        return wallet

    try:
        yield factory
    finally:
        for wallet in opened:
            await wallet.close()


@pytest.fixture
async def user_wallet(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[UserWalletFactory]:
    """Factory of fresh user wallets for one test: ``w = await user_wallet(mint)``."""
    async with _wallets(tmp_path_factory) as factory:
        yield factory


@pytest.fixture(scope="session")
async def session_user_wallet(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[UserWalletFactory]:
    """Like ``user_wallet``, but the wallets live (and are closed) with the session."""
    async with _wallets(tmp_path_factory) as factory:
        yield factory


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def emulator() -> AsyncIterator[tuple[Emulator, str]]:
    """The Gemini emulator at its default pace, shared by the session: (it, its URL)."""
    emu = Emulator()
    running = await start_emulator(emu)
    try:
        yield emu, running.url
    finally:
        await running.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def emulator_url() -> AsyncIterator[str]:
    """The URL of a Gemini emulator that answers at once (no first-token or chunk delay)."""
    running = await start_emulator(Emulator(ttft_ms=0, chunk_delay_ms=0))
    try:
        yield running.url
    finally:
        await running.stop()
