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
#: How long a Dask task past its time limit has to return by itself once ``ctx.cancelled()``
#: says so, before its worker process is restarted (Dask cannot stop a thread; a worker
#: left running it would take no other job until it ended, if ever).
STOP_GRACE_S = 5.0


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
        self._stops: set[asyncio.Task[None]] = set()

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
        for stop in list(self._stops):  # best effort: the worker goes with the cluster, or
            stop.cancel()  # the task ends by itself
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

    def _stop_overdue(self, handle: Any) -> None:
        stop = asyncio.ensure_future(self._stop_past_limit(handle))
        self._stops.add(stop)
        stop.add_done_callback(self._stops.discard)

    async def _stop_past_limit(self, handle: Any) -> None:
        """Cancel the task (``ctx.cancelled()`` turns true); if its worker still runs it
        after ``STOP_GRACE_S``, restart that worker (through its nanny)."""
        key = handle.key
        try:
            processing = await self._client.processing()
            holders = [worker for worker, keys in processing.items() if key in keys]
            await self._client.cancel([handle], force=True)
            if not holders:
                return  # it had not started: cancelled, it never will
            await asyncio.sleep(STOP_GRACE_S)
            runs = await self._client.run(_still_runs, key, workers=holders, on_error="ignore")
            stuck = [worker for worker, still in runs.items() if still is True]
            if stuck:
                log.warning("%s ran on past its time limit; restarting worker %s", key, stuck)
                await self._client.restart_workers(stuck, raise_for_error=False)
        except Exception as exc:  # best effort: the job has failed either way
            log.warning("could not stop %s past its time limit: %s", key, exc)

    def _interrupt(self, handle: Any, running: bool) -> None:
        # Frees a queued task; a running one finishes in its thread (see the module doc).
        # Forced: the task is wanted by fire_and_forget too.
        task = asyncio.ensure_future(self._client.cancel([handle], force=True))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)


def _still_runs(key: str, dask_worker: Any) -> bool:
    """On a Dask worker (by ``Client.run``): whether a thread of it still runs ``key``,
    released by the scheduler or not."""
    task = dask_worker.state.tasks.get(key)
    return task is not None and task.state in ("executing", "long-running", "cancelled")


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
