"""Shared fixtures: real nutshell mints and Nostr relays, and the check that no log line
holds a Cashu token or an nsec (see tests/support)."""

from tests.support.fixtures import *  # noqa: F403

# every test fails if a log line (in-process, or a bot process's bot.log) holds a token
from tests.support.log_check import no_secrets_in_logs, secret_catcher  # noqa: F401
from tests.support.relays import (  # noqa: F401
    independent_relay,
    independent_relay_factory,
    local_relay,
    local_relay_factory,
)
