"""Push, never poll: one pub/sub subscription per process, fanned out to local waiters,
and to live views (``GET /v1/events``, the dashboard) while any is open."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import keys

log = logging.getLogger("corefleet.events")


async def listen(
    redis: aioredis.Redis,
    channel: str,
    on_message: Callable[[str], None],
    on_connect: Callable[[], None] = lambda: None,
) -> None:
    """Call ``on_message`` for each message on ``channel``, forever, across Redis restarts.

    ``on_connect`` runs after each (re)subscription: messages published while the
    connection was down are lost, so callers re-check whatever they were waiting for.
    """
    while True:
        pubsub = _Subscription(redis, on_connect)
        try:
            await pubsub.subscribe(channel)
            on_connect()
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None and message["type"] == "message":
                    try:
                        on_message(message["data"])
                    except Exception:  # one odd message (another program's) must not end it
                        log.exception("cannot handle a message on %s", channel)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            log.warning("lost the %s subscription (%s); resubscribing", channel, exc)
            await asyncio.sleep(0.2)  # back off before reconnecting to a Redis that is down
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py


class _Subscription(PubSub):
    """A pub/sub connection that also says when redis-py made it again on its own.

    After a dropped connection (a Redis restart, a killed client) redis-py reconnects and
    subscribes again inside the next read, without raising: the messages published in
    between are lost all the same, so ``on_reconnect`` runs then too.
    """

    def __init__(self, redis: aioredis.Redis, on_reconnect: Callable[[], None]) -> None:
        super().__init__(
            redis.connection_pool,
            ignore_subscribe_messages=True,
            event_dispatcher=redis._event_dispatcher,  # as ``Redis.pubsub`` passes it
        )
        self._on_reconnect = on_reconnect

    async def on_connect(self, connection: Any) -> None:
        await super().on_connect(connection)
        self._on_reconnect()


#: What a live view is told of each change.
_NEWS = ("id", "state", "from", "progress")


class Watch(asyncio.Event):
    """Set on every change of one job; ``state`` is the newest state seen, or None when
    it is unknown (the subscription was lost and came back). ``record`` is the finished
    record when the newest change ended the job and the event carried it."""

    def __init__(self) -> None:
        super().__init__()
        self.state: str | None = None
        self.record: dict[str, str] | None = None


class Feed:
    """Every job's changes, for one live view, as ``{"id", "state", "from"?, "progress"?}``.

    It holds at most ``MAX_PENDING`` changes the view has not taken yet. Past that, or when
    the subscription was lost for a while, the changes are dropped and ``missed`` is set:
    the view reads the jobs again instead.
    """

    MAX_PENDING = 10_000

    def __init__(self) -> None:
        self.pending: deque[dict[str, Any]] = deque()
        self.missed = False
        self.ready = asyncio.Event()  # set once new jobs are announced to it too
        self.wake = asyncio.Event()

    def put(self, change: dict[str, Any]) -> None:
        if len(self.pending) >= self.MAX_PENDING:
            self.lose()
            return
        self.pending.append(change)
        self.wake.set()

    def lose(self) -> None:
        self.pending.clear()
        self.missed = True
        self.wake.set()


class EventHub:
    """Wakes whoever waits on a job when that job's state changes."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._waiters: dict[str, set[Watch]] = {}
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._feeds: set[Feed] = set()
        # New jobs are announced on a channel of their own, listened to only while a feed
        # is open: otherwise every submit would wake every gateway.
        self._announcements: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(
            listen(self._redis, keys.EVENTS, self._on_message, self._on_connect)
        )
        await self._connected.wait()

    async def close(self) -> None:
        for task in (self._task, self._announcements):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    @contextlib.asynccontextmanager
    async def feed(self) -> AsyncIterator[Feed]:
        """Every change of every job from now on, new jobs included (see ``Feed``)."""
        feed = Feed()
        self._feeds.add(feed)
        if self._announcements is None or self._announcements.done():
            self._announcements = asyncio.create_task(
                listen(self._redis, keys.SUBMITTED, self._on_announcement, self._on_announcing)
            )
        elif any(other.ready.is_set() for other in self._feeds):
            feed.ready.set()
        try:
            yield feed
        finally:
            self._feeds.discard(feed)
            if not self._feeds and self._announcements is not None:
                # Forgotten before the await: a feed opened meanwhile starts its own.
                announcements, self._announcements = self._announcements, None
                announcements.cancel()
                await asyncio.wait([announcements])

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[Watch]:
        """An event set on every change of ``job_id``; register before reading the record."""
        event = Watch()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]

    def _on_message(self, data: str) -> None:
        if not self._waiters and not self._feeds:
            return  # the common case under load: nobody waits, so skip the parse
        change = json.loads(data)
        for event in self._waiters.get(change.get("id"), ()):
            event.state = change.get("state")
            event.record = change.get("job")
            event.set()
        if self._feeds:
            # Views get the change without the finished record (they read what they show).
            news = {name: change[name] for name in _NEWS if name in change}
            for feed in self._feeds:
                feed.put(news)

    def _on_announcement(self, data: str) -> None:
        message = json.loads(data)
        for job_id in message.get("ids", ()):
            for feed in self._feeds:
                feed.put({"id": job_id, "state": message.get("state", "queued")})

    def _on_announcing(self) -> None:
        for feed in self._feeds:
            if feed.ready.is_set():
                feed.lose()  # a resubscription: announcements were missed meanwhile
            else:
                feed.ready.set()

    def _on_connect(self) -> None:
        self._connected.set()
        for feed in self._feeds:
            feed.lose()
        for waiters in self._waiters.values():
            for event in waiters:
                event.state = None  # changes may have been missed: read the record
                event.record = None
                event.set()
