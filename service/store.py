"""The Redis job store: creating records, atomic transitions, reading them back.

Every multi-step change runs as one Lua script or one MULTI, so a reader never sees a
half-written job and two writers never both win a transition.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry  # the asyncio one: the sync Retry never awaits
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import ids, keys
from service.batching import Batcher
from service.errors import InvalidBody, QueueFull
from service.jobs import ALLOWED_FROM, Job, JobError, JobState, iso, now_iso
from service.settings import DEFAULT_IDEMPOTENCY_TTL_S, Settings

LUA_DIR = Path(__file__).parent / "lua"


#: How often a call is sent again while Redis does not answer: with the backoff below (0.1 s,
#: doubling up to 1 s) about 5 s in all, which covers a restart and is as long as an HTTP
#: client should wait before it is told that the store is unavailable.
RETRIES = 8
#: How long one attempt to connect to Redis may take.
CONNECT_TIMEOUT_S = 5.0


class _CPacking:
    """Commands packed by hiredis's C packer, as redis-py's sync client already does.

    redis-py's asyncio client packs in Python, one argument at a time into a growing byte
    string; for the create script's dozens of arguments per job, batched, that was over a
    third of a busy gateway's CPU. The bytes sent are the same.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):  # a command given with its subcommand: "CONFIG GET"
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # None, a bool, a dict...: what redis-py refuses too
            raise DataError(str(exc)) from None


class _Connection(_CPacking, aioredis.Connection):
    pass


class _SSLConnection(_CPacking, aioredis.SSLConnection):
    pass


class _UnixConnection(_CPacking, aioredis.UnixDomainSocketConnection):
    pass


#: Each connection class redis-py picks from a URL's scheme, and the same with C packing.
_C_PACKED: dict[type[Any], type[Any]] = {
    aioredis.Connection: _Connection,
    aioredis.SSLConnection: _SSLConnection,
    aioredis.UnixDomainSocketConnection: _UnixConnection,
}


def connect(url: str, *, until_answered: bool = False) -> aioredis.Redis:
    """An asyncio Redis client that rides out a Redis restart by retrying with backoff.

    ``until_answered``: retry for as long as Redis is away. For the job runner in a worker
    process, which can do nothing else without Redis, and whose job would be lost if it
    gave up: Celery has acknowledged its message by then.
    """
    client = aioredis.Redis.from_url(
        url,
        decode_responses=True,
        retry=Retry(
            ExponentialBackoff(cap=1.0, base=0.05), retries=-1 if until_answered else RETRIES
        ),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        # A Redis host that drops packets fails a connection attempt in seconds, not in the
        # minutes the kernel would wait.
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )
    # The class is read as each connection is made, so none is made without C packing.
    pool = client.connection_pool
    pool.connection_class = _C_PACKED.get(pool.connection_class, pool.connection_class)
    return client


@dataclass(frozen=True)
class Dispatch:
    """Where a new job's queue entry goes: ``xadd`` its id to a stream (``xadd-job``: with
    what a cluster dispatcher launches it with), ``lpush`` a message to a list (Celery's
    queues), or ``delay``: onto the delayed set, due at ``value`` (Unix ms)."""

    op: Literal["xadd", "xadd-job", "lpush", "delay"]
    key: str
    value: str
    #: Every key of the job's queue, one per priority level (``key`` among them): their
    #: lengths summed are the queue's length, which back-pressure limits.
    queue_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Once:
    """An ``Idempotency-Key`` on a submit, and the fingerprint of the request it came with."""

    key: str
    fingerprint: str


@dataclass(frozen=True)
class Earlier:
    """The job an ``Idempotency-Key`` already stood for, and its request's fingerprint."""

    job: Job
    fingerprint: str


@dataclass(frozen=True)
class JobQuery:
    """Which jobs a listing wants: those older than ``cursor`` (a job id), up to ``limit``,
    with each given state, task, engine and queue."""

    limit: int = 50
    cursor: str | None = None
    state: str | None = None
    task: str | None = None
    engine: str | None = None
    queue: str | None = None


