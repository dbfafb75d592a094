"""What the Ray and Dask engines share: the heavy streams, their dispatcher, reachability.

Heavy jobs travel like io jobs: the submit adds the job's id to ``cf:stream:{queue}`` in
the script call that stores the job, so a 202 means stored even while Ray or Dask is down.
Ray jobs use ``heavy`` and Dask jobs ``dask`` unless their task names another queue. A
``HeavyDispatcher`` reads an engine's streams with a ``StreamConsumer`` and hands each job
to the engine, which runs the job runner inside a Ray task (``ray_.py``) or a Dask task
(``dask_.py``). The runner writes the outcome to Redis from there; the dispatcher only
waits, enforces the time limit, and acknowledges the entry after.

Where the dispatcher runs matters: a Ray task dies with the process that submitted it, so
Ray's dispatcher lives inside Ray as a detached actor (``ray_dispatcher.py``) and a gateway
restart does not touch running Ray jobs. Dask's dispatcher runs in the gateway.

A configured address that does not answer marks its engine unreachable: its jobs get a 503
and are not stored, while io and cpu jobs go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service import keys
from service.engines.asyncio_ import StreamConsumer, ensure_group, stream_status
from service.errors import EngineUnavailable, InvalidBody
from service.events import listen
from service.jobs import Job, JobError, JobState
from service.settings import IoWorkerSettings, Settings
from service.store import Dispatch, JobStore
from service.worker_runtime import WorkerConfig
from tasks import (
    DASK_QUEUE,
    ENGINE_QUEUE,
    MIN_RESOURCE,
    RESOURCE_NAMES,
    Registry,
    TaskSpec,
    resources_valid,
)

log = logging.getLogger("corefleet.heavy")
#: The states of a job whose runner has not begun it.
_WAITING = frozenset({JobState.QUEUED.value, JobState.RETRYING.value})

#: The stream Ray jobs travel on unless their task names another.
HEAVY_QUEUE = ENGINE_QUEUE["ray"]
#: Each cluster engine's default queue.
DEFAULT_QUEUES = {"ray": HEAVY_QUEUE, "dask": DASK_QUEUE}
#: How long past its time limit a running cluster job may go before it is interrupted (the
#: runner's own limit, for async tasks, gets to fire first and report cleanly).
TIME_LIMIT_GRACE_S = 1.0
#: Heavy jobs one gateway keeps in flight on its clusters; Ray and Dask queue the rest.
DISPATCH_CONCURRENCY = 256
#: How long a configured address may take to accept a TCP connection.
PROBE_TIMEOUT_S = 2.0
#: How often an unreachable address is tried again.
REPROBE_S = 5.0
#: The per-job option that overrides a task's declared resources.
RESOURCES_OPTION = "resources"
#: Ray's name of each of ``RESOURCE_NAMES``, as its cluster reports what it has.
RAY_RESOURCES = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}

NOT_STARTED = "not started"
LOCAL = "local"
UNREACHABLE = "unreachable"


class CouldNotRun(Exception):
    """The cluster could not run the job's runner at all (as opposed to losing a worker,
    after which the job is delivered again)."""

    def __init__(self, error: JobError) -> None:
        super().__init__(f"{error.type}: {error.message}")
        self.error = error


# --- resources ---------------------------------------------------------------------------


def check_resources(value: Any) -> dict[str, float]:
    """A job's ``resources`` option, checked."""
    if not resources_valid(value):
        raise InvalidBody(
            f"options.{RESOURCES_OPTION} must be an object with num_cpus, num_gpus and/or "
            f"memory (bytes), each 0 or a number from {MIN_RESOURCE} to 2**63",
            {"allowed": list(RESOURCE_NAMES)},
        )
    return {name: float(amount) for name, amount in value.items()}


