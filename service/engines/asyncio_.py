"""The asyncio engine: io jobs travel on Redis Streams and run on one event loop each.

A job's id is added to its queue's stream for its priority (``cf:stream:{queue}``, or
``...#high`` / ``...#low``) in the script call that stores the job. io workers read with a
consumer group, taking the highest priority first and never more than they have room for,
run up to ``concurrency`` jobs at once, and acknowledge an entry only after the runner has
stored the outcome. An entry whose consumer went silent
for ``lease_s`` is claimed by another worker and run again; live workers renew their lease
on the entries they hold, so a long job is never taken from a healthy worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import keys, presence
from service.batching import Batcher
from service.events import listen
from service.jobs import Job, JobState
from service.runner import JobRunner
from service.settings import IoWorkerSettings
from service.store import LUA_DIR, Dispatch
from tasks import PRIORITIES

log = logging.getLogger("corefleet.io")

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
_LEAVE_GROUP = (LUA_DIR / "leave_group.lua").read_text()
#: How many cancelled jobs a consumer remembers past their end (see ``_ever_cancelled``).
_CANCEL_MARKS = 10_000


class AsyncioEngine:
    """The gateway's side: queue io jobs; report the streams' depth and consumers."""

    name = "asyncio"

    def __init__(self, redis: aioredis.Redis, queues: tuple[str, ...]) -> None:
        self.redis = redis
        self.queues = queues

    async def start(self) -> None:
        for queue in self.queues:
            await ensure_group(self.redis, queue)

    def dispatch(self, job: Job) -> Dispatch:
        return Dispatch(
            "xadd", keys.stream(job.queue, job.priority), job.id, keys.streams(job.queue)
        )

    async def cancel(self, job: Job) -> None:
        # Nothing to do here: the cancel transition publishes on keys.CANCEL, and the worker
        # holding the job cancels its asyncio task.
        return None

    async def status(self) -> dict[str, Any]:
        """This gateway's io queues, and every queue a live io worker consumes (an io-worker
        started with other ``COREFLEET_IO_QUEUES``)."""
        queues: dict[str, Any] = {}
        for queue in sorted(set(self.queues) | await presence.known_queues(self.redis, "io")):
            status = await stream_status(self.redis, queue)
            if queue not in self.queues and not any(
                status[what] for what in ("workers", "waiting", "running")
            ):
                await presence.forget_queue(self.redis, "io", queue)  # empty, and nobody reads it
                continue
            queues[queue] = status
        return {"engine": self.name, "state": "local", "queues": queues}

    async def close(self) -> None:
        return None


async def ensure_group(redis: aioredis.Redis, queue: str) -> None:
    """Create the consumer group of each of the queue's streams (one per priority)."""
    for stream in keys.streams(queue):
        await create_group(redis, stream, keys.IO_GROUP)


async def leave_group(redis: aioredis.Redis, streams: list[str], group: str, consumer: str) -> None:
    """Take a stopping consumer out of ``group`` on ``streams`` where it holds no entry
    (see leave_group.lua)."""
    await redis.eval(_LEAVE_GROUP, len(streams), *streams, group, consumer)  # type: ignore[misc]


