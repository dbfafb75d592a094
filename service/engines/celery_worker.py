"""``corefleet worker``: a Celery prefork worker whose one task calls the job runner.

Each child process gets its own event loop, Redis connection and runner when it starts
(``worker_process_init``); the task then runs the runner to completion on that loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

from service.engines.celery_ import CELERY_TASK, make_celery_app
from service.jobs import JobError
from service.runner import JobRunner
from service.settings import Settings
from service.store import JobStore, connect
from tasks import Registry

log = logging.getLogger("corefleet.worker")


@dataclass
class _Child:
    """What one worker child process runs jobs with."""

    loop: asyncio.AbstractEventLoop
    runner: JobRunner


def build_worker_app(settings: Settings) -> Any:
    """The Celery app with corefleet's task registered, as a worker runs it."""
    from celery import Task
    from celery.exceptions import TimeLimitExceeded
    from celery.signals import worker_process_init, worker_process_shutdown

    app = make_celery_app(settings)
    child: dict[str, _Child] = {}  # this process's runtime, made after the fork

    def make_child() -> _Child:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        store = JobStore(connect(settings.redis), settings.job_ttl_s)
        name = f"celery-{os.uname().nodename}-{os.getpid()}"
        runner = JobRunner(
            store, Registry.load(settings.task_modules), worker_id=name, inline_sync=True
        )
        return _Child(loop, runner)

    @worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]  # celery
    def _init_child(**_: Any) -> None:
        child["now"] = make_child()

    @worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]  # celery
    def _close_child(**_: Any) -> None:
        current = child.pop("now", None)
        if current is not None:
            current.loop.run_until_complete(current.runner.store.redis.aclose())
            current.loop.close()

    class JobTask(Task):  # type: ignore[misc]  # celery ships no type information
        """Records what kills a job from outside the runner (the hard time limit)."""

        def on_failure(
            self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
        ) -> None:
            # Runs in the worker's main process after it replaced the child; a lost child
            # (WorkerLostError) is not recorded: the message is requeued and runs again.
            if isinstance(exc, TimeLimitExceeded):
                error = JobError(
                    "TimeLimitExceeded", f"the job ran past its {exc.args[0]} s time limit"
                )
                asyncio.run(_record_failure(settings, str(args[0]), error))

    @app.task(name=CELERY_TASK, base=JobTask, ignore_result=True)  # type: ignore[untyped-decorator]
    def run_job(job_id: str) -> None:
        current = child.get("now")
        if current is None:  # the solo pool runs tasks in the main process
            current = child["now"] = make_child()
        current.loop.run_until_complete(current.runner.run(job_id))

    return app


async def _record_failure(settings: Settings, job_id: str, error: JobError) -> None:
    redis = connect(settings.redis)
    try:
        await JobStore(redis, settings.job_ttl_s).fail(job_id, error)
    finally:
        await redis.aclose()


def run_worker(
    settings: Settings,
    *,
    queues: tuple[str, ...],
    concurrency: int,
    max_tasks_per_child: int = 0,
    max_memory_per_child_kb: int = 0,
) -> None:
    # Numba's on-disk cache, shared by every child, so a kernel compiles once per host.
    os.environ.setdefault("NUMBA_CACHE_DIR", str((settings.data_dir / "numba-cache").resolve()))
    app = build_worker_app(settings)
    argv = [
        "worker",
        "--pool",
        "prefork",
        "--queues",
        ",".join(queues),
        "--concurrency",
        str(concurrency or os.cpu_count() or 1),
        "--loglevel",
        settings.log_level,
        "--events",
        "--hostname",
        f"corefleet-{'-'.join(queues)}-{os.getpid()}@%h",
        "--without-mingle",
        "--without-gossip",
    ]
    if max_tasks_per_child:
        argv += ["--max-tasks-per-child", str(max_tasks_per_child)]
    if max_memory_per_child_kb:
        argv += ["--max-memory-per-child", str(max_memory_per_child_kb)]
    app.worker_main(argv)
