"""Ray's dispatcher: a detached actor that launches heavy jobs from inside the cluster.

Ray ties a task to the process that submitted it (its owner): when the owner exits, Ray
kills the task. Were the gateway to launch Ray jobs itself, restarting it would kill every
running Ray job. So gateways only store jobs and add them to Ray's streams, and one
detached actor per Redis (named after its URL) reads those streams with a
``HeavyDispatcher`` and launches each job as a Ray task it owns (or calls a warm runner, an
actor it owns, with it: ``ray_runners.py``). The actor lives as long
as the cluster; the runner inside each task writes the outcome to Redis; the actor
acknowledges the entry. A gateway (through its Ray keeper, ``ray_keeper.py``) starts the
actor, or finds it, with the first Ray job, and hands it its settings again every few
seconds: the actor serves the task modules of every gateway, and an actor lost with its
node is started again.

The actor hands Ray only as many jobs as the cluster can start soon (``in_flight_for``):
Ray runs the tasks it holds in its own order, so the rest wait on corefleet's streams,
where their priorities order them. It sizes that to the cluster each time it is served.

Redelivery stays corefleet's: if the actor dies, its unacknowledged entries are claimed by
its successor after the lease. An actor running another corefleet version than the gateway
(an upgrade) is replaced; the jobs it was running run again.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.metadata
import logging
import time
from dataclasses import replace
from typing import Any

from service.settings import Settings

log = logging.getLogger("corefleet.ray")

#: The Ray namespace corefleet's detached actors live in.
NAMESPACE = "corefleet"
#: How long a gateway waits for the actor to start and answer.
START_TIMEOUT_S = 120.0
#: How long a gateway waits for a running actor to answer (it is asked every few seconds).
ANSWER_TIMEOUT_S = 10.0
#: Jobs handed to Ray per CPU of the cluster (unless ``COREFLEET_RAY_IN_FLIGHT`` says): one
#: running on each CPU and three ready to start, so that short jobs keep the CPUs busy
#: while the dispatcher hands over the next (two per CPU cost a fifth of the throughput of
#: no-op jobs; four, a tenth); a high job waits behind at most those.
IN_FLIGHT_PER_CPU = 4
#: Jobs handed to Ray however few CPUs it reports (a cluster scaled to none has some soon).
MIN_IN_FLIGHT = 8
#: How long a gateway's ask counts after it was made: three of its keeper's serves.
ASK_COUNTS_S = 15.0


def in_flight_for(cpus: float, configured: int) -> int:
    """How many jobs the dispatcher keeps handed to a Ray cluster of ``cpus`` CPUs."""
    from service.engines.cluster import DISPATCH_CONCURRENCY

    if configured > 0:
        return configured
    return max(MIN_IN_FLIGHT, min(DISPATCH_CONCURRENCY, int(IN_FLIGHT_PER_CPU * cpus)))


@functools.cache  # asked on every serve, every few seconds per gateway
def corefleet_version() -> str:
    try:
        return importlib.metadata.version("corefleet")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


class RecentLowest:
    """The lowest of the values gateways asked for within ``ASK_COUNTS_S``.

    Gateways of one deployment may be set apart (a rolling deploy, one set by hand): were
    the last to call to win, the setting would change every few seconds, each time ending
    runners or holding back jobs. The lowest is the safe one, and a value no gateway asks
    for any more stops counting soon after.
    """

    def __init__(self) -> None:
        self._asked: dict[int, float] = {}

    def ask(self, value: int, now: float) -> int:
        self._asked[value] = now
        for old in [v for v, at in self._asked.items() if now - at > ASK_COUNTS_S]:
            del self._asked[old]
        return min(self._asked)


def actor_name(redis_url: str) -> str:
    """One dispatcher per Redis: gateways of one deployment share it."""
    return "corefleet-dispatcher-" + hashlib.sha256(redis_url.encode()).hexdigest()[:12]


class RayDispatcherActor:
    """The actor's body (made a Ray actor class by ``ensure_dispatcher``)."""

    def __init__(self) -> None:
        # Ray keeps the actor's stderr in its worker log: say what the dispatcher does there.
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._dispatcher: Any = None  # HeavyDispatcher, imported inside Ray only
        self._engine: Any = None  # its RayEngine
        self._lease_s = 0.0
        self._modules: tuple[str, ...] = ()
        self._in_flight = RecentLowest()
        self._warm_runners = RecentLowest()

    async def serve(self, settings: Settings) -> dict[str, Any]:
        """Dispatch for a gateway with ``settings``: idempotent, as every gateway calls it
        now and then.

        Gateways differ in ports and hosts; only what the dispatcher uses counts. It
        serves the task modules of every gateway that called (a rolling deploy adds
        modules before all gateways have them), taken in place. A new stream or lease
        starts a new loop; the old one stops reading and finishes the jobs it holds.
        """
        async with self._lock:  # gateways call concurrently
            # Each time: the cluster may have grown.
            resources = await asyncio.to_thread(_cluster_resources)
            await self._serve(settings)
            # No await since ``_serve`` returned: a loop it just started has not read yet.
            now = time.monotonic()
            in_flight = in_flight_for(resources.get("CPU", 0), settings.engines.ray_in_flight)
            self._hand_ray(self._in_flight.ask(in_flight, now))
            # A local cluster (no address) never grows: a job no node of it fits fails.
            self._engine.capacity = None if settings.engines.ray_address else resources
            warm_runners = self._warm_runners.ask(settings.engines.ray_warm_runners, now)
            self._engine.runners.resize(warm_runners, resources)
            return self.info()

    def _hand_ray(self, in_flight: int) -> None:
        """From now on, keep up to ``in_flight`` jobs handed to Ray."""
        consumer = self._dispatcher.consumer
        if consumer.settings.concurrency != in_flight:
            log.info("handing Ray up to %d jobs at once", in_flight)
            consumer.settings = replace(consumer.settings, concurrency=in_flight)

    async def _serve(self, settings: Settings) -> None:
        from service.engines.cluster import queues_of
        from service.worker_runtime import WorkerConfig

        modules = tuple(dict.fromkeys((*self._modules, *settings.task_modules)))
        config = WorkerConfig(settings.redis, settings.job_ttl_s, modules)
        lease_s = settings.io.lease_s
        if self.serving and (config, lease_s) == (self._engine.config, self._lease_s):
            return
        registry = _registry(modules)
        self._modules = modules
        if (
            self.serving
            and lease_s == self._lease_s
            and set(queues_of(registry, "ray")) <= set(self._engine.queues)
        ):
            self._dispatcher.registry = registry
            self._engine.use(config)
            return
        if self.serving:
            log.warning("Ray's streams or lease changed; dispatching with a new loop")
        dispatcher = await self._build(settings, registry)
        self._retire()
        if self._engine is not None:
            # One pool of warm runners: the old loop's busy ones count against its limits
            # and are free for the new loop's jobs once their own have ended.
            dispatcher.engines["ray"].runners = self._engine.runners
        self._dispatcher, self._engine = dispatcher, dispatcher.engines["ray"]
        self._engine.use(config)
        self._lease_s = lease_s
        self._stop = asyncio.Event()
        self._loop_task = asyncio.create_task(dispatcher.run(self._stop, grace_s=None))

    @property
    def serving(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def info(self) -> dict[str, Any]:
        consumer = self._dispatcher.consumer if self._dispatcher is not None else None
        return {
            "serving": self.serving,
            "held": consumer.held if consumer is not None else 0,
            "in_flight": consumer.settings.concurrency if consumer is not None else 0,
            "modules": list(self._modules),
            "version": corefleet_version(),
        }

    def _retire(self) -> None:
        """Stop the current loop reading; it keeps renewing the leases of the jobs it
        holds and acknowledges them as they end, so none of them runs twice."""
        if self._loop_task is None:
            return
        self._stop.set()
        self._retiring.add(self._loop_task)
        self._loop_task.add_done_callback(self._retiring.discard)
        self._loop_task = None

    async def _build(self, settings: Settings, registry: Any) -> Any:
        from service.engines.cluster import HeavyDispatcher
        from service.engines.ray_ import RayEngine
        from service.store import JobStore, connect

        redis = connect(settings.redis)
        engine = RayEngine(redis, settings, in_cluster=True)
        store = JobStore(redis, settings.job_ttl_s)
        dispatcher = HeavyDispatcher(redis, store, registry, {"ray": engine}, settings)
        await dispatcher.prepare()
        return dispatcher


def _cluster_resources() -> dict[str, float]:
    """What the Ray cluster this process is connected to has of each resource (blocking)."""
    import ray

    resources = ray.cluster_resources()  # type: ignore[no-untyped-call]  # untyped in ray
    return {name: float(amount) for name, amount in resources.items()}


def _registry(modules: tuple[str, ...]) -> Any:
    """The tasks this actor can import. It needs them only for their declared resources and
    time limits: a job whose module fails to import here runs without them, and fails in
    its Ray task with the import's own error."""
    from tasks import Registry

    registry = Registry.load_available(modules)
    for name, exc in registry.import_errors.items():
        log.error("cannot import task module %s here: %s: %s", name, type(exc).__name__, exc)
    return registry


_ACTOR_CLASS: Any = None


def ensure_dispatcher(settings: Settings, timeout_s: float = START_TIMEOUT_S) -> Any:
    """Start or find the dispatcher for ``settings.redis`` and have it serve (blocking)."""
    global _ACTOR_CLASS
    import ray

    if _ACTOR_CLASS is None:
        _ACTOR_CLASS = ray.remote(RayDispatcherActor)
    for _attempt in range(2):
        handle = _ACTOR_CLASS.options(
            name=actor_name(settings.redis),
            namespace=NAMESPACE,
            lifetime="detached",  # it outlives the gateway that started it
            get_if_exists=True,
            num_cpus=0,  # it waits on Redis and Ray; the CPUs are for the jobs
            max_restarts=-1,
        ).remote()
        info = ray.get(handle.serve.remote(settings), timeout=timeout_s)
        theirs = str(info.get("version"))
        if not _older(theirs, corefleet_version()):
            return handle
        # An actor of an older corefleet: its code is not this gateway's.
        log.warning("replacing Ray's dispatcher of corefleet %s", theirs)
        ray.kill(handle, no_restart=True)
        _wait_gone(ray, actor_name(settings.redis))
    raise RuntimeError("Ray's dispatcher keeps running another corefleet version")


def _older(theirs: str, ours: str) -> bool:
    """Whether a dispatcher of corefleet ``theirs`` gives way to a gateway of ``ours``: only
    an older one does. Gateways of two versions side by side (a rolling deploy) would
    otherwise replace each other's dispatcher in turn, each time killing every Ray job it
    runs; a newer dispatcher serves an older gateway's jobs as well. Versions that do not
    compare (a source tree's "unknown") give way when they differ."""
    try:
        return _release(theirs) < _release(ours)
    except ValueError:
        return theirs != ours


def _release(version: str) -> tuple[int, ...]:
    """``"1.2.3"`` as ``(1, 2, 3)``; ValueError for anything else."""
    return tuple(int(part) for part in version.split("."))


def _wait_gone(ray: Any, name: str) -> None:
    """Until the killed actor's name is free again (Ray frees it once the actor is dead)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.1)  # Ray has no wait for an actor's death by name