def ray_options(declared: Mapping[str, float], job_options: Mapping[str, Any]) -> dict[str, Any]:
    """Ray ``.options()`` for a job: its task's resources, overridden per job."""
    merged = dict(declared)
    override = job_options.get(RESOURCES_OPTION)
    if override is not None:
        merged.update(check_resources(override))
    options: dict[str, Any] = {}
    for name in RESOURCE_NAMES:
        if name in merged:
            options[name] = int(merged[name]) if name == "memory" else merged[name]
    return options


# --- reachability ------------------------------------------------------------------------


def split_address(address: str, default_port: int) -> tuple[str, int] | None:
    """Host and port of a cluster address; None where there is nothing to probe."""
    rest = address.split("://", 1)[-1].rstrip("/")
    if not rest or rest == "auto":
        return None
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return rest, default_port
    return host.strip("[]"), int(port)


async def probe(address: str, default_port: int) -> str | None:
    """Why nothing answers at ``address``; None when it accepts a TCP connection."""
    where = split_address(address, default_port)
    if where is None:
        return None
    host, port = where
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            _reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else type(exc).__name__
        return f"nothing answers at {host}:{port} ({reason})"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


# --- the gateway side: what Ray and Dask have in common ----------------------------------


class ClusterEngine:
    """An engine that runs the job runner on a cluster it starts or connects to lazily.

    Subclasses say how to connect and how to launch, wait for and interrupt one job.
    """

    name = "cluster"
    default_port = 0

    def __init__(self, redis: aioredis.Redis, settings: Settings, address: str) -> None:
        self.redis = redis
        self.settings = settings
        self.address = address
        self.config = WorkerConfig.of(settings)
        #: Streams this engine's jobs travel on (widened from the registry by ``queues_of``).
        self.queues: tuple[str, ...] = (DEFAULT_QUEUES.get(self.name, HEAVY_QUEUE),)
        self.state = NOT_STARTED
        self.problem = ""
        self.dashboard: str | None = None
        self.connected = False
        #: The start of the cluster or the connection to it, while under way: one at a time.
        self._starting: asyncio.Future[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._inflight: dict[str, Any] = {}
        #: Set when the runner marks an in-flight job running: its time limit starts then.
        self._started: dict[str, asyncio.Event] = {}
        #: Per job in ``_started``: the attempt its record named as it was launched (a lost
        #: worker's, on a redelivery), whose ``running`` is not this launch's start.
        self._attempt_before: dict[str, str] = {}
        #: The events subscription that sees those starts: up only while a job with a time
        #: limit waits to start, as it carries every change of every job.
        self._starts: asyncio.Task[None] | None = None
        self._rechecks: set[asyncio.Task[None]] = set()

    # Engine protocol -----------------------------------------------------------------------

    async def start(self) -> None:
        # Only a configured address is checked now, so that its jobs can be refused at
        # submit; a local cluster starts with the first job.
        if self.address:
            await self._check_reachable()

    def dispatch(self, job: Job) -> Dispatch:
        if self.state == UNREACHABLE:
            raise EngineUnavailable(
                f"the {self.name} engine is unreachable: {self.problem}; {self.name} jobs are "
                "refused until it answers (io and cpu jobs are not affected)",
                {"engine": self.name, "address": self.address or "local"},
            )
        if RESOURCES_OPTION in job.options:
            check_resources(job.options[RESOURCES_OPTION])
        return Dispatch(
            "xadd-job", keys.stream(job.queue, job.priority), job.id, keys.streams(job.queue)
        )

    async def cancel(self, job: Job) -> None:
        # The cancel transition publishes on keys.CANCEL; the dispatcher holding the job
        # cancels its ``run``, which drops or interrupts the cluster task.
        return None

    async def status(self) -> dict[str, Any]:
        queues = {queue: await stream_status(self.redis, queue) for queue in self.queues}
        status: dict[str, Any] = {
            "engine": self.name,
            "state": self.state,
            "queues": queues,
            "dashboard": self.dashboard,
        }
        if self.state == UNREACHABLE:
            status["problem"] = self.problem
        return status

    async def close(self) -> None:
        if self._starting is not None and not self._starting.done():
            # A start under way ends first, so that what it started is stopped below (and
            # the watch a failed start begins is cancelled with the others).
            with contextlib.suppress(Exception):
                await self._starting
        for task in (self._watch, self._starts):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.connected:
            await self._disconnect()
            self.connected = False

    # running jobs --------------------------------------------------------------------------

    async def run(
        self, job: Job, spec: TaskSpec | None, cancelled_from: Callable[[str], str | None]
    ) -> None:
        """Run ``job`` on the cluster and wait until its runner has stored the outcome.

        Cancelling this coroutine because the user cancelled the job (``cancelled_from``
        says in which state) drops the cluster task if it still waits for a CPU and
        interrupts it if it runs; a shutdown leaves it running, as its outcome reaches
        Redis without the dispatcher. A job still running past its time limit is
        interrupted and fails with ``TimeLimitExceeded``.
        """
        await self.ensure_started()
        limit = job.timeout_s or (spec.timeout_s if spec is not None else None)
        handle: Any = None
        try:
            if limit is not None:
                # Registered before the launch, so that the start cannot slip past.
                self._started[job.id] = asyncio.Event()
                self._attempt_before[job.id] = await self._attempt_at_launch(job)
                self._watch_starts()
            handle = await self._launch(job, spec)
            self._inflight[job.id] = handle
            if limit is None:
                await self._wait(handle)
            else:
                await self._wait_within(job, handle, limit)
        except asyncio.CancelledError:
            before = cancelled_from(job.id)
            if before is not None and handle is not None:
                self._interrupt(handle, running=before == JobState.RUNNING.value)
            raise
        finally:
            self._inflight.pop(job.id, None)
            self._attempt_before.pop(job.id, None)
            if self._started.pop(job.id, None) is not None:
                self._watch_starts()

    async def _attempt_at_launch(self, job: Job) -> str:
        """The attempt the job's record names as it is launched: a lost worker's, if the job
        was taken over. Where this launch runs a new task (``_runs_anew``), that one running
        is not this launch's start; where the cluster hands back the task that still runs
        (Dask, for a key it holds), it is, and "" says so."""
        if not await self._runs_anew(job):
            return ""
        attempt = await self.redis.hget(keys.job(job.id), "attempt_id")  # type: ignore[misc]
        return str(attempt or "")

    async def _wait_within(self, job: Job, handle: Any, limit: float) -> None:
        # The clock starts when the runner marks the job running, not while the task
        # waits in the cluster for a free CPU.
        waiting = asyncio.ensure_future(self._wait(handle))
        started = asyncio.ensure_future(self._started[job.id].wait())
        try:
            await asyncio.wait((waiting, started), return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                done, _ = await asyncio.wait((waiting,), timeout=limit + TIME_LIMIT_GRACE_S)
                if not done:
                    self._stop_overdue(handle)
                    raise CouldNotRun(
                        JobError(
                            "TimeLimitExceeded", f"{job.task} ran past its {limit:g} s time limit"
                        )
                    )
            await waiting
        finally:
            for future in (waiting, started):
                future.cancel()
            await asyncio.gather(waiting, started, return_exceptions=True)

    # when jobs with a time limit start ---------------------------------------------------

    def _watch_starts(self) -> None:
        """Subscribe to job events while a job with a time limit waits to start, and only
        then: the subscription wakes this process for every change of every job."""
        waiting = any(not started.is_set() for started in self._started.values())
        listening = self._starts is not None and not self._starts.done()
        if waiting and not listening:
            self._starts = asyncio.create_task(
                listen(self.redis, keys.EVENTS, self._on_event, self._on_subscribed)
            )
        elif listening and not waiting:
            assert self._starts is not None
            self._starts.cancel()
            self._starts = None

    def _on_event(self, data: str) -> None:
        # Cheap filter first: this sees every state change of every job.
        if '"running"' not in data:
            return
        try:
            job_id = str(json.loads(data)["id"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an odd event %r", data[:200])
            return
        self.mark_started(job_id)

    def mark_started(self, job_id: str) -> None:
        """The runner marked ``job_id`` running: its time limit starts now."""
        started = self._started.get(job_id)
        if started is not None and not started.is_set():
            started.set()
            self._watch_starts()

    def _on_subscribed(self) -> None:
        # Starts published before the subscription was up are not seen: read them.
        task = asyncio.create_task(self._recheck_started())
        self._rechecks.add(task)
        task.add_done_callback(self._rechecks.discard)

    async def _recheck_started(self) -> None:
        try:
            for job_id in [j for j, started in self._started.items() if not started.is_set()]:
                record = keys.job(job_id)
                state, attempt = await self.redis.hmget(record, ["state", "attempt_id"])  # type: ignore[misc]
                # Queued, or retrying (back on its queue for its next attempt): not begun.
                # Running still from the attempt of a lost worker: not begun either.
                if state is None or state in _WAITING:
                    continue
                if state == JobState.RUNNING.value and attempt == self._attempt_before.get(job_id):
                    continue
                self.mark_started(job_id)
        except (RedisError, OSError) as exc:  # the next (re)subscription checks again
            log.warning("could not re-check started jobs (%s)", exc)

    async def ensure_started(self) -> None:
        """Start the local cluster or connect to the configured one, once; again after the
        connection was lost for good (until then, jobs wait on their streams)."""
        if self.connected and not self._alive():
            self.connected = False
            with contextlib.suppress(Exception):  # closing what is already lost
                await self._disconnect()
            if self.address:  # refused until it answers again
                self._mark_unreachable("lost the connection to it")
            else:  # a local cluster that died: the next job starts another
                self.state = NOT_STARTED
        if self.connected:
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start_or_connect())
            # Its error is read here too: a start nobody waits for any more (its job was
            # cancelled) would otherwise be logged by asyncio as never retrieved.
            self._starting.add_done_callback(lambda done: done.cancelled() or done.exception())
        # Shielded: the job that happened to start the cluster may be cancelled meanwhile,
        # and a start cut short half way (a LocalCluster's scheduler up, its workers not)
        # would leave processes nothing refers to, and the next job start another cluster.
        await asyncio.shield(self._starting)

    async def _start_or_connect(self) -> None:
        if self.address and not await self._check_reachable():
            raise EngineUnavailable(f"the {self.name} engine is unreachable: {self.problem}")
        try:
            await self._connect()
        except Exception as exc:
            self._mark_unreachable(f"could not start or connect: {type(exc).__name__}: {exc}")
            raise EngineUnavailable(
                f"the {self.name} engine is unreachable: {self.problem}"
            ) from exc
        self.connected = True
        self.state = f"connected to {self.address}" if self.address else LOCAL
        log.info("%s engine %s", self.name, self.state)

    async def _check_reachable(self) -> bool:
        problem = await probe(self.address, self.default_port)
        if problem is not None:
            self._mark_unreachable(problem)
            return False
        if self.state == UNREACHABLE:
            self.state = NOT_STARTED
            self.problem = ""
        return True

    def _mark_unreachable(self, problem: str) -> None:
        log.warning("%s engine unreachable: %s", self.name, problem)
        self.state, self.problem = UNREACHABLE, problem
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_until_back())

    async def _watch_until_back(self) -> None:
        while self.state == UNREACHABLE:
            await asyncio.sleep(REPROBE_S)  # a remote address cannot tell us it is back
            if await probe(self.address, self.default_port) is None:
                self.state, self.problem = NOT_STARTED, ""
                log.info("%s engine answers again", self.name)

    # what each cluster does its own way ----------------------------------------------------

    async def _connect(self) -> None:
        raise NotImplementedError

    async def _disconnect(self) -> None:
        raise NotImplementedError

    async def _launch(self, job: Job, spec: TaskSpec | None) -> Any:
        raise NotImplementedError

    async def _wait(self, handle: Any) -> None:
        raise NotImplementedError

    def _interrupt(self, handle: Any, running: bool) -> None:
        raise NotImplementedError

    def _stop_overdue(self, handle: Any) -> None:
        """Stop a job's task past its time limit. Sync Python cannot be stopped from outside
        on its own thread: Ray kills the worker process; Dask's task sees ``ctx.cancelled()``
        first, and its worker is restarted if it goes on."""
        self._interrupt(handle, running=True)

    def _alive(self) -> bool:
        """Whether the connection made by ``_connect`` still serves."""
        return True

    async def _runs_anew(self, job: Job) -> bool:
        """Whether launching ``job`` now runs a new task, which begins a new attempt, rather
        than handing back a task of an earlier launch that may still run."""
        return False


# --- the dispatcher ----------------------------------------------------------------------


def queues_of(registry: Registry, engine: str) -> tuple[str, ...]:
    """The streams ``engine``'s jobs travel on: its default queue and its tasks' own."""
    queues = {DEFAULT_QUEUES.get(engine, HEAVY_QUEUE)}
    queues |= {spec.queue for spec in registry if spec.engine == engine}
    return tuple(sorted(queues))


class HeavyDispatcher:
    """A consumer of cluster engines' streams: each job goes to its engine's cluster.

    The gateway runs one for Dask; Ray's runs inside Ray (``ray_dispatcher.py``).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        store: JobStore,
        registry: Registry,
        engines: Mapping[str, ClusterEngine],
        settings: Settings,
    ) -> None:
        self.redis = redis
        self.store = store
        self.registry = registry
        self.engines = dict(engines)
        queues: set[str] = set()
        for name, engine in self.engines.items():
            engine.queues = queues_of(registry, name)
            queues |= set(engine.queues)
        consumer_settings = IoWorkerSettings(
            queues=tuple(sorted(queues)),
            concurrency=DISPATCH_CONCURRENCY,
            lease_s=settings.io.lease_s,
        )
        self.consumer = StreamConsumer(redis, self.execute, consumer_settings, kind="dispatcher")
        #: Set to stop taking jobs; running ones get the grace period of ``run``.
        self.stop = asyncio.Event()

    async def prepare(self) -> None:
        """Create the streams and their group, before jobs arrive."""
        for queue in self.consumer.settings.queues:
            await ensure_group(self.redis, queue)

    async def execute(self, job_id: str, entry_id: str, entry: Mapping[str, str]) -> None:
        if "task" in entry:
            # The entry holds what launching needs, as the job was created: no read of the
            # record on the way. Whether it still runs is the runner's ``begin`` to decide.
            job: Job | None = Job.from_hash({**entry, "state": JobState.QUEUED.value})
        else:
            job = await self.store.get(job_id)
        if job is None or job.state.terminal:
            return  # expired, finished or cancelled before it left the stream
        job.entry = entry_id
        engine = self.engines.get(job.engine)
        try:
            if engine is None:
                raise CouldNotRun(
                    JobError(
                        "EngineUnavailable",
                        f"queue {job.queue!r} is read by the {', '.join(self.engines)} "
                        f"dispatcher, which cannot run {job.engine} jobs",
                    )
                )
            await engine.run(job, self.registry.get(job.task), self.consumer.cancelled_from)
        except CouldNotRun as exc:
            # Delivering it again would fail the same way: fail the job, with the reason.
            log.error("job %s could not run on %s: %s", job_id, job.engine, exc)
            await self.store.fail(job_id, exc.error)

    async def run(self, stop: asyncio.Event, grace_s: float | None = 5.0) -> None:
        await self.consumer.run(stop, grace_s)
