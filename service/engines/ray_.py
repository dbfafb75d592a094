"""The Ray engine: heavy jobs run the job runner inside a Ray task.

Ray starts on first use: ``COREFLEET_RAY_ADDRESS`` names an existing cluster, otherwise a
local one starts (``address="local"``, its own temp dir, dashboard only when asked).
``import ray`` happens only in the processes that are connected to Ray: Ray's keeper, the
dispatcher actor and the worker processes; never in the gateway.

The engine has two sides. In the gateway it queues Ray jobs and, once a Ray stream holds a
job, starts Ray's keeper (``ray_keeper.py``): the child process that starts or connects to
Ray and keeps Ray's dispatcher (a detached actor, ``ray_dispatcher.py``) serving. The
gateway itself is never connected to Ray, so a Ray that dies cannot end it, and it never
launches a job itself, so a gateway restart leaves running Ray jobs alone. Inside the
actor (``in_cluster``) the engine launches each job as a Ray task (or hands it to a warm
runner), waits for it and interrupts it.

Where jobs of one shape (the resources they ask for) follow each other, the dispatcher
calls a warm runner, an actor of that shape, instead of launching a task
(``ray_runners.py``): a task waits for a worker lease every time, an actor call does not.

Cancel: a queued job never starts (the runner refuses a cancelled job, and a Ray task
still waiting for a CPU is dropped); a running one is killed with
``ray.cancel(force=True)``, child tasks included (in a warm runner, the runner is killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service import keys, presence
from service.engines.asyncio_ import consumer_name
from service.engines.cluster import (
    RAY_RESOURCES,
    REPROBE_S,
    UNREACHABLE,
    ClusterEngine,
    CouldNotRun,
    ray_options,
)
from service.engines.ray_keeper import keeper_spec
from service.engines.ray_runners import RunnerCall, WarmRunners, shape_of
from service.errors import EngineUnavailable
from service.jobs import Job, JobError, JobState
from service.runner import error_of
from service.settings import EngineSettings, Settings
from service.worker_runtime import WorkerConfig, run_job_here
from tasks import TaskSpec

log = logging.getLogger("corefleet.ray")

RAY_DASHBOARD_PORT = 8265
#: How long a local Ray keeps an idle worker process beyond one per CPU.
IDLE_WORKER_KEEP_MS = 60_000
#: Ray task flavours (task and resources) a dispatcher keeps ready; ``.options()`` costs
#: about as much as the submit itself.
MAX_FLAVOURS = 256
#: How long Ray's keeper may take to start Ray and its dispatcher.
KEEPER_START_TIMEOUT_S = 180.0
#: How long Ray's keeper may take to stop a local Ray before it is killed.
KEEPER_STOP_S = 30.0


def ray_task_for(config: WorkerConfig) -> Callable[[str, str], str | None]:
    """The Ray task every heavy job travels as, its config built in: Ray ships the config
    once with the function rather than with every job."""

    def run_in_ray(job_id: str, entry: str) -> str | None:
        return run_job_here(config, job_id, "ray", entry)

    return run_in_ray


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
    # Under `uv run`, Ray would start each worker through `uv run` again (re-resolving the
    # environment, even re-running the command line); corefleet's workers already share
    # this process's environment, so turn that off unless the user asked for it.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
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

    def __init__(
        self, redis: aioredis.Redis, settings: Settings, *, in_cluster: bool = False
    ) -> None:
        # Inside the cluster there is no address to probe: Ray is this process's own.
        super().__init__(redis, settings, "" if in_cluster else settings.engines.ray_address)
        #: True inside the dispatcher actor, where Ray is this process's own.
        self.in_cluster = in_cluster
        #: What a local cluster has of each Ray resource (CPU, GPU, memory), which does not
        #: grow; None for a cluster at an address (it may add nodes).
        self.capacity: dict[str, float] | None = None
        self._remote: Any = None
        self._flavours: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
        self._keeper: asyncio.subprocess.Process | None = None
        #: The worker name this gateway checks in under until Ray's dispatcher runs.
        self._stand_in = f"ray-on-demand-{consumer_name()}"
        #: Inside the dispatcher: the actors kept between jobs of a shape.
        self.runners = WarmRunners(
            settings.engines.ray_warm_runners, settings.engines.ray_task_events
        )

    # the gateway's side ---------------------------------------------------------------------

    async def keep_dispatching(self, stop: asyncio.Event) -> None:
        """Start Ray's keeper once a Ray stream holds a job; start it again if it ends.

        Runs in the gateway until ``stop``. Waiting jobs are enough to start: a job queued
        by a producer, or left by a gateway whose local Ray stopped with it.
        """
        standing_in = asyncio.create_task(self._stand_in_for_dispatcher(stop))
        try:
            while not stop.is_set():
                pause = 0.0
                try:
                    if self.connected:
                        await self._watch_keeper(stop)
                        continue
                    if self.state != UNREACHABLE and await self._jobs_waiting():
                        await self.ensure_started()
                        continue
                    pause = REPROBE_S if self.state == UNREACHABLE else 0.0
                except EngineUnavailable as exc:
                    log.warning("%s", exc)
                    pause = REPROBE_S
                except (RedisError, OSError) as exc:
                    log.warning("cannot watch the Ray streams (%s); retrying", exc)
                    pause = 1.0
                if pause:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
        finally:
            standing_in.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await standing_in

    async def _stand_in_for_dispatcher(self, stop: asyncio.Event) -> None:
        """Until ``stop``: while no Ray dispatcher serves Ray's queues, check in as a worker
        of them, since this gateway starts one as soon as a job waits; so a job that asks
        for a live worker (``require_worker``) is taken, as it is for Dask's dispatcher in
        the gateway. Not while Ray is unreachable from here, nor once a dispatcher runs."""
        checked_in = False
        try:
            while not stop.is_set():
                try:
                    if self.state != UNREACHABLE and not await self._dispatcher_live():
                        checked_in = True  # before the call: a cancel may cut it short
                        info = {"kind": "ray-on-demand", "queues": list(self.queues)}
                        await presence.check_in(self.redis, self._stand_in, self.queues, info)
                    elif checked_in:
                        await presence.leave(self.redis, self._stand_in, self.queues)
                        checked_in = False
                except (RedisError, OSError) as exc:
                    log.warning("cannot check in for Ray's queues (%s)", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), presence.PERIOD_S)
        finally:
            if checked_in:
                with contextlib.suppress(RedisError, OSError):
                    await presence.leave(self.redis, self._stand_in, self.queues)

    async def _dispatcher_live(self) -> bool:
        """Whether a Ray dispatcher (of any gateway) has checked in for Ray's queues."""
        workers = await presence.live(self.redis, self.queues[0])
        return any(worker.get("kind") == "dispatcher" for worker in workers)

    async def _watch_keeper(self, stop: asyncio.Event) -> None:
        """Until ``stop``, or until the keeper ends: then Ray is unreachable (its jobs get a
        503) until it answers again, and the next Ray job starts a new keeper."""
        keeper = self._keeper
        assert keeper is not None
        stopping = asyncio.ensure_future(stop.wait())
        ending = asyncio.ensure_future(keeper.wait())
        try:
            await asyncio.wait((stopping, ending), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            ending.cancel()
        if keeper.returncode is not None and not stop.is_set():
            self.connected = False
            self._keeper = None
            self._mark_unreachable(
                f"Ray's keeper ended (exit code {keeper.returncode}): the Ray cluster went "
                "away or ended it"
            )

    async def _jobs_waiting(self) -> bool:
        # XREAD from the start blocks until a stream holds an entry, waiting or pending,
        # without taking it from the dispatcher's group.
        streams: dict[Any, Any] = {
            stream: "0-0" for queue in self.queues for stream in keys.streams(queue)
        }
        return bool(await self.redis.xread(streams, count=1, block=1000))

    # both sides -------------------------------------------------------------------------------

    async def _connect(self) -> None:
        if self.in_cluster:
            # The dispatcher actor: Ray is this process's own.
            self.dashboard = await asyncio.to_thread(start_ray, self.settings.engines, "")
            self.use(self.config)
            return
        keeper = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.engines.ray_keeper",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert keeper.stdin is not None and keeper.stdout is not None
        try:
            # stdin stays open: the keeper stops when it closes, with this process.
            keeper.stdin.write(json.dumps(keeper_spec(self.settings)).encode() + b"\n")
            await keeper.stdin.drain()
            line = await asyncio.wait_for(keeper.stdout.readline(), KEEPER_START_TIMEOUT_S)
            answer = json.loads(line) if line else {}
        except BaseException:
            await _stop_process(keeper)
            raise
        if "error" in answer or not line:
            await _stop_process(keeper)
            raise RuntimeError(answer.get("error") or f"Ray's keeper exited ({keeper.returncode})")
        self._keeper = keeper
        self.dashboard = answer.get("dashboard")

    async def _disconnect(self) -> None:
        # A local Ray stops with its keeper, dispatcher and running jobs included; their
        # entries stay pending and run again once Ray is back.
        if self._keeper is not None:
            await _stop_process(self._keeper)
            self._keeper = None

    # the dispatcher's side ----------------------------------------------------------------

    def use(self, config: WorkerConfig) -> None:
        """Launch jobs with ``config`` from now on (new task modules, say)."""
        import ray

        self.config = config
        self._remote = ray.remote(ray_task_for(config))
        self._flavours.clear()
        self.runners.use(config)

    async def _launch(self, job: Job, spec: TaskSpec | None) -> Any:
        options = ray_options(spec.resources if spec else {}, job.options)
        self._check_feasible(options)
        call = await self.runners.call(shape_of(options), job.id, job.task, job.entry)
        if call is not None:
            return InRunner(call, job, options)
        return self._as_task(job, options)

    def _as_task(self, job: Job, options: dict[str, Any]) -> Any:
        """Launch ``job`` as a Ray task with these resources; its ObjectRef."""
        flavour = (job.task, tuple(sorted(options.items())))
        remote = self._flavours.get(flavour)
        if remote is None:
            if len(self._flavours) >= MAX_FLAVOURS:
                self._flavours.clear()
            # Named after the task, so Ray's dashboard and logs say what runs. Redelivery is
            # corefleet's (the stream and the attempt count), not Ray's; so is the record
            # of each job: Ray's own (task events) is off unless asked for.
            try:
                remote = self._remote.options(
                    name=job.task,
                    max_retries=0,
                    enable_task_events=self.settings.engines.ray_task_events,
                    **options,
                )
            except (ValueError, TypeError) as exc:
                # Options Ray refuses would be refused again at every delivery: fail the job.
                raise CouldNotRun(JobError("InvalidResources", str(exc))) from exc
            self._flavours[flavour] = remote
        return remote.remote(job.id, job.entry)

    async def _runs_anew(self, job: Job) -> bool:
        return True  # a lost owner's tasks die with it: every launch runs a new task

    def _check_feasible(self, options: dict[str, Any]) -> None:
        """Fail a job no node of a local cluster could ever start: Ray would hold it for
        good (it waits for a node that fits, which only an autoscaling cluster adds)."""
        if self.capacity is None:
            return
        short = {
            name: amount
            for name, amount in options.items()
            if amount > self.capacity.get(RAY_RESOURCES[name], 0)
        }
        if short:
            asked = ", ".join(f"{name} {amount:g}" for name, amount in short.items())
            has = ", ".join(
                f"{name} {self.capacity.get(RAY_RESOURCES[name], 0):g}" for name in short
            )
            raise CouldNotRun(
                JobError(
                    "Infeasible",
                    f"the job asks for {asked}; the local Ray cluster has {has}, so it could "
                    "never start",
                )
            )

    async def _wait(self, handle: Any) -> None:
        from ray.exceptions import RayTaskError

        try:
            if isinstance(handle, InRunner):
                await self._wait_in_runner(handle)
            else:
                await asyncio.wrap_future(handle.future())
        except RayTaskError as exc:
            # The Ray task itself raised (the runner catches a task's own errors), e.g. the
            # worker cannot import the task's module. A lost worker raises other errors and
            # the job is delivered again.
            raise CouldNotRun(error_of(getattr(exc, "cause", None) or exc)) from exc

    async def _wait_in_runner(self, handle: InRunner) -> None:
        """Wait for a job handed to a warm runner; should the runner turn out to have died
        before the job began (while it was idle), run the job as a Ray task instead."""
        from ray.exceptions import ActorDiedError

        try:
            # Shielded: a cancelled wait leaves the runner to finish (or be killed).
            await asyncio.shield(handle.call.done)
            return
        except ActorDiedError:
            # Dead for good (an actor only unreachable for now might still run the call).
            # Begun in it: lost with it, so delivered again, as a lost task's worker is.
            if not await self._never_began(handle.job):
                raise
        log.warning("job %s: its warm runner had died; it goes as a Ray task", handle.job.id)
        handle.task = self._as_task(handle.job, handle.options)
        await self._wait(handle.task)

    async def _never_began(self, job: Job) -> bool:
        """Whether the record says ``job`` has not begun since its launch: ``queued`` (no
        attempt ever began), or not ended and still naming the attempt it named at launch,
        where that was read (jobs with a time limit). Every begin names a new attempt; a
        ``retrying`` job names the attempt that asked for the retry, so it counts as begun
        unless that attempt is the one named at launch."""
        record = keys.job(job.id)
        state, attempt = await self.redis.hmget(record, ["state", "attempt_id"])  # type: ignore[misc]
        if state == JobState.QUEUED.value:
            return True
        before = self._attempt_before.get(job.id)
        ended = state is None or JobState(state).terminal
        return not ended and before is not None and str(attempt or "") == before

    def _interrupt(self, handle: Any, running: bool) -> None:
        import ray

        if isinstance(handle, InRunner):
            if handle.task is not None:  # it went as a task after all
                self._interrupt(handle.task, running)
            elif running:
                # A job that has not begun is refused by its runner's ``begin``; Ray refuses
                # force=True for actor tasks, so a running one goes with its runner.
                self.runners.kill(handle.call)
            return
        # force=True kills the worker process (and, recursively, the job's child tasks):
        # the only way to stop Python code that does not poll ``ctx.cancelled()``.
        with contextlib.suppress(Exception):
            ray.cancel(handle, force=running, recursive=True)


@dataclass(eq=False)
class InRunner:
    """A job handed to a warm runner: the handle ``RayEngine`` waits on and interrupts."""

    call: RunnerCall
    job: Job
    #: Its Ray resources, should it have to go as a task.
    options: dict[str, Any]
    #: The Ray task that runs it instead, where the runner had died before it began.
    task: Any = None


async def _stop_process(proc: asyncio.subprocess.Process) -> None:
    """Ask a child to stop (SIGTERM), then kill it if it lingers."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), KEEPER_STOP_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()


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
