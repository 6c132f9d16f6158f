"""The outbox keeps replies until a relay takes them, in order, and expires them late."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.outbox import Outbox

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_unsent_replies_survive_a_restart_in_order(tmp_path: Path) -> None:
    now = [1000.0]
    box = Outbox(tmp_path, clock=lambda: now[0])
    await box.open()
    await box.add("a", "{}", "alice", carries_change=False, ttl_s=60)
    await box.add("b", "{}", "alice", carries_change=True, ttl_s=600)
    await box.add("c", "{}", "bob", carries_change=False, ttl_s=60)
    await box.mark_sent("c")
    await box.mark_attempt("a")
    await box.close()

    box = Outbox(tmp_path, clock=lambda: now[0])
    await box.open()
    unsent = await box.unsent()
    assert [e.event_id for e in unsent] == ["a", "b"]
    assert unsent[0].attempts == 1 and unsent[1].carries_change
    now[0] += 120  # "a" ran out of time, "b" (change) has not
    expired = await box.expire()
    assert [e.event_id for e in expired] == ["a"]
    assert [e.event_id for e in await box.unsent()] == ["b"]
    await box.close()