async def create_group(redis: aioredis.Redis, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` (and the stream), reading from its start; one that
    exists is left as it is."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def stream_status(redis: aioredis.Redis, queue: str) -> dict[str, Any]:
    """Jobs waiting (in all, and per priority) and running on a stream queue; its workers."""
    by_priority: dict[str, int] = {}
    running = 0
    for priority in PRIORITIES:
        stream = keys.stream(queue, priority)
        by_priority[priority] = 0
        with contextlib.suppress(ResponseError):  # a stream not made yet: none
            groups = [g for g in await redis.xinfo_groups(stream) if g["name"] == keys.IO_GROUP]
            if groups:
                running += int(groups[0]["pending"])
                by_priority[priority] = int(groups[0].get("lag") or 0)
            else:  # no worker ever read it (a queue named at submit only): all of it waits
                by_priority[priority] = int(await redis.xlen(stream))
    workers = await presence.live(redis, queue)
    return {
        "waiting": sum(by_priority.values()),
        "waiting_by_priority": by_priority,
        "running": running,
        "workers": len(workers),
    }


def _pairs(flat: list[str]) -> dict[str, str]:
    """A stream entry's fields as a script returns them (a flat list) made a mapping."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


def io_worker(
    redis: aioredis.Redis, runner: JobRunner, settings: IoWorkerSettings, name: str | None = None
) -> StreamConsumer:
    """An io worker: a stream consumer that runs each job's runner on this event loop."""
    consumer = StreamConsumer(
        redis, lambda job_id, entry_id, _fields: runner.run(job_id, entry_id), settings, name
    )
    runner.is_cancelled = consumer.is_cancelled
    return consumer


class StreamConsumer:
    """Reads job ids from Redis Streams and hands each to ``execute`` (with its entry's id
    and fields), many at once.

    The io worker's ``execute`` runs the job runner on this loop; the Ray and Dask engines'
    ``execute`` carries the job to their cluster and waits for it. Either way an entry is
    acknowledged only once ``execute`` returned, and cancelling the job cancels ``execute``.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        execute: Callable[[str, str, Mapping[str, str]], Awaitable[object]],
        settings: IoWorkerSettings,
        name: str | None = None,
        kind: str = "io",
    ) -> None:
        self.redis = redis
        self.execute = execute
        self.settings = settings
        self.name = name or consumer_name()
        #: What it says it is when it checks in: ``io`` (a worker) or ``dispatcher``.
        self.kind = kind
        # job id -> (asyncio task, stream, entry id) for every job this worker holds
        self._held: dict[str, tuple[asyncio.Task[bool], str, str]] = {}
        #: Jobs this consumer holds that were cancelled, and the state they were in then.
        self._cancelled: dict[str, str] = {}
        #: Jobs cancelled while held here, kept after their task ended: a sync task's
        #: thread runs on past the cancel and polls ``ctx.cancelled()`` (a cancelled job
        #: never runs again, so the mark stays true; the oldest are forgotten first).
        self._ever_cancelled: dict[str, None] = {}
        #: Acknowledgements under way, for the reader's end to wait for.
        self._acks: set[asyncio.Task[None]] = set()
        #: Per stream, where the next look for entries of silent consumers starts.
        self._reclaim_from: dict[str, str] = {}
        #: Entries taken beyond the room there was (a blocking read can return one per
        #: stream): held, and started before anything more is read, highest priority first.
        self._parked: list[tuple[str, str, dict[str, str]]] = []
        self._slot_freed = asyncio.Event()
        self._draining = False
        self._rechecks: set[asyncio.Task[None]] = set()
        self._batch = Batcher(
            redis,
            {name: (LUA_DIR / f"{name}.lua").read_text() for name in ("ack", "renew", "take")},
        )

    def is_cancelled(self, job_id: str) -> bool:
        """Whether a cancel for ``job_id`` reached this consumer while it held the job."""
        return job_id in self._cancelled or job_id in self._ever_cancelled

    def cancelled_from(self, job_id: str) -> str | None:
        """The state ``job_id`` was cancelled in, if a cancel reached this consumer while it
        held the job (``running``, or ``queued`` for a job not begun yet)."""
        return self._cancelled.get(job_id)

    @property
    def held(self) -> int:
        return len(self._held)

    async def run(self, stop: asyncio.Event, grace_s: float | None = 10.0) -> None:
        """Consume until ``stop`` is set, then let running jobs finish for ``grace_s``
        (None: for as long as they take). Leases and cancels keep working meanwhile."""
        for queue in self.settings.queues:
            await ensure_group(self.redis, queue)
        helpers = [
            asyncio.create_task(
                listen(self.redis, keys.CANCEL, self._on_cancel, self._on_cancels_subscribed)
            ),
            asyncio.create_task(self._keep_leases()),
        ]
        reader = asyncio.create_task(self._read(stop))
        try:
            await stop.wait()
            # The reader notices ``stop`` within one blocking read; a cancel alone is not
            # enough, as a cancel can be lost inside redis-py's blocking read.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), 3)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            # Draining from now on: the lease keeper must not take back what is handed back.
            self._draining = True
            await self._release_parked()
            # Held jobs keep their leases (nobody else runs them meanwhile) and their
            # cancels while they drain.
            await self._drain(grace_s)
            await asyncio.gather(*self._acks, return_exceptions=True)
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            with contextlib.suppress(*_REDIS_DOWN):
                await presence.leave(self.redis, self.name, self.settings.queues)
                await leave_group(self.redis, self._streams(), keys.IO_GROUP, self.name)

    async def _read(self, stop: asyncio.Event) -> None:
        streams = self._streams()
        rank = {stream: i for i, stream in enumerate(streams)}
        while not stop.is_set():
            free = self.settings.concurrency - len(self._held)
            if free <= 0:
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), 1.0)
                continue
            if self._parked:
                ready, self._parked = self._parked[:free], self._parked[free:]
                await self._start_all(ready)
                continue
            try:
                taken = await self._take(streams, min(free, 512))
                if not taken:
                    # Nothing waits: block until something comes, on any stream. One entry
                    # per stream at most: the next ``take`` gets the rest in order.
                    taken = await self.redis.xreadgroup(
                        keys.IO_GROUP, self.name, dict.fromkeys(streams, ">"), count=1, block=250
                    )
            except _REDIS_DOWN as exc:
                log.warning("io worker cannot read (%s); retrying", exc)
                await asyncio.sleep(0.5)  # back off while Redis is unreachable
                continue
            except ResponseError as exc:
                # NOGROUP, or a blocked read whose stream was deleted ("UNBLOCKED ... no
                # longer exists"): Redis lost its data, so recreate the groups. Anything
                # else must not end the reader silently: say so and try again.
                if "NOGROUP" not in str(exc) and "no longer exists" not in str(exc):
                    log.error("reading the streams failed (%s); retrying", exc)
                    await asyncio.sleep(1.0)  # back off from a persistent error
                try:
                    for queue in self.settings.queues:
                        await ensure_group(self.redis, queue)
                except RedisError as again:  # e.g. out of memory: keep trying, never die
                    log.error("cannot create the consumer groups (%s); retrying", again)
                    await asyncio.sleep(1.0)
                continue
            entries = [
                (stream, entry_id, fields or {})
                for stream, got in taken or ()
                for entry_id, fields in got
            ]
            entries.sort(key=lambda entry: rank.get(entry[0], 0))  # stable: oldest first
            # Counted again: a reclaim may have started jobs while this read waited.
            free = max(0, self.settings.concurrency - len(self._held))
            ready, self._parked = entries[:free], entries[free:]
            await self._start_all(ready)

    async def _release_parked(self) -> None:
        """Hand back the entries taken but not started, as the reader stops: marked idle
        for a whole lease, so that another consumer takes them over at once, rather than
        this one holding them unstarted while its running jobs drain."""
        parked, self._parked = self._parked, []
        idle_ms = int(self.settings.lease_s * 1000)
        try:
            for stream, entry_id, _fields in parked:
                await self.redis.xclaim(
                    stream, keys.IO_GROUP, self.name, 0, [entry_id], idle=idle_ms, justid=True
                )
        except (RedisError, OSError) as exc:  # they come back after the lease anyway
            log.warning("could not hand back %d entries (%s)", len(parked), exc)

    async def _start_all(self, entries: list[tuple[str, str, dict[str, str]]]) -> None:
        for stream, entry_id, fields in entries:
            if not self._start(stream, entry_id, fields):
                await self._ack(stream, entry_id)
        # Let the jobs just taken start before the next read is sent.
        await asyncio.sleep(0)

    def _streams(self) -> list[str]:
        """Every stream of this consumer's queues, the highest priority first."""
        queues = self.settings.queues
        return [keys.stream(queue, priority) for priority in PRIORITIES for queue in queues]

    async def _take(self, streams: list[str], count: int) -> list[tuple[str, Any]]:
        """Up to ``count`` new entries, from the highest-priority streams first."""
        reply = await self._batch.script("take", streams, [keys.IO_GROUP, self.name, count])
        return [
            (stream, [(entry_id, _pairs(flat)) for entry_id, flat in entries])
            for stream, entries in reply
        ]

    def _start(self, stream: str, entry_id: str, fields: dict[str, str] | None) -> bool:
        """Run the entry's job; False for an entry with no job (to be acknowledged)."""
        job_id = (fields or {}).get("id")
        if not job_id:
            return False
        if job_id not in self._held:  # else: this worker already runs it
            task = asyncio.create_task(self._run_one(entry_id, job_id, fields or {}))
            self._held[job_id] = (task, stream, entry_id)
            # A callback, not the task's own finally: a cancel that comes before the task's
            # first step ends it without running any of its code.
            task.add_done_callback(lambda ended: self._ended(ended, job_id, stream, entry_id))
        return True

    async def _run_one(self, entry_id: str, job_id: str, fields: Mapping[str, str]) -> bool:
        """Run the job; whether its entry is done with (to be acknowledged)."""
        try:
            await self.execute(job_id, entry_id, fields)
        except Exception:
            log.exception("job %s could not be run; it will be delivered again", job_id)
            return False
        return True

    def _ended(self, task: asyncio.Task[bool], job_id: str, stream: str, entry_id: str) -> None:
        held = self._held.get(job_id)
        if held is not None and held[0] is task:
            del self._held[job_id]
        cancelled_from = self._cancelled.pop(job_id, None)
        self._slot_freed.set()
        # Cancelled: by a user, final (the record says cancelled); by a shutdown, not (the
        # unacknowledged entry goes to another worker after the lease).
        done = cancelled_from is not None if task.cancelled() else task.result()
        if done:
            ack = asyncio.ensure_future(self._ack(stream, entry_id))
            self._acks.add(ack)
            ack.add_done_callback(self._acks.discard)

    async def _ack(self, stream: str, entry_id: str) -> None:
        try:
            await self._batch.script("ack", [stream], [keys.IO_GROUP, entry_id, self.name])
        except _REDIS_DOWN as exc:
            # The entry stays pending; whoever claims it finds the job finished and acks.
            log.warning("could not acknowledge %s (%s)", entry_id, exc)

    def _on_cancel(self, data: str) -> None:
        try:
            cancel = json.loads(data)
            job_id, before = str(cancel["id"]), str(cancel["from"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an odd cancel message %r", data[:200])
            return
        held = self._held.get(job_id)
        if held is not None:
            self._mark_cancelled(job_id, before)
            held[0].cancel()

    def _mark_cancelled(self, job_id: str, before: str) -> None:
        self._cancelled[job_id] = before
        self._ever_cancelled[job_id] = None
        if len(self._ever_cancelled) > _CANCEL_MARKS:
            del self._ever_cancelled[next(iter(self._ever_cancelled))]

    def _on_cancels_subscribed(self) -> None:
        """A cancel published while the subscription was down never arrives: look at the
        records of the jobs held instead."""
        if self._held:
            check = asyncio.create_task(self._recheck_cancels())
            self._rechecks.add(check)  # held until done
            check.add_done_callback(self._rechecks.discard)

    async def _recheck_cancels(self) -> None:
        held = list(self._held)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in held:
            pipe.hmget(keys.job(job_id), ["state", "started_at"])
        try:
            records = await pipe.execute()
        except (RedisError, OSError) as exc:  # down again: the next subscription rechecks
            log.warning("cannot check the held jobs for cancels (%s)", exc)
            return
        for job_id, (state, started_at) in zip(held, records, strict=True):
            entry = self._held.get(job_id)
            if state == JobState.CANCELLED.value and entry and job_id not in self._cancelled:
                # The state it was cancelled in, as far as the record tells: begun or not.
                before = JobState.RUNNING if started_at else JobState.QUEUED
                self._mark_cancelled(job_id, before.value)
                entry[0].cancel()

    async def _keep_leases(self) -> None:
        period = min(self.settings.lease_s / 3, presence.PERIOD_S)
        while True:
            try:
                await self._check_in()
                await self._renew()
                if not self._draining:  # a draining consumer takes no new work
                    await self._reclaim()
            except (RedisError, OSError) as exc:
                log.warning("cannot renew or reclaim leases (%s)", exc)
            await asyncio.sleep(period)  # the lease period is the point of this loop

    async def _check_in(self) -> None:
        info = {
            "kind": self.kind,
            "queues": list(self.settings.queues),
            "concurrency": self.settings.concurrency,
            "running": len(self._held),
        }
        await presence.check_in(self.redis, self.name, self.settings.queues, info)

    async def _renew(self) -> None:
        by_stream: dict[str, list[Any]] = {}
        held = [(stream, entry_id) for _task, stream, entry_id in self._held.values()]
        for stream, entry_id in held + [(s, e) for s, e, _fields in self._parked]:
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            # Only the entries still this consumer's (see renew.lua).
            await self._batch.script("renew", [stream], [keys.IO_GROUP, self.name, *ids])

    async def _reclaim(self) -> None:
        min_idle = int(self.settings.lease_s * 1000)
        for stream in self._streams():
            free = self.settings.concurrency - len(self._held) - len(self._parked)
            if free <= 0:
                return
            # From where the last look ended: Redis looks at ten times COUNT entries per
            # call, and from the start each time a worker with little room would see only
            # the oldest entries, those of live workers' long jobs, never a silent one's.
            start = self._reclaim_from.get(stream, "0-0")
            reply = await self.redis.xautoclaim(
                stream, keys.IO_GROUP, self.name, min_idle, start, count=min(free, 512)
            )
            self._reclaim_from[stream] = str(reply[0])
            for entry_id, fields in reply[1]:
                log.info("reclaimed %s from a silent consumer", entry_id)
                if not self._start(stream, entry_id, fields):
                    await self._ack(stream, entry_id)

    async def _drain(self, grace_s: float | None) -> None:
        self._draining = True
        tasks = [held[0] for held in self._held.values()]
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
