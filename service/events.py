"""Push, never poll: one pub/sub subscription per process, fanned out to local waiters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterator

import redis.asyncio as aioredis
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
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            on_connect()
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None and message["type"] == "message":
                    on_message(message["data"])
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            log.warning("lost the %s subscription (%s); resubscribing", channel, exc)
            await asyncio.sleep(0.2)  # back off before reconnecting to a Redis that is down
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py


class Watch(asyncio.Event):
    """Set on every change of one job; ``state`` is the newest state seen, or None when
    it is unknown (the subscription was lost and came back). ``record`` is the finished
    record when the newest change ended the job and the event carried it."""

    def __init__(self) -> None:
        super().__init__()
        self.state: str | None = None
        self.record: dict[str, str] | None = None


class EventHub:
    """Wakes whoever waits on a job when that job's state changes."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._waiters: dict[str, set[Watch]] = {}
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(
            listen(self._redis, keys.EVENTS, self._on_message, self._on_connect)
        )
        await self._connected.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

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
        if not self._waiters:
            return  # the common case under load: nobody waits, so skip the parse
        change = json.loads(data)
        for event in self._waiters.get(change.get("id"), ()):
            event.state = change.get("state")
            event.record = change.get("job")
            event.set()

    def _on_connect(self) -> None:
        self._connected.set()
        for waiters in self._waiters.values():
            for event in waiters:
                event.state = None  # changes may have been missed: read the record
                event.record = None
                event.set()
