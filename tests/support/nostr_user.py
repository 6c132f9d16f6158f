"""A Nostr user for tests, as a person with Amethyst or 0xchat would be, on nostr-sdk.

It sends NIP-17 (gift-wrapped) and NIP-04 DMs, reads the DMs sent to it from its relays
(deduplicated by rumor id, since one DM often arrives from several relays), and can
publish crafted events, e.g. a forged gift wrap made by :func:`make_forged_gift_wrap`.

    alice = await NostrUser.create([relay.url])
    await alice.send_nip17(bot_pubkey_hex, "What is ecash?")
    answer = await alice.next_dm(timeout_s=10)
    await alice.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from nostr_sdk import (
    Client,
    ClientBuilder,
    ClientNotification,
    ClientNotificationStream,
    Event,
    EventBuilder,
    Filter,
    Keys,
    Kind,
    Metadata,
    MetadataRecord,
    Nip44Version,
    PublicKey,
    RelayOptions,
    RelayStatus,
    RelayUrl,
    ReqTarget,
    SendEventOutput,
    SendEventTarget,
    SignerAuthenticator,
    Tag,
    Timestamp,
    UnsignedEvent,
    UnwrappedGift,
    nip44_encrypt,
    nip59_make_gift_wrap,
    uniffi_set_event_loop,
)

__all__ = [
    "DMTimeoutError",
    "NostrUser",
    "PublishError",
    "ReceivedDM",
    "RejectedEvent",
    "SentDM",
    "make_forged_gift_wrap",
    "make_gift_wrap",
]

log = logging.getLogger(__name__)

KIND_NIP04_DM = 4
KIND_SEAL = 13
KIND_PRIVATE_DM = 14
KIND_GIFT_WRAP = 1059
KIND_DM_RELAYS = 10050

#: NIP-59 backdates wraps and seals by up to two days: read that far back.
DM_LOOKBACK_S = 2 * 24 * 3600
#: The SDK's default notification channel (4096) drops events silently when we stall.
NOTIFICATION_CHANNEL_SIZE = 1 << 16
#: How often the SDK retries a lost relay. Its default is 10 s, stretched by
#: adjust_retry_interval (a restarted relay is seen again after ~13 s); tests want ~1 s.
DEFAULT_RETRY_INTERVAL_S = 1.0

Scheme = Literal["nip17", "nip04"]


@dataclass(frozen=True)
class ReceivedDM:
    """A DM as the user's app would show it."""

    text: str
    scheme: Scheme
    #: hex pubkey of the author (for NIP-17: the seal's signer, checked against the rumor)
    sender_pubkey: str
    #: hex id of the rumor (NIP-17) or of the kind 4 event (NIP-04): the DM's identity
    event_id: str
    #: hex id of the event that carried it (the gift wrap, or the kind 4 event itself)
    wrapper_id: str = ""
    #: the first relay it came from
    relay_url: str = ""
    #: the DM's tags (of the rumor for NIP-17), e.g. ``[["p", "..."], ["subject", "..."]]``
    tags: tuple[tuple[str, ...], ...] = ()
    #: the DM's own created_at (the rumor's for NIP-17: not backdated)
    created_at: int = 0


@dataclass(frozen=True)
class RejectedEvent:
    """An incoming DM event the user could not read (bad seal, wrong key, bad payload)."""

    event_id: str
    kind: int
    relay_url: str
    error: str


@dataclass(frozen=True)
class SentDM:
    """What :meth:`NostrUser.send_nip17` / :meth:`NostrUser.send_nip04` published."""

    #: the DM's identity, as the receiver sees it in ``ReceivedDM.event_id``
    event_id: str
    #: the published event (the gift wrap, or the kind 4 event)
    event: Event
    output: SendEventOutput


class PublishError(RuntimeError):
    """No relay accepted the event; ``failed`` maps relay url -> the relay's reason."""

    def __init__(self, event_id: str, failed: dict[str, str]) -> None:
        super().__init__(f"event {event_id} accepted by no relay: {failed}")
        self.event_id = event_id
        self.failed = failed


