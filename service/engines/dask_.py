"""The Dask engine: tasks declared ``engine="dask"`` run the job runner on a Dask worker.

Dask jobs travel on streams of their own (``dask`` unless their task names another queue);
the gateway's ``HeavyDispatcher`` hands each to this engine, which submits one Dask task
per job through an asynchronous ``distributed.Client``: to ``COREFLEET_DASK_ADDRESS``, or to a
``LocalCluster`` (worker processes, one thread each) started by the first Dask job.

Cancel: a future still queued on the scheduler is cancelled and never runs. Dask cannot
stop a task that is running (its thread belongs to the worker), so a running Dask job is
cancelled cooperatively: its record says ``cancelled`` at once, the task sees
``ctx.cancelled()`` turn true (the worker reads the job's state from Redis) and should
return; whatever it returns afterwards is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
from typing import Any

import redis.asyncio as aioredis

from service.engines.cluster import ClusterEngine, CouldNotRun
from service.jobs import Job
from service.runner import error_of
from service.settings import EngineSettings, Settings
from service.worker_runtime import WorkerConfig, run_job_here
from tasks import TaskSpec

log = logging.getLogger("corefleet.dask")

DASK_DASHBOARD = "127.0.0.1:8787"


class SchedulerLost(Exception):
    """The scheduler dropped a job's task, not the job itself; it is delivered again."""


def run_in_dask(config: WorkerConfig, job_id: str, entry: str) -> str | None:
    """The Dask task every Dask job travels as."""
    return run_job_here(config, job_id, "dask", entry)


def _local_dashboard() -> str | None:
    # Dask serves its dashboard only with bokeh installed; without it, ask for none.
    return DASK_DASHBOARD if importlib.util.find_spec("bokeh") is not None else None


class DaskEngine(ClusterEngine):
    name = "dask"
    default_port = 8786

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        super().__init__(redis, settings, settings.engines.dask_address)
        self._client: Any = None
        self._cluster: Any = None
        self._cancels: set[asyncio.Task[Any]] = set()

    async def _connect(self) -> None:
        from distributed import Client, LocalCluster

        if self.address:
            # distributed ships partial annotations; its constructors have none.
            self._client = await Client(  # type: ignore[no-untyped-call]
                self.address, asynchronous=True, timeout=10
            )
        else:
            workers = self.settings.engines.dask_workers or os.cpu_count() or 1
            self._cluster = await LocalCluster(  # type: ignore[no-untyped-call]  # as above
                asynchronous=True,
                processes=True,
                n_workers=workers,
                threads_per_worker=1,
                # The scheduler serves HTTP even without a dashboard: a free port, never a
                # fixed one another process may hold.
                dashboard_address=_local_dashboard() or "127.0.0.1:0",
            )
            self._client = await Client(  # type: ignore[no-untyped-call]  # as above
                self._cluster, asynchronous=True
            )
        with contextlib.suppress(Exception):  # no dashboard is not an error
            services = self._client.scheduler_info().get("services", {})
            if "dashboard" in services:
                self.dashboard = str(self._client.dashboard_link)

    async def _disconnect(self) -> None:
        for task in list(self._cancels):
            with contextlib.suppress(Exception):
                await task
        if self._client is not None:
            await self._client.close()
        if self._cluster is not None:
            await self._cluster.close()

    async def _launch(self, job: Job, spec: TaskSpec | None) -> Any:
        from distributed import fire_and_forget

        if self._client.status == "connecting":
            # Reconnecting to a scheduler that went away: a task sent now would wait in
            # the client and be cancelled with it if the scheduler stays away. The job
            # waits on its stream instead.
            raise SchedulerLost("the client is reconnecting to Dask's scheduler")
        # Resources (num_cpus, ...) are Ray's: a Dask worker is one thread, one task.
        future = self._client.submit(
            run_in_dask,
            self.config,
            job.id,
            job.entry,
            # One key per queue entry: a dispatcher that takes the entry over from a
            # gateway that went away finds the task still there (see below) and waits for
            # it, rather than starting the job a second time; a retry comes by a new entry
            # and runs anew (under the same key Dask would hand back the finished task).
            key=_key(job),
            retries=0,
            # Of the tasks waiting in Dask, its scheduler runs the higher priority first.
            priority=DASK_PRIORITY[job.priority],
        )
        # The scheduler keeps the task when this client goes away, as its outcome reaches
        # Redis without us. Without this, a gateway's exit releases the task: a queued one
        # is dropped, and a running one, forgotten by the scheduler, runs on unseen while
        # the next dispatcher starts the job again.
        fire_and_forget(future)  # type: ignore[no-untyped-call]  # untyped in distributed
        return future

    async def _runs_anew(self, job: Job) -> bool:
        # The scheduler hands back a task it still holds under the entry's key (one a lost
        # gateway launched, still waiting or running); for a key it no longer holds (its
        # workers, or the scheduler itself, went with that gateway) the launch runs anew.
        key = _key(job)
        try:
            states = await self._client.scheduler.get_task_status(keys=[key])
        except Exception as exc:  # no answer: as before, the record's running counts
            log.warning("cannot ask Dask's scheduler about %s (%s)", key, exc)
            return False
        return states.get(key) is None

    async def _wait(self, handle: Any) -> None:
        from distributed import KilledWorker
        from distributed.client import FutureCancelledError

        try:
            await handle
        except (KilledWorker, asyncio.CancelledError):
            raise  # a lost worker: delivered again; a cancel: the caller's business
        except FutureCancelledError as exc:
            # Not this engine's cancel: for a job's cancel or time limit, nothing awaits the
            # future any more. So the scheduler or the client dropped it: the connection
            # was lost ("scheduler-connection-lost"), the client gave up reconnecting
            # ("unknown"), someone restarted the cluster ("scheduler-restart"). None of it
            # is the job's doing: it is delivered again.
            raise SchedulerLost(f"Dask dropped the job's task: {exc}") from exc
        except Exception as exc:
            raise CouldNotRun(error_of(exc)) from exc

    def _alive(self) -> bool:
        # The client gives up and closes after failing to reconnect for its timeout.
        return self._client is not None and self._client.status not in ("closing", "closed")

    def _interrupt(self, handle: Any, running: bool) -> None:
        # Frees a queued task; a running one finishes in its thread (see the module doc).
        # Forced: the task is wanted by fire_and_forget too.
        task = asyncio.ensure_future(self._client.cancel([handle], force=True))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)


def _key(job: Job) -> str:
    """The Dask key of a job's delivery: one per queue entry (see ``_launch``)."""
    return f"{job.task}-{job.id}-{job.entry}"


#: Dask's priority (higher runs first) for each corefleet priority level.
DASK_PRIORITY = {"high": 1, "normal": 0, "low": -1}


def dask_banner(engines: EngineSettings) -> str:
    """The ``corefleet up`` line for Dask: local or remote, and the dashboard when on."""
    if engines.dask_address:
        return (
            f"  dask       remote, scheduler {engines.dask_address} (its dashboard: "
            "GET /v1/queues once connected)"
        )
    workers = f"{engines.dask_workers} workers" if engines.dask_workers else "a worker per core"
    dashboard = _local_dashboard()
    shown = f"dashboard http://{dashboard}" if dashboard else "dashboard off (needs bokeh)"
    return f"  dask       local LocalCluster ({workers}), started by the first dask job; {shown}"
