"""The Nostr test kit works: relays, users, DMs both ways, dedupe, forgeries, restarts.

Two people (alice, bob) talk through nostr-sdk's in-process relay and through an
independent relay (PyPI ``nostr-relay`` in a subprocess), as the bot's users will.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nostr_sdk import Keys, NostrSdkError, UnwrappedGift, nip59_make_gift_wrap

from tests.support.nostr_user import (
    NostrUser,
    PublishError,
    ReceivedDM,
    make_forged_gift_wrap,
    make_gift_wrap,
)
from tests.support.relays import (
    IndependentRelayFactory,
    LocalRelay,
    LocalRelayFactory,
    NostrRelayProcess,
)

pytestmark = pytest.mark.timeout(120)  # the first run builds nostr-relay's venv

_LINE = "line {:05d}: the quick brown fox jumps over the lazy dog\n"  # 60 characters
# A gift wrap is ~2.2x its text: 25 KB -> ~55 KB, 30 KB -> ~66 KB (over 64 KiB).
TEXT_25K = "".join(_LINE.format(i) for i in range(417))
TEXT_30K = "".join(_LINE.format(i) for i in range(500))


@pytest.fixture(params=["local", "independent"])
def relay_url(request: pytest.FixtureRequest) -> str:
    """The url of each kind of relay in turn (both shared by the session)."""
    relay: LocalRelay | NostrRelayProcess = request.getfixturevalue(f"{request.param}_relay")
    return relay.url


@pytest.fixture
async def pair(relay_url: str) -> AsyncIterator[tuple[NostrUser, NostrUser]]:
    """alice and bob on one relay."""
    alice = await NostrUser.create([relay_url])
    bob = await NostrUser.create([relay_url])
    try:
        yield alice, bob
    finally:
        await alice.close()
        await bob.close()


async def test_dms_both_ways_in_both_schemes(pair: tuple[NostrUser, NostrUser]) -> None:
    alice, bob = pair

    sent = await alice.send_nip17(bob.pubkey, "hi bob, NIP-17 here", extra_tags=[["subject", "t"]])
    dm = await bob.next_dm(timeout_s=10)
    assert (dm.text, dm.scheme, dm.sender_pubkey) == ("hi bob, NIP-17 here", "nip17", alice.pubkey)
    assert dm.event_id == sent.event_id  # the rumor id, not the wrap's
    assert dm.wrapper_id == sent.event.id().to_hex() != dm.event_id
    assert ("subject", "t") in dm.tags and ("p", bob.pubkey) in dm.tags

    await bob.send_nip04(alice.pubkey, "hi alice, NIP-04 here")
    dm = await alice.next_dm(timeout_s=10)
    assert (dm.text, dm.scheme, dm.sender_pubkey) == ("hi alice, NIP-04 here", "nip04", bob.pubkey)

    await bob.send_nip17(alice.pubkey, TEXT_25K)
    dm = await alice.next_dm(timeout_s=10)
    assert dm.text == TEXT_25K and dm.scheme == "nip17"
    assert alice.rejected == [] and bob.rejected == []


async def test_event_size_limits(
    local_relay: LocalRelay, independent_relay: NostrRelayProcess
) -> None:
    """nostr-relay is configured for 256 KiB; nostr-sdk's relay stops at 64 KiB."""
    alice = await NostrUser.create([local_relay.url, independent_relay.url])
    bob = await NostrUser.create([independent_relay.url])
    try:
        sent = await alice.send_nip17(bob.pubkey, TEXT_30K, [independent_relay.url])
        assert len(sent.event.as_json()) > 65536
        dm = await bob.next_dm(timeout_s=10)
        assert dm.text == TEXT_30K

        with pytest.raises(PublishError) as refused:
            await alice.send_nip17(bob.pubkey, TEXT_30K, [local_relay.url])
        (reason,) = refused.value.failed.values()
        assert reason.startswith("blocked: event size (")
        assert reason.endswith("exceeds maximum allowed size (65536 bytes)")
    finally:
        await alice.close()
        await bob.close()


async def test_one_dm_on_two_relays_arrives_once(
    local_relay: LocalRelay, independent_relay: NostrRelayProcess
) -> None:
    urls = [local_relay.url, independent_relay.url]
    alice = await NostrUser.create(urls)
    bob = await NostrUser.create(urls)
    try:
        # The same wrap on both relays (the SDK itself drops the second copy)...
        await alice.send_nip17(bob.pubkey, "one wrap, two relays")
        # ...and the same rumor in two different wraps, one per relay (only the rumor
        # id tells they are one DM).
        rumor, wrap_1 = make_gift_wrap(alice.keys, bob.pubkey, "one rumor, two wraps")
        wrap_2 = nip59_make_gift_wrap(alice.keys, bob.public_key, rumor)
        assert wrap_1.id() != wrap_2.id()
        await alice.publish_raw(wrap_1, [local_relay.url])
        await alice.publish_raw(wrap_2, [independent_relay.url])
        await alice.send_nip04(bob.pubkey, "end")

        dms = await bob.dms_until(lambda dm: dm.text == "end", timeout_s=10)
        texts = [dm.text for dm in dms]
        assert texts.count("one wrap, two relays") == 1
        assert texts.count("one rumor, two wraps") == 1
        # Whatever came late from the slower relay was deduplicated too.
        late = bob.drain()
        assert [dm.text for dm in late] == []
    finally:
        await alice.close()
        await bob.close()


