"""The Ray engine, and the heavy-job dispatch the Ray and Dask engines share.

Heavy jobs travel like io jobs: the gateway adds the job's id to ``cf:stream:{queue}``
(``heavy`` unless the task names another queue) in the script call that stores the job, so a
202 means stored even while Ray or Dask is down. The gateway's ``HeavyDispatcher`` reads
those streams with a ``StreamConsumer`` and hands each job to its engine, which runs the
job runner inside a Ray task (or a Dask task, ``dask_.py``). The runner writes the outcome
to Redis from there; the gateway only waits, and acknowledges the stream entry after.

Ray starts on first use: ``COREFLEET_RAY_ADDRESS`` names an existing cluster, otherwise a
local one starts (``address="local"``, its own temp dir, dashboard only when asked).
``ray.init`` blocks, so it runs in a thread; ``import ray`` happens only there and in the
worker processes. A configured address that does not answer marks the engine unreachable:
its jobs get a 503 and are not stored, while io and cpu jobs go on.

Cancel: a queued job never starts (the runner refuses a cancelled job, and a Ray task
still waiting for a CPU is dropped); a running one is killed with
``ray.cancel(force=True)``, child tasks included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from service import keys
from service.engines.asyncio_ import StreamConsumer, ensure_group, stream_status
from service.engines.base import Engine
from service.errors import EngineUnavailable, InvalidBody
from service.events import listen
from service.jobs import Job, JobState
from service.settings import EngineSettings, IoWorkerSettings, Settings
from service.store import Dispatch, JobStore
from tasks import Registry, TaskSpec

log = logging.getLogger("corefleet.heavy")

#: The stream heavy jobs (Ray and Dask alike) travel on unless their task names another.
HEAVY_QUEUE = "heavy"
#: Heavy jobs one gateway keeps in flight on its clusters; Ray and Dask queue the rest.
DISPATCH_CONCURRENCY = 256
#: How long a configured address may take to accept a TCP connection.
PROBE_TIMEOUT_S = 2.0
#: How often an unreachable address is tried again.
REPROBE_S = 5.0
#: The per-job option that overrides a task's declared resources.
RESOURCES_OPTION = "resources"
RESOURCE_NAMES = ("num_cpus", "num_gpus", "memory")
RAY_DASHBOARD_PORT = 8265
#: How long a local Ray keeps an idle worker process beyond one per CPU.
IDLE_WORKER_KEEP_MS = 60_000

NOT_STARTED = "not started"
LOCAL = "local"
UNREACHABLE = "unreachable"


# --- the worker side: one runner per Ray / Dask worker process ---------------------------


@dataclass(frozen=True)
class WorkerConfig:
    """What a Ray or Dask worker process needs to build its own job runner."""

    redis_url: str
    job_ttl_s: int
    task_modules: tuple[str, ...]

    @classmethod
    def of(cls, settings: Settings) -> WorkerConfig:
        return cls(settings.redis, settings.job_ttl_s, settings.task_modules)


@dataclass
class _Runtime:
    loop: asyncio.AbstractEventLoop
    runner: Any  # service.runner.JobRunner, imported in the worker only


# Per worker process and thread: Ray and Dask reuse their worker processes, and building
# an event loop, a Redis pool and the registry once per process keeps each job cheap.
_RUNTIMES: dict[tuple[int, int, WorkerConfig, str], _Runtime] = {}


def _new_runtime(config: WorkerConfig, engine: str) -> _Runtime:
    import redis as sync_redis

    from service.runner import JobRunner
    from service.store import connect

    loop = asyncio.new_event_loop()
    checker = sync_redis.Redis.from_url(config.redis_url, decode_responses=True)

    def is_cancelled(job_id: str) -> bool:
        # The job's own record says so: the cooperative cancel a Dask task (or a Ray task
        # that prefers to stop cleanly) polls through ``ctx.cancelled()``.
        try:
            return bool(checker.hget(keys.job(job_id), "state") == JobState.CANCELLED.value)
        except (sync_redis.RedisError, OSError):
            return False

    async def build() -> Any:
        store = JobStore(connect(config.redis_url), config.job_ttl_s)
        worker_id = f"{engine}-{socket.gethostname()}-{os.getpid()}"
        registry = Registry.load(config.task_modules)
        return JobRunner(store, registry, worker_id, inline_sync=True, is_cancelled=is_cancelled)

    return _Runtime(loop, loop.run_until_complete(build()))


def run_job_here(config: WorkerConfig, job_id: str, engine: str) -> str | None:
    """Run one attempt of ``job_id`` in this process; the state it ended in."""
    key = (os.getpid(), threading.get_ident(), config, engine)
    runtime = _RUNTIMES.get(key)
    if runtime is None:
        runtime = _RUNTIMES[key] = _new_runtime(config, engine)
    state = runtime.loop.run_until_complete(runtime.runner.run(job_id))
    return None if state is None else str(state.value)


def run_in_ray(config: WorkerConfig, job_id: str) -> str | None:
    """The Ray task every heavy job travels as."""
    return run_job_here(config, job_id, "ray")


# --- resources ---------------------------------------------------------------------------


def _resource_error() -> InvalidBody:
    return InvalidBody(
        f"options.{RESOURCES_OPTION} must be an object with num_cpus, num_gpus and/or memory "
        "(bytes), each a number of at least 0",
        {"allowed": list(RESOURCE_NAMES)},
    )


def check_resources(value: Any) -> dict[str, float]:
    """A resources mapping (a task's declaration or a job's option), checked."""
    if not isinstance(value, dict) or set(value) - set(RESOURCE_NAMES):
        raise _resource_error()
    for amount in value.values():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise _resource_error()
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
        #: Streams this engine's jobs travel on (the dispatcher widens it from the registry).
        self.queues: tuple[str, ...] = (HEAVY_QUEUE,)
        self.state = NOT_STARTED
        self.problem = ""
        self.dashboard: str | None = None
        self.connected = False
        self._lock: asyncio.Lock | None = None
        self._watch: asyncio.Task[None] | None = None
        self._inflight: dict[str, Any] = {}
        self._dropped: set[str] = set()

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
        return Dispatch("xadd", keys.stream(job.queue), job.id)

    async def cancel(self, job: Job) -> None:
        # The cancel transition publishes on keys.CANCEL; the dispatcher holding the job
        # cancels its ``run``, which interrupts the cluster task.
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
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.connected:
            await self._disconnect()
            self.connected = False

    # running jobs --------------------------------------------------------------------------

    async def run(self, job: Job, spec: TaskSpec | None, by_user: Callable[[str], bool]) -> None:
        """Run ``job`` on the cluster and wait until its runner has stored the outcome.

        Cancelling this coroutine because the user cancelled the job (``by_user``)
        interrupts the cluster task; a shutdown leaves it running, as its outcome reaches
        Redis without the gateway.
        """
        await self.ensure_started()
        handle = self._launch(job, spec)
        self._inflight[job.id] = handle
        try:
            await self._wait(handle)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling() == 0 and job.id in self._dropped:
                return  # the cluster future was dropped by a cancel while queued
            if by_user(job.id):
                self._interrupt(handle, running=True)
            raise
        except Exception:
            if job.id in self._dropped:
                return
            raise
        finally:
            self._inflight.pop(job.id, None)
            self._dropped.discard(job.id)

    def drop(self, job_id: str) -> None:
        """Drop the cluster task of a job cancelled while still queued."""
        handle = self._inflight.get(job_id)
        if handle is not None:
            self._dropped.add(job_id)
            self._interrupt(handle, running=False)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def ensure_started(self) -> None:
        """Start the local cluster or connect to the configured one, once."""
        if self.connected:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.connected:
                return
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

    def _launch(self, job: Job, spec: TaskSpec | None) -> Any:
        raise NotImplementedError

    async def _wait(self, handle: Any) -> None:
        raise NotImplementedError

    def _interrupt(self, handle: Any, running: bool) -> None:
        raise NotImplementedError


# --- Ray ---------------------------------------------------------------------------------


def ray_init_kwargs(engines: EngineSettings, temp_dir: str) -> dict[str, Any]:
    """``ray.init`` arguments for these settings (a local cluster uses ``temp_dir``)."""
    if engines.ray_address:
        return {"address": engines.ray_address}
    kwargs: dict[str, Any] = {
        "address": "local",
        "include_dashboard": engines.ray_dashboard,
        "_temp_dir": temp_dir,
        # Ray kills idle workers above one per CPU after 1 s; a fan-out job holds one more
        # (its coordinator), so every job after a pause would start processes again.
        "_system_config": {"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
    }
    if engines.ray_cpus:
        kwargs["num_cpus"] = engines.ray_cpus
    if engines.ray_dashboard:
        kwargs |= {"dashboard_host": "127.0.0.1", "dashboard_port": RAY_DASHBOARD_PORT}
    return kwargs


def start_ray(engines: EngineSettings, temp_dir: str, log_to_driver: bool = True) -> str | None:
    """Connect this process to Ray (blocking); the dashboard URL, if there is one.

    A process already connected keeps its connection.
    """
    # Ray 2.5x refuses to guess how a cluster authenticates; say it, unless the user did.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        url = None
        with contextlib.suppress(Exception):  # a private helper: no dashboard link is fine
            url = ray._private.worker.get_dashboard_url()  # type: ignore[no-untyped-call]  # ray
    else:
        context = ray.init(
            **ray_init_kwargs(engines, temp_dir),
            log_to_driver=log_to_driver,
            ignore_reinit_error=True,
        )
        url = getattr(context, "dashboard_url", None)
    if url and not str(url).startswith("http"):
        url = f"http://{url}"
    return str(url) if url else None


class RayEngine(ClusterEngine):
    """Heavy jobs as Ray tasks, with the resources their task (or the job) asks for."""

    name = "ray"
    default_port = 10001  # Ray Client's; a GCS address (host:6379) names its port

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        super().__init__(redis, settings, settings.engines.ray_address)
        self._remote: Any = None
        self._temp_dir: str | None = None
        self._owns_ray = False

    async def _connect(self) -> None:
        # A process already connected (a test session, an embedding program) keeps its Ray
        # and closes it itself.
        self._owns_ray = not _ray_initialized()
        if self._owns_ray and not self.address:
            # Short and our own: Ray's socket paths must stay under the 107-byte limit.
            self._temp_dir = tempfile.mkdtemp(prefix="cf-ray-", dir="/tmp")
        self.dashboard = await asyncio.to_thread(
            start_ray, self.settings.engines, self._temp_dir or tempfile.gettempdir()
        )
        import ray

        # Redelivery is corefleet's (the stream and the attempt count), not Ray's.
        self._remote = ray.remote(max_retries=0)(run_in_ray)

    async def _disconnect(self) -> None:
        if self._owns_ray:
            import ray

            await asyncio.to_thread(ray.shutdown)
            if self._temp_dir:
                shutil.rmtree(self._temp_dir, ignore_errors=True)

    def _launch(self, job: Job, spec: TaskSpec | None) -> Any:
        options = ray_options(spec.resources if spec else {}, job.options)
        return self._remote.options(name=f"{job.task}:{job.id}", **options).remote(
            self.config, job.id
        )

    async def _wait(self, handle: Any) -> None:
        await asyncio.wrap_future(handle.future())

    def _interrupt(self, handle: Any, running: bool) -> None:
        import ray

        # force=True kills the worker process (and, recursively, the job's child tasks):
        # the only way to stop Python code that does not poll ``ctx.cancelled()``.
        with contextlib.suppress(Exception):
            ray.cancel(handle, force=running, recursive=True)


def _ray_initialized() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def ray_banner(engines: EngineSettings) -> str:
    """The ``corefleet up`` line for Ray: local or remote, and the dashboard when on."""
    if engines.ray_address:
        return (
            f"  ray        remote, {engines.ray_address} (its dashboard: GET /v1/queues once "
            "connected)"
        )
    cpus = f"{engines.ray_cpus} CPUs" if engines.ray_cpus else "all CPUs"
    dashboard = (
        f"dashboard http://127.0.0.1:{RAY_DASHBOARD_PORT}"
        if engines.ray_dashboard
        else "dashboard off (COREFLEET_RAY_DASHBOARD=1)"
    )
    return f"  ray        local ({cpus}), started by the first heavy job; {dashboard}"


# --- the dispatcher ----------------------------------------------------------------------


class HeavyDispatcher:
    """The gateway's consumer of the heavy streams: each job goes to its cluster engine."""

    def __init__(
        self,
        redis: aioredis.Redis,
        store: JobStore,
        registry: Registry,
        engines: Mapping[str, Engine],
        settings: Settings,
    ) -> None:
        self.redis = redis
        self.store = store
        self.registry = registry
        self.engines: dict[str, ClusterEngine] = {
            name: engine for name, engine in engines.items() if isinstance(engine, ClusterEngine)
        }
        queues = {HEAVY_QUEUE} | {s.queue for s in registry if s.engine in self.engines}
        for engine in self.engines.values():
            engine.queues = tuple(sorted(queues))
        consumer_settings = IoWorkerSettings(
            queues=tuple(sorted(queues)),
            concurrency=DISPATCH_CONCURRENCY,
            lease_s=settings.io.lease_s,
        )
        self.consumer = StreamConsumer(redis, self.execute, consumer_settings)
        #: Set to stop taking jobs; running ones get the grace period of ``run``.
        self.stop = asyncio.Event()

    async def prepare(self) -> None:
        """Create the heavy streams and their group, before the gateway takes requests."""
        for queue in self.consumer.settings.queues:
            await ensure_group(self.redis, queue)

    async def execute(self, job_id: str) -> None:
        job = await self.store.get(job_id)
        if job is None or job.state.terminal:
            return  # expired, finished or cancelled before it left the stream
        engine = self.engines.get(job.engine)
        if engine is None:
            log.error("job %s names engine %s, which this gateway lacks", job_id, job.engine)
            return
        await engine.run(job, self.registry.get(job.task), self.consumer.is_cancelled)

    async def run(self, stop: asyncio.Event, grace_s: float = 5.0) -> None:
        listener = asyncio.create_task(listen(self.redis, keys.EVENTS, self._on_event))
        try:
            await self.consumer.run(stop, grace_s)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    def _on_event(self, data: str) -> None:
        # Cheap filters first: this sees every state change of every job.
        if '"cancelled"' not in data or not any(e.inflight for e in self.engines.values()):
            return
        event = json.loads(data)
        if event.get("from") in (JobState.QUEUED.value, JobState.RETRYING.value):
            for engine in self.engines.values():
                engine.drop(str(event.get("id")))
