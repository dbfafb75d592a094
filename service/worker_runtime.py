"""The job runner inside a worker process of Celery, Ray or Dask.

Those engines reuse their worker processes, so each process (and thread) builds its event
loop, Redis pool, registry and runner once, on its first job, and keeps them.
``ctx.cancelled()`` there reads the job's own record: the cooperative stop a Dask task
(or any long task that prefers to stop cleanly) polls. It turns true once the record no
longer says ``running``: the job was cancelled, or failed past its time limit.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

from service import keys
from service.jobs import JobState
from service.settings import Settings
from service.store import JobStore
from tasks import Registry


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
        # The job's own record says so: the cooperative stop a Dask task (or a Ray task
        # that prefers to stop cleanly) polls through ``ctx.cancelled()``. Anything but
        # running means this attempt is no longer wanted (cancelled, or timed out).
        try:
            return bool(checker.hget(keys.job(job_id), "state") != JobState.RUNNING.value)
        except (sync_redis.RedisError, OSError):
            return False

    async def build() -> Any:
        # One job at a time per process and thread: nothing to group. A Redis that is away
        # is waited for: the job cannot go on without it, and nothing runs it again if
        # its runner gives up.
        redis = connect(config.redis_url, until_answered=True)
        store = JobStore(redis, config.job_ttl_s, group_commit=False)
        worker_id = f"{engine}-{socket.gethostname()}-{os.getpid()}"
        registry = Registry.load_available(config.task_modules)
        return JobRunner(store, registry, worker_id, inline_sync=True, is_cancelled=is_cancelled)

    return _Runtime(loop, loop.run_until_complete(build()))


def run_job_here(config: WorkerConfig, job_id: str, engine: str, entry: str = "") -> str | None:
    """Run one attempt of ``job_id`` in this process; the state it ended in. ``entry``: the
    stream entry that delivered it (Ray and Dask jobs come by stream; Celery's do not)."""
    key = (os.getpid(), threading.get_ident(), config, engine)
    runtime = _RUNTIMES.get(key)
    if runtime is None:
        runtime = _RUNTIMES[key] = _new_runtime(config, engine)
    state = runtime.loop.run_until_complete(runtime.runner.run(job_id, entry))
    return None if state is None else str(state.value)