class DMTimeoutError(TimeoutError):
    """The awaited DM did not come in time; ``dms`` holds what came meanwhile."""

    def __init__(self, message: str, dms: list[ReceivedDM]) -> None:
        super().__init__(message)
        self.dms = dms


def _hex(pubkey: str | PublicKey) -> PublicKey:
    return pubkey if isinstance(pubkey, PublicKey) else PublicKey.parse(pubkey)


def _tags(raw: Iterable[Sequence[str]] | None) -> list[Tag]:
    return [Tag.parse(list(t)) for t in raw or ()]


def _random_past(max_s: int = DM_LOOKBACK_S) -> Timestamp:
    """A NIP-59 timestamp: now minus a random amount up to ``max_s`` (never future)."""
    return Timestamp.from_secs(Timestamp.now().as_secs() - random.randint(0, max_s))


def make_gift_wrap(
    sender: Keys,
    receiver: str | PublicKey,
    text: str,
    extra_tags: Iterable[Sequence[str]] | None = None,
) -> tuple[UnsignedEvent, Event]:
    """A NIP-17 DM: kind 14 rumor -> seal -> gift wrap, as ``nip17_make_private_msg`` does.

    Built from its parts so the caller learns the rumor (its id is the DM's identity).
    """
    receiver_pk = _hex(receiver)
    rumor = (
        EventBuilder(Kind(KIND_PRIVATE_DM), text)
        .tags([Tag.public_key(receiver_pk), *_tags(extra_tags)])
        .finalize_unsigned(sender.public_key())
    )
    rumor = rumor.ensure_id()
    return rumor, nip59_make_gift_wrap(sender, receiver_pk, rumor)


def make_forged_gift_wrap(
    seal_signer: Keys,
    claimed_author: str | PublicKey,
    receiver: str | PublicKey,
    text: str,
    extra_tags: Iterable[Sequence[str]] | None = None,
) -> Event:
    """A gift wrap whose seal is signed by ``seal_signer`` but whose rumor claims
    ``claimed_author``: someone impersonating another user (NIP-17 forbids it: the
    seal's pubkey must equal the rumor's). Built by hand, layer by layer, per NIP-59.

    With ``claimed_author == seal_signer``'s own pubkey it is an honest gift wrap.
    """
    receiver_pk = _hex(receiver)
    rumor = (
        EventBuilder(Kind(KIND_PRIVATE_DM), text)
        .tags([Tag.public_key(receiver_pk), *_tags(extra_tags)])
        .finalize_unsigned(_hex(claimed_author))
    )
    rumor = rumor.ensure_id()
    # Seal (kind 13): the rumor encrypted from the signer to the receiver, no tags.
    seal_content = nip44_encrypt(
        seal_signer.secret_key(), receiver_pk, rumor.as_json(), Nip44Version.V2
    )
    seal = (
        EventBuilder(Kind(KIND_SEAL), seal_content)
        .custom_created_at(_random_past())
        .finalize(seal_signer)
    )
    # Gift wrap (kind 1059): the seal encrypted by a one-time key, "p"-tagged to the receiver.
    one_time = Keys.generate()
    wrap_content = nip44_encrypt(
        one_time.secret_key(), receiver_pk, seal.as_json(), Nip44Version.V2
    )
    return (
        EventBuilder(Kind(KIND_GIFT_WRAP), wrap_content)
        .tags([Tag.public_key(receiver_pk)])
        .custom_created_at(_random_past())
        .finalize(one_time)
    )