async def test_forged_seal_is_refused(relay_url: str) -> None:
    alice, bob, mallory = Keys.generate(), Keys.generate(), Keys.generate()
    bob_user = await NostrUser.create([relay_url], keys=bob)
    try:
        # Control: the hand-made wrap is right when the seal's signer wrote the rumor.
        honest = make_forged_gift_wrap(mallory, mallory.public_key(), bob.public_key(), "hi")
        gift = UnwrappedGift.from_gift_wrap(bob, honest)
        assert gift.sender().to_hex() == mallory.public_key().to_hex()
        assert gift.rumor().content() == "hi"

        # Mallory seals a rumor that claims to be alice's.
        forged = make_forged_gift_wrap(mallory, alice.public_key(), bob.public_key(), "pay me")
        # nostr-sdk 0.45.1 decrypts both layers, then compares seal and rumor authors.
        with pytest.raises(NostrSdkError.Generic, match="sender mismatch"):
            UnwrappedGift.from_gift_wrap(bob, forged)

        # Through a relay: the user drops it and records why; later DMs still come.
        mallory_user = await NostrUser.create([relay_url], keys=mallory)
        try:
            await mallory_user.publish_raw(forged)
            await mallory_user.send_nip17(bob.public_key().to_hex(), "end")
            dms = await bob_user.dms_until(lambda dm: dm.text == "end", timeout_s=10)
        finally:
            await mallory_user.close()
        assert [dm.text for dm in dms] == ["end"]
        assert [r.event_id for r in bob_user.rejected] == [forged.id().to_hex()]
        assert bob_user.rejected[0].error == "Generic: 'sender mismatch'"
    finally:
        await bob_user.close()


async def test_independent_relay_restart_keeps_events_and_users_reconnect(
    independent_relay_factory: IndependentRelayFactory,
) -> None:
    relay = await independent_relay_factory()
    alice = await NostrUser.create([relay.url])
    bob = await NostrUser.create([relay.url])
    try:
        await alice.send_nip17(bob.pubkey, "before the restart")
        assert (await bob.next_dm(timeout_s=10)).text == "before the restart"

        port = relay.port
        await relay.restart()
        assert relay.port == port

        # The SDK reconnects by itself (retry interval 1 s here) and re-sends the REQ.
        await alice.wait_connected(timeout_s=15)
        await alice.send_nip17(bob.pubkey, "after the restart")
        dm = await bob.next_dm(timeout_s=15)
        assert dm.text == "after the restart"

        # The database survived: a newcomer with bob's key reads both DMs.
        # Stored wraps come newest wrap-timestamp first, and those are random (NIP-59).
        wanted = {"before the restart", "after the restart"}
        seen: set[str] = set()

        def got_both(dm: ReceivedDM) -> bool:
            seen.add(dm.text)
            return wanted <= seen

        bob_again = await NostrUser.create([relay.url], keys=bob.keys)
        try:
            await bob_again.dms_until(got_both, timeout_s=10)
            assert seen == wanted
        finally:
            await bob_again.close()
    finally:
        await alice.close()
        await bob.close()


async def test_local_relay_restart_on_same_port(local_relay_factory: LocalRelayFactory) -> None:
    relay = await local_relay_factory(persistent=True)
    alice = await NostrUser.create([relay.url])
    bob = await NostrUser.create([relay.url])
    try:
        port = relay.port
        await relay.restart()
        assert relay.port == port
        await alice.wait_connected(timeout_s=15)
        await alice.send_nip04(bob.pubkey, "after the restart")
        assert (await bob.next_dm(timeout_s=15)).text == "after the restart"
    finally:
        await alice.close()
        await bob.close()


async def test_auth_required_relays(
    local_relay_factory: LocalRelayFactory,
    independent_relay_factory: IndependentRelayFactory,
) -> None:
    """Users who answer AUTH can talk on relays that demand it; others can't publish."""
    strict_local = await local_relay_factory(auth="both", auth_dm=True)
    strict_independent = await independent_relay_factory(auth_required=True)
    for url in (strict_local.url, strict_independent.url):
        alice = await NostrUser.create([url])
        bob = await NostrUser.create([url])
        try:
            await alice.send_nip17(bob.pubkey, f"authenticated on {url}")
            assert (await bob.next_dm(timeout_s=10)).text == f"authenticated on {url}"
            await bob.send_nip04(alice.pubkey, "and back")
            assert (await alice.next_dm(timeout_s=10)).text == "and back"
        finally:
            await alice.close()
            await bob.close()

    anonymous = await NostrUser.create([strict_local.url], authenticate=False)
    try:
        with pytest.raises(PublishError, match="auth-required"):
            await anonymous.send_nip04(Keys.generate().public_key().to_hex(), "hello?")
    finally:
        await anonymous.close()