#: How many jobs one listing call looks at, at most: a page with a rare filter ends there
#: (short, with a cursor) rather than hold Redis up.
LIST_BUDGET = 2000


@dataclass(frozen=True)
class Begun:
    """What ``JobStore.begin`` found: run ``job``, or don't (``job`` is None)."""

    job: Job | None
    #: Why the job must not run, when it must not: its state, "missing" or "dead".
    reason: str = ""


def _unix_ms(moment: str) -> int:
    """An API time (ISO 8601) as Unix milliseconds, the delayed set's scores."""
    return int(datetime.fromisoformat(moment).timestamp() * 1000)


class JobStore:
    def __init__(
        self,
        redis: aioredis.Redis,
        job_ttl_s: int,
        group_commit: bool = True,
        idempotency_ttl_s: int = DEFAULT_IDEMPOTENCY_TTL_S,
        max_queue_length: int = 0,
    ) -> None:
        """``group_commit=False`` for a process that runs one job at a time (see batching).
        ``max_queue_length``: the most jobs a queue may hold before submits to it are
        refused (0: no limit)."""
        self.max_queue_length = max_queue_length
        self.redis = redis
        self.job_ttl_s = job_ttl_s
        # A key never outlives the record of its job (kept job_ttl_s once finished).
        self.idempotency_ttl_s = min(idempotency_ttl_s, job_ttl_s)
        self.batch = Batcher(
            redis,
            {
                name: (LUA_DIR / f"{name}.lua").read_text()
                for name in (
                    "create",
                    "transition",
                    "begin",
                    "list",
                    "progress",
                    "retry",
                    "release",
                )
            },
            group=group_commit,
        )

    @classmethod
    def for_submits(cls, redis: aioredis.Redis, settings: Settings) -> JobStore:
        """The store a gateway or producer submits through, with the deployment's limits."""
        return cls(
            redis,
            settings.job_ttl_s,
            idempotency_ttl_s=settings.idempotency_ttl_s,
            max_queue_length=settings.max_queue_length,
        )

    async def create(
        self, jobs: list[Job], dispatch: Callable[[Job], Dispatch], once: Once | None = None
    ) -> Earlier | None:
        """Store new jobs and queue them, all or none, in one script call.

        ``dispatch`` says where each job's queue entry goes; it may refuse a job (raise)
        before anything is written. With ``once`` (one job): if its key already stands for
        a job, nothing is written and that job is returned.
        """
        if once is not None and len(jobs) != 1:
            raise ValueError("an Idempotency-Key stands for one job")
        script_keys: list[str] = [keys.JOBS, keys.STATS]
        args: list[Any] = [keys.job(""), keys.SUBMITTED, self.max_queue_length]
        for job in jobs:
            where = dispatch(job)  # also for a delayed job: it refuses what it cannot run
            if job.run_at is not None:
                where = Dispatch("delay", keys.DELAYED, str(_unix_ms(job.run_at)))
            fields = job.to_hash()
            script_keys += [keys.job(job.id), where.key]
            # The queue's keys are read only to enforce a limit.
            counted = (where.queue_keys or (where.key,)) if self.max_queue_length else ()
            args += [where.op, where.value, len(counted), *counted, len(fields)]
            for name, value in fields.items():
                args += [name, value]
        if once is not None:
            script_keys.append(keys.idempotency(once.key))
            args += [jobs[0].id, once.fingerprint, self.idempotency_ttl_s]
        reply = await self.batch.script("create", script_keys, args)
        if reply[0] == "full":
            full = jobs[int(reply[1]) - 1]
            raise QueueFull(
                f"queue {full.queue!r} holds {reply[2]} jobs, as many as this deployment "
                "allows (COREFLEET_MAX_QUEUE_LENGTH); try again shortly",
                {
                    "queue": full.queue,
                    "length": int(reply[2]),
                    "retry_after_s": QueueFull.retry_after_s,
                },
            )
        if reply[0] == "taken":
            taken = jobs[int(reply[1]) - 1]
            raise InvalidBody(
                f"queue {taken.queue!r} cannot be used: Redis holds something else under its "
                "name (another program's key?)",
                {"queue": taken.queue},
            )
        if reply[0] != "replay":
            return None
        earlier = Job.from_hash(dict(zip(reply[2::2], reply[3::2], strict=True)))
        if earlier.id == jobs[0].id:
            return None  # this very call, sent again after its answer was lost
        return Earlier(earlier, reply[1])

    async def earlier(self, once: Once) -> Earlier | None:
        """The job ``once``'s key already stands for, if it does and that job still exists
        (read only: ``create`` decides atomically)."""
        held = await self.redis.get(keys.idempotency(once.key))
        job_id, _, fingerprint = (held or "").partition(" ")
        job = await self.get(job_id) if job_id and fingerprint else None
        return Earlier(job, fingerprint) if job is not None else None

    async def get(self, job_id: str) -> Job | None:
        # redis-py types each command for its sync and async clients at once.
        raw: dict[str, str] = await self.redis.hgetall(keys.job(job_id))  # type: ignore[misc]
        return Job.from_hash(raw) if raw else None

    async def list_jobs(self, query: JobQuery) -> tuple[list[Job], str | None]:
        """A page of jobs, newest first, and the cursor of the next page (None at the end).

        A page may hold fewer than ``query.limit`` jobs (even none) while a cursor says
        there is more: each call looks at a bounded number of jobs.
        """
        reply = await self.batch.script(
            "list",
            [keys.JOBS],
            [
                keys.job(""),
                query.cursor or "",
                query.limit,
                LIST_BUDGET,
                query.state or "",
                query.task or "",
                query.engine or "",
                query.queue or "",
            ],
        )
        jobs: list[Job] = []
        at = 1
        while at < len(reply):
            size = int(reply[at])
            flat = reply[at + 1 : at + 1 + size]
            jobs.append(Job.from_hash(dict(zip(flat[::2], flat[1::2], strict=True))))
            at += 1 + size
        return jobs, reply[0] or None

    async def begin(self, job_id: str, worker: str, entry: str = "") -> Begun:
        """Count an attempt and mark the job running, unless it must not run. ``entry``:
        the stream entry that delivered the job, where a stream did (see begin.lua)."""
        reply = await self.batch.script(
            "begin",
            [keys.job(job_id), keys.STATS, keys.DELAYED, keys.WEBHOOKS],
            self._begin_args(job_id, worker, entry),
        )
        if reply[0] != "run":
            return Begun(None, reply[1] if len(reply) > 1 else reply[0])
        flat = reply[1:]
        return Begun(Job.from_hash(dict(zip(flat[::2], flat[1::2], strict=True))))

    def _begin_args(self, job_id: str, worker: str, entry: str = "") -> list[Any]:
        lost = JobError("WorkerLost", "the worker running this job was lost on every attempt")
        now = datetime.now(UTC)
        return [
            job_id,
            iso(now),
            worker,
            self.job_ttl_s,
            keys.EVENTS,
            json.dumps(lost.to_json()),
            # The attempt's own id: the client sends a call again when its connection
            # drops, even if Redis ran it, and the script must not count that twice.
            ids.new_id(),
            entry,
            int(now.timestamp() * 1000),  # a retrying job's backoff ends by this clock
        ]

    async def transition(
        self,
        job_id: str,
        to: JobState,
        fields: dict[str, str] | None = None,
        attempt_id: str = "",
    ) -> tuple[bool, JobState | None]:
        """Move a job to ``to`` if its current state allows it; with ``attempt_id``, only
        while that attempt is the job's current one.

        Returns whether it moved, and the state it was in (None when there is no job).
        """
        flat: list[Any] = []
        for name, value in (fields or {}).items():
            flat += [name, value]
        ttl = self.job_ttl_s if to.terminal else 0
        allowed = ",".join(s.value for s in ALLOWED_FROM[to]) or "-"
        moved, previous = await self.batch.script(
            "transition",
            [keys.job(job_id), keys.STATS, keys.DELAYED, keys.WEBHOOKS],
            [job_id, to.value, allowed, ttl, keys.EVENTS, keys.CANCEL, attempt_id, *flat],
        )
        return bool(moved), JobState(previous) if previous else None

    async def succeed(self, job_id: str, result_json: str, attempt_id: str = "") -> bool:
        """End the job ``succeeded``; ``attempt_id``: the runner's attempt, refused when
        it is no longer the job's current one."""
        moved, _ = await self.transition(
            job_id,
            JobState.SUCCEEDED,
            {"result": result_json, "finished_at": now_iso()},
            attempt_id,
        )
        return moved

    async def fail(
        self,
        job_id: str,
        error: JobError,
        state: JobState = JobState.FAILED,
        attempt_id: str = "",
    ) -> bool:
        """End the job ``state`` with ``error``; ``attempt_id`` as in ``succeed`` (none:
        from outside the attempt, as a time limit or a lost Celery child)."""
        moved, _ = await self.transition(
            job_id,
            state,
            {"error": json.dumps(error.to_json()), "finished_at": now_iso()},
            attempt_id,
        )
        return moved

    async def progress(self, job: Job, fraction: float, message: str) -> bool:
        """Record and publish a progress report of ``job``'s running attempt; False when
        that attempt no longer runs (cancelled, finished, or begun again elsewhere)."""
        report = json.dumps({"fraction": fraction, "message": message})
        done = await self.batch.script(
            "progress", [keys.job(job.id)], [job.id, job.attempt_id, report, keys.EVENTS]
        )
        return bool(done)

    async def retry(self, job: Job, error: JobError, delay_s: float) -> bool:
        """Set ``job``'s running attempt aside as ``retrying``, due again in ``delay_s``;
        False when that attempt no longer runs (cancelled meanwhile, say)."""
        due = time.time() + delay_s
        run_at = iso(datetime.fromtimestamp(due, UTC))
        done = await self.batch.script(
            "retry",
            [keys.job(job.id), keys.DELAYED, keys.STATS],
            [
                job.id,
                job.attempt_id,
                json.dumps(error.to_json()),
                run_at,
                _unix_ms(run_at),
                keys.EVENTS,
            ],
        )
        return bool(done)

    async def due(self, limit: int) -> tuple[list[tuple[str, int]], float | None]:
        """Up to ``limit`` delayed jobs whose time has come, as (id, when it was due in
        Unix ms), and the seconds until the next one that is not yet due (None: none)."""
        now_ms = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrangebyscore(keys.DELAYED, "-inf", now_ms, start=0, num=limit, withscores=True)
        pipe.zrangebyscore(keys.DELAYED, f"({now_ms}", "+inf", start=0, num=1, withscores=True)
        ready, upcoming = await pipe.execute()
        wait = (upcoming[0][1] - now_ms) / 1000 if upcoming else None
        return [(job_id, int(score)) for job_id, score in ready], wait

    async def delayed(self) -> int:
        """How many jobs wait for their time (a ``delay_s``, or the backoff of a retry)."""
        return int(await self.redis.zcard(keys.DELAYED))

    async def release(self, job_id: str, due_ms: int, where: Dispatch | None) -> bool:
        """Queue a delayed job that was due at ``due_ms``, unless another gateway did, it
        no longer waits, or it was set aside again for a later time; with ``where`` None
        (a job that no longer waits) it only leaves the delayed set. A cluster's
        dispatcher reads the record of a job queued this way."""
        op = "lpush" if where is not None and where.op == "lpush" else "xadd"
        value = where.value if where is not None and op == "lpush" else job_id
        queue = where.key if where is not None else ""
        done = await self.batch.script(
            "release", [keys.DELAYED, keys.job(job_id), queue], [job_id, op, value, due_ms]
        )
        if done == -1:
            # It could never be queued there: fail it, saying why (it leaves the set so).
            message = f"its queue {queue!r} is a Redis key of another kind (another program's)"
            await self.fail(job_id, JobError("QueueUnavailable", message))
            return False
        return bool(done)

    async def cancel(self, job_id: str) -> tuple[bool, JobState | None]:
        """Cancel a job that has not finished; a running one's holder is told to stop."""
        return await self.transition(job_id, JobState.CANCELLED, {"finished_at": now_iso()})