class NostrUser:
    """A person on Nostr with a DM app: one key, some relays, an inbox.

    Build it with :meth:`create`. It answers NIP-42 AUTH challenges with its key (as
    Amethyst and 0xchat do): the SDK authenticates and re-sends a REQ or EVENT that a
    relay refused with ``auth-required:``. The SDK also reconnects lost relays by itself
    (every ``retry_interval_s``) and re-sends the inbox subscription.
    """

    def __init__(
        self,
        keys: Keys,
        client: Client,
        notifications: ClientNotificationStream,
        relay_urls: list[str],
        since: Timestamp,
        retry_interval: timedelta = timedelta(seconds=DEFAULT_RETRY_INTERVAL_S),
    ) -> None:
        self.keys = keys
        self.client = client
        self.relay_urls = list(relay_urls)
        self.since = since
        self.sub_id = f"inbox-{self.pubkey[:12]}"
        #: every DM received (deduplicated), in arrival order
        self.received: list[ReceivedDM] = []
        #: incoming DM events that could not be read (forged seal, garbage...)
        self.rejected: list[RejectedEvent] = []
        #: raw relay messages other than events (NOTICE, CLOSED, AUTH, OK...), as JSON
        self.relay_messages: list[tuple[str, str]] = []
        self._notifications = notifications
        self._queue: asyncio.Queue[ReceivedDM] = asyncio.Queue()
        self._seen: set[str] = set()
        self._retry_interval = retry_interval
        self._pump: asyncio.Task[None] | None = None
        self._closed = False

    # --- construction -------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        relay_urls: list[str],
        keys: Keys | None = None,
        *,
        authenticate: bool = True,
        retry_interval_s: float = DEFAULT_RETRY_INTERVAL_S,
        connect_timeout_s: float = 5.0,
        lookback_s: int = DM_LOOKBACK_S,
    ) -> NostrUser:
        """Connect to ``relay_urls`` and subscribe to the inbox (kinds 1059 and 4, ``#p``).

        ``authenticate=False`` makes a client that ignores AUTH challenges.
        """
        # Rust calls back into Python futures on this loop (Python-side signers, etc.).
        uniffi_set_event_loop(asyncio.get_running_loop())
        keys = keys or Keys.generate()
        builder = ClientBuilder().notification_channel_size(NOTIFICATION_CHANNEL_SIZE)
        if authenticate:
            builder = builder.authenticator(SignerAuthenticator(keys))
        client = builder.build()
        since = Timestamp.from_secs(Timestamp.now().as_secs() - lookback_s)
        # Take the stream before subscribing: it only carries what comes after.
        retry = timedelta(seconds=retry_interval_s)
        user = cls(keys, client, client.notifications(), relay_urls, since, retry)
        for url in relay_urls:
            await user._add_relay(url)
        await client.connect(timedelta(seconds=connect_timeout_s))
        user._pump = asyncio.create_task(user._run_pump(), name=f"nostr-user-{user.pubkey[:8]}")
        await client.subscribe(ReqTarget.auto(user.inbox_filters()), id=user.sub_id)
        return user

    async def _add_relay(self, url: str) -> None:
        opts = RelayOptions().retry_interval(self._retry_interval).adjust_retry_interval(False)
        await self.client.add_relay(RelayUrl.parse(url), opts=opts)

    async def _ensure_relays(self, urls: Sequence[str]) -> None:
        """Add (and connect) relays the user does not have yet, e.g. a bot's DM relays."""
        known = {str(u) for u in await self.client.relays(all=True)}
        new = [u for u in urls if str(RelayUrl.parse(u)) not in known]
        for url in new:
            await self._add_relay(url)
            await self.client.connect_relay(RelayUrl.parse(url))
        if new:
            await self.client.connect(timedelta(seconds=5))

    async def wait_connected(
        self, urls: Sequence[str] | None = None, timeout_s: float = 15.0
    ) -> None:
        """Wait until the SDK is connected to ``urls`` (default: all the user's relays),
        e.g. after a relay restart: events sent while disconnected fail."""
        wanted = {str(RelayUrl.parse(u)) for u in (urls if urls is not None else self.relay_urls)}
        deadline = time.monotonic() + timeout_s
        while True:
            relays = await self.client.relays(all=True)
            down = {
                str(url)
                for url, relay in relays.items()
                if str(url) in wanted and relay.status() != RelayStatus.CONNECTED
            }
            if not down and wanted <= {str(url) for url in relays}:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not connected within {timeout_s} s: {sorted(down)}")
            await asyncio.sleep(0.05)

    # --- identity -----------------------------------------------------------------------

    @property
    def public_key(self) -> PublicKey:
        """The user's public key."""
        return self.keys.public_key()

    @property
    def pubkey(self) -> str:
        """The user's public key, hex."""
        return str(self.keys.public_key().to_hex())

    @property
    def npub(self) -> str:
        """The user's public key, bech32 ``npub1...``."""
        return str(self.keys.public_key().to_bech32())

    def inbox_filters(self) -> list[Filter]:
        """Gift wraps and kind 4 DMs addressed to the user, from ``since`` on."""
        me = self.public_key
        return [
            Filter().kind(Kind(KIND_GIFT_WRAP)).pubkey(me).since(self.since),
            Filter().kind(Kind(KIND_NIP04_DM)).pubkey(me).since(self.since),
        ]

    # --- sending ------------------------------------------------------------------------

    async def send_nip17(
        self,
        to_pubkey: str | PublicKey,
        text: str,
        relays: Sequence[str] | None = None,
        *,
        extra_tags: Iterable[Sequence[str]] | None = None,
    ) -> SentDM:
        """Send a NIP-17 DM (gift-wrapped kind 14) to the user's relays or ``relays``."""
        rumor, wrap = make_gift_wrap(self.keys, to_pubkey, text, extra_tags)
        output = await self.publish_raw(wrap, relays)
        return SentDM(event_id=rumor.id().to_hex(), event=wrap, output=output)

    async def send_nip04(
        self,
        to_pubkey: str | PublicKey,
        text: str,
        relays: Sequence[str] | None = None,
        *,
        extra_tags: Iterable[Sequence[str]] | None = None,
    ) -> SentDM:
        """Send a NIP-04 DM (kind 4, ``p``-tagged) to the user's relays or ``relays``."""
        receiver = _hex(to_pubkey)
        content = self.keys.nip04_encrypt(receiver, text)
        event = (
            EventBuilder(Kind(KIND_NIP04_DM), content)
            .tags([Tag.public_key(receiver), *_tags(extra_tags)])
            .finalize(self.keys)
        )
        output = await self.publish_raw(event, relays)
        return SentDM(event_id=event.id().to_hex(), event=event, output=output)

    async def publish_raw(
        self, event: Event, relays: Sequence[str] | None = None, *, require_ok: bool = True
    ) -> SendEventOutput:
        """Publish a ready event (crafted, forged, replayed) to ``relays`` (default: the
        user's). Raises :class:`PublishError` if no relay accepted it, unless told not to.
        """
        targets = list(relays) if relays is not None else self.relay_urls
        await self._ensure_relays(targets)
        output = await self.client.send_event(
            event, SendEventTarget.to([RelayUrl.parse(u) for u in targets])
        )
        if require_ok and not output.success:
            failed = {str(url): reason for url, reason in output.failed.items()}
            raise PublishError(event.id().to_hex(), failed)
        return output

    async def publish_profile(self, name: str, about: str | None = None) -> Event:
        """Publish a kind 0 profile."""
        record = MetadataRecord(name=name, display_name=name, about=about)
        event = Metadata.from_record(record).finalize(self.keys)
        await self.publish_raw(event)
        return event

    async def publish_dm_relays(self, urls: Sequence[str]) -> Event:
        """Publish the NIP-17 kind 10050 list of relays where the user reads DMs."""
        tags = [Tag.parse(["relay", u]) for u in urls]
        event = EventBuilder(Kind(KIND_DM_RELAYS), "").tags(tags).finalize(self.keys)
        await self.publish_raw(event)
        return event

    # --- receiving ----------------------------------------------------------------------

    async def next_dm(self, timeout_s: float = 10.0) -> ReceivedDM:
        """The next DM not yet taken (raises :class:`DMTimeoutError` after ``timeout_s``)."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            raise DMTimeoutError(f"no DM for {self.pubkey[:12]} within {timeout_s} s", []) from None

    async def dms_until(
        self, predicate: Callable[[ReceivedDM], bool], timeout_s: float = 10.0
    ) -> list[ReceivedDM]:
        """Take DMs until one satisfies ``predicate``; return them all, that one last.

        Raises :class:`DMTimeoutError` (with ``.dms``: what came meanwhile) on timeout.
        """
        taken: list[ReceivedDM] = []
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                dm = await asyncio.wait_for(self._queue.get(), max(remaining, 0))
            except TimeoutError:
                raise DMTimeoutError(
                    f"no matching DM for {self.pubkey[:12]} within {timeout_s} s "
                    f"({len(taken)} others came)",
                    taken,
                ) from None
            taken.append(dm)
            if predicate(dm):
                return taken

    def drain(self) -> list[ReceivedDM]:
        """Take every DM waiting now, without waiting."""
        out: list[ReceivedDM] = []
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    async def _run_pump(self) -> None:
        while True:
            note = await self._notifications.next()
            if note is None or isinstance(note, ClientNotification.SHUTDOWN):
                return
            try:
                if isinstance(note, ClientNotification.NEW_EVENT):
                    self._on_event(note.event, str(note.relay_url))
                elif isinstance(note, ClientNotification.MESSAGE):
                    self._on_message(note)
            except Exception:  # a test helper must not die silently on one bad event
                log.exception("nostr user %s: notification failed", self.pubkey[:12])

    def _on_event(self, event: Event, relay_url: str) -> None:
        kind = event.kind().as_u16()
        if kind == KIND_GIFT_WRAP:
            dm = self._unwrap(event, relay_url)
        elif kind == KIND_NIP04_DM:
            dm = self._decrypt_nip04(event, relay_url)
        else:
            return
        if dm is None or dm.event_id in self._seen:
            return
        self._seen.add(dm.event_id)
        self.received.append(dm)
        self._queue.put_nowait(dm)

    def _reject(self, event: Event, relay_url: str, exc: Exception) -> None:
        self.rejected.append(
            RejectedEvent(
                event_id=event.id().to_hex(),
                kind=event.kind().as_u16(),
                relay_url=relay_url,
                error=f"{type(exc).__name__}: {exc}",
            )
        )

    def _unwrap(self, wrap: Event, relay_url: str) -> ReceivedDM | None:
        try:
            # Decrypts both layers and checks that the seal's signer wrote the rumor.
            gift = UnwrappedGift.from_gift_wrap(self.keys, wrap)
        except Exception as exc:
            self._reject(wrap, relay_url, exc)
            return None
        rumor = gift.rumor()
        if rumor.kind().as_u16() != KIND_PRIVATE_DM:
            self._reject(wrap, relay_url, ValueError(f"rumor kind {rumor.kind().as_u16()}"))
            return None
        rumor_id = rumor.id()
        return ReceivedDM(
            text=rumor.content(),
            scheme="nip17",
            sender_pubkey=gift.sender().to_hex(),
            event_id=rumor_id.to_hex() if rumor_id is not None else wrap.id().to_hex(),
            wrapper_id=wrap.id().to_hex(),
            relay_url=relay_url,
            tags=tuple(tuple(t.to_vec()) for t in rumor.tags()),
            created_at=rumor.created_at().as_secs(),
        )

    def _decrypt_nip04(self, event: Event, relay_url: str) -> ReceivedDM | None:
        try:
            text = self.keys.nip04_decrypt(event.author(), event.content())
        except Exception as exc:
            self._reject(event, relay_url, exc)
            return None
        return ReceivedDM(
            text=text,
            scheme="nip04",
            sender_pubkey=event.author().to_hex(),
            event_id=event.id().to_hex(),
            wrapper_id=event.id().to_hex(),
            relay_url=relay_url,
            tags=tuple(tuple(t.to_vec()) for t in event.tags()),
            created_at=event.created_at().as_secs(),
        )

    def _on_message(self, note: ClientNotification.MESSAGE) -> None:
        if not note.message.as_enum().is_EVENT_MSG():
            self.relay_messages.append((str(note.relay_url), note.message.as_json()))

    # --- lifecycle ----------------------------------------------------------------------

    async def close(self) -> None:
        """Disconnect and stop reading."""
        if self._closed:
            return
        self._closed = True
        await self.client.shutdown()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    async def __aenter__(self) -> NostrUser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<NostrUser {self.pubkey[:12]} relays={self.relay_urls}>"
