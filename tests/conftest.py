"""Shared fixtures: real nutshell mints and Nostr relays (see tests/support)."""

from tests.support.fixtures import *  # noqa: F403
from tests.support.relays import (  # noqa: F401
    independent_relay,
    independent_relay_factory,
    local_relay,
    local_relay_factory,
)
