"""``corefleet worker``: a Celery prefork worker whose one task calls the job runner.

Each child process gets its own event loop, Redis connection and runner when it starts
(``worker_process_init``); the task then runs the runner to completion on that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from typing import Any

import redis
from redis.exceptions import RedisError

from service import presence
from service.engines.celery_ import CELERY_TASK, make_celery_app
from service.gpus import Gpu, visible_gpus
from service.jobs import JobError
from service.settings import Settings
from service.store import JobStore, connect
from service.worker_runtime import WorkerConfig, run_job_here

log = logging.getLogger("corefleet.worker")

#: How long a child waits before it puts back a job Redis refused to record.
REQUEUE_PAUSE_S = 1.0


def build_worker_app(settings: Settings, gpus: list[Gpu] | None = None) -> Any:
    """The Celery app with corefleet's task registered, as a worker runs it.

    With ``gpus``, child ``i`` sees only ``gpus[i]``: its ``CUDA_VISIBLE_DEVICES`` is set
    as it starts, before any code in it can touch CUDA.
    """
    from billiard.process import current_process
    from celery import Task
    from celery.exceptions import Reject, TimeLimitExceeded
    from celery.signals import task_received, worker_process_init
    from celery.worker.request import Request
    from celery.worker.state import successful_requests, task_ready

    app = make_celery_app(settings)
    config = WorkerConfig.of(settings)

    @worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]  # celery
    def _init_child(**_: Any) -> None:
        if gpus:
            # A replaced child keeps its index, so it gets the same device back. Indexes are
            # nvidia-smi's, which orders devices by PCI bus; CUDA orders them fastest first
            # unless told, so on a host of mixed cards it would pick another card.
            os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus[current_process().index % len(gpus)].id

    @task_received.connect(weak=False)  # type: ignore[untyped-decorator]  # celery
    def _a_new_attempt(request: Any, **_: Any) -> None:
        # Every message of a job has the job's id as its Celery task id, and every attempt
        # ends as a Celery success (the runner records failures and retries itself). An
        # earlier attempt's id in Celery's set of successful requests would make a stopping
        # worker leave this one running rather than put it back on its queue.
        successful_requests.discard(request.id)

    class JobRequest(Request):  # type: ignore[misc]  # celery ships no type information
        """Records a hard time limit before the message is acknowledged.

        Celery acknowledges a job past its hard limit first and calls the task's failure
        hooks after: a record Redis refused then (out of memory, a read-only replica), or
        a worker stopped in between, left the job ``running`` with nothing to run it. Here
        the failure is stored first (in the worker's main process, after the child was
        replaced); if Redis refuses it, the message goes back on its queue instead, and
        the job runs again.
        """

        def on_failure(
            self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
        ) -> None:
            exc = getattr(exc_info.exception, "exc", exc_info.exception)  # unwrapped
            job_id = self.args[0] if self.args else (self.kwargs or {}).get("job_id")
            if isinstance(exc, TimeLimitExceeded) and isinstance(job_id, str):
                error = JobError(
                    "TimeLimitExceeded", f"the job ran past its {exc.args[0]} s time limit"
                )
                try:
                    asyncio.run(_record_failure(settings, job_id, error))
                except RedisError as refused:
                    log.warning(
                        "job %s: Redis refused its time limit (%s); requeued", job_id, refused
                    )
                    task_ready(self)
                    self.reject(requeue=True)
                    return
            super().on_failure(exc_info, send_failed_event, return_ok)

    class JobTask(Task):  # type: ignore[misc]  # celery ships no type information
        """The task every job travels as; its requests record hard time limits."""

        Request = JobRequest

    @app.task(name=CELERY_TASK, base=JobTask, ignore_result=True)  # type: ignore[untyped-decorator]
    def run_job(job_id: str) -> None:
        try:
            run_job_here(config, job_id, "celery")
        except RedisError as exc:
            # Redis answered with an error (out of memory, a failed save, a read-only
            # replica): the runner could not record the job. Acknowledging the message
            # would leave the job queued or running with nothing to run it: put it back,
            # after a pause, rather than retry at once against a Redis that refuses writes.
            log.warning("job %s: Redis refused a write (%s); requeued", job_id, exc)
            time.sleep(REQUEUE_PAUSE_S)  # back off from a Redis that refuses writes
            raise Reject(str(exc), requeue=True) from exc

    return app


async def _record_failure(settings: Settings, job_id: str, error: JobError) -> None:
    redis = connect(settings.redis, until_answered=True)  # the message waits on it
    try:
        await JobStore(redis, settings.job_ttl_s).fail(job_id, error)
    finally:
        await redis.aclose()


def worker_name(queues: tuple[str, ...]) -> str:
    return f"corefleet-{'-'.join(queues)}-{os.getpid()}@{os.uname().nodename}"


class _CheckIn(threading.Thread):
    """Tells Redis every few seconds that this worker lives, and what it runs on."""

    def __init__(
        self, settings: Settings, name: str, queues: tuple[str, ...], info: dict[str, Any]
    ) -> None:
        super().__init__(name="corefleet-check-in", daemon=True)
        self.client = redis.Redis.from_url(settings.redis, decode_responses=True)
        self.worker, self.queues, self.info = name, queues, info
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                presence.check_in_sync(self.client, self.worker, self.queues, self.info)
            except redis.RedisError as exc:
                log.warning("cannot check in (%s)", exc)
            self.stopped.wait(presence.PERIOD_S)

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(redis.RedisError):
            presence.leave_sync(self.client, self.worker, self.queues)
        self.client.close()


def run_worker(
    settings: Settings,
    *,
    queues: tuple[str, ...],
    concurrency: int,
    max_tasks_per_child: int = 0,
    max_memory_per_child_kb: int = 0,
    gpu: bool = False,
) -> None:
    # Numba's on-disk cache, shared by every child, so a kernel compiles once per host.
    os.environ.setdefault("NUMBA_CACHE_DIR", str((settings.data_dir / "numba-cache").resolve()))
    gpus = visible_gpus() if gpu else []
    if gpu:
        # One child per visible GPU, each pinned to its own; on a host with none, one child
        # that runs the CPU fallback (or fails jobs with NoGPU, as configured).
        concurrency = len(gpus) or 1
        os.environ["COREFLEET_GPU_FALLBACK"] = settings.engines.gpu_fallback
        log.warning(
            "gpu worker: %s; CPU fallback %s",
            ", ".join(f"{g.id} {g.name}" for g in gpus) or "no GPU visible",
            "on" if settings.engines.gpu_fallback == "cpu" else "off",
        )
    concurrency = concurrency or os.cpu_count() or 1
    app = build_worker_app(settings, gpus)
    name = worker_name(queues)
    argv = [
        "worker",
        "--pool",
        "prefork",
        "--queues",
        ",".join(queues),
        "--concurrency",
        str(concurrency),
        "--loglevel",
        settings.log_level,
        "--events",
        "--hostname",
        name,
        "--without-mingle",
        "--without-gossip",
    ]
    if max_tasks_per_child:
        argv += ["--max-tasks-per-child", str(max_tasks_per_child)]
    if max_memory_per_child_kb:
        argv += ["--max-memory-per-child", str(max_memory_per_child_kb)]
    info = {
        "kind": "celery",
        "queues": list(queues),
        "concurrency": concurrency,
        "gpus": [g.to_json() for g in gpus],
        "gpu_fallback": settings.engines.gpu_fallback if gpu else "",
    }
    _stop_by_putting_back(app, settings.celery.shutdown_grace_s)
    check_in = _CheckIn(settings, name, queues, info)
    check_in.start()
    try:
        app.worker_main(argv)
    finally:
        check_in.stop()


def _stop_by_putting_back(app: Any, grace_s: float) -> None:
    """SIGTERM (systemd, ``docker stop``, ``corefleet up``) lets running jobs go on for
    ``grace_s``, then stops them and puts their messages back on the queue: Celery's soft,
    then cold, shutdown. Celery's own SIGTERM (warm: wait for every job) ends in the
    SIGKILL that follows a grace period, and the killed job's message waited in kombu's
    unacked set for the whole visibility timeout (an hour) before running again.

    SIGTERM is taken so with ``REMAP_SIGTERM=SIGQUIT`` in the environment before Celery
    (billiard) is imported, which reads it then: ``corefleet worker`` sets it first thing."""
    from billiard.common import REMAP_SIGTERM

    if REMAP_SIGTERM != "SIGQUIT":
        log.warning(
            "REMAP_SIGTERM is %r, not SIGQUIT: on SIGTERM this worker waits for its running "
            "jobs, and a job it is killed in comes back only after the visibility timeout",
            REMAP_SIGTERM,
        )
    app.conf.worker_soft_shutdown_timeout = grace_s
