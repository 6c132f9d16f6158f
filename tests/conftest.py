"""Shared fixtures: real nutshell mints (see tests/support)."""

from tests.support.fixtures import *  # noqa: F403
