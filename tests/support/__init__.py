"""Test support: a real nutshell mint in a subprocess, a user's wallet, free ports.

Fixtures live in ``tests.support.fixtures``; import them into a conftest to use them.
"""

from tests.support.mint import MintProcess, MintStartError
from tests.support.ports import free_port, port_is_listening, wait_http
from tests.support.user_wallet import TokenAlreadySpent, UserWallet, UserWalletError

__all__ = [
    "MintProcess",
    "MintStartError",
    "TokenAlreadySpent",
    "UserWallet",
    "UserWalletError",
    "free_port",
    "port_is_listening",
    "wait_http",
]
