"""The job runner: the one piece of code every engine calls around a task.

It marks the job running and counts the attempt, runs the task under its time limit,
stores the result or the error (type and message only: tracebacks stay in worker logs),
and publishes each change (the store's scripts do that). Engines call ``run`` and nothing
else; they never write job records themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from service.jobs import MAX_NESTING, Job, JobError, JobState, nests_too_deep
from service.store import JobStore
from tasks import Registry, Retry, TaskContext, TaskSpec
from tasks.context import Reported

log = logging.getLogger("corefleet.runner")


class TimeLimitExceeded(Exception):
    """The task ran past its time limit."""


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        registry: Registry,
        worker_id: str,
        *,
        inline_sync: bool = False,
        is_cancelled: Callable[[str], bool] = lambda _job_id: False,
    ) -> None:
        self.store = store
        self.registry = registry
        self.worker_id = worker_id
        # In a worker process of its own (Celery child, Ray or Dask worker) a sync task runs
        # on the calling thread; on a shared event loop it runs in a thread instead.
        self.inline_sync = inline_sync
        self.is_cancelled = is_cancelled
        self._reports: set[asyncio.Task[bool]] = set()  # progress writes not awaited yet

    async def run(self, job_id: str, entry: str = "") -> JobState | None:
        """Run one attempt of the job; the state it ended in, or None if it did not run.

        ``asyncio.CancelledError`` propagates: either the job was cancelled (the store
        already says so) or the worker is shutting down (the job stays unacknowledged and
        another worker takes it over).
        """
        begun = await self.store.begin(job_id, self.worker_id, entry)
        if begun.job is None:
            log.debug("job %s not run: %s", job_id, begun.reason)
            return JobState.DEAD if begun.reason == "dead" else None
        job = begun.job
        spec = self.registry.get(job.task)
        if spec is None:
            await self.store.fail(job_id, self._unknown(job.task), attempt_id=job.attempt_id)
            return JobState.FAILED
        try:
            value = await self._call(spec, job)
        except asyncio.CancelledError as exc:
            current = asyncio.current_task()
            if current is None or current.cancelling():
                raise  # cancelled from outside: the job's cancel, or the worker stopping
            # Raised by the task itself (a library's own cancel leaking out, say): left to
            # propagate, it would leave the job running until its lease ran out, again and
            # again until it went dead. It fails with its own error, as any other.
            return await self._failed(job, error_of(exc), raised=exc)
        except TimeLimitExceeded as exc:
            return await self._failed(job, JobError("TimeLimitExceeded", str(exc)))
        except Exception as exc:
            return await self._failed(job, error_of(exc), retry_delay(spec, job, exc), exc)
        if nests_too_deep(value):
            error = JobError(
                "TypeError",
                f"the result is not JSON a record can hold: it nests over {MAX_NESTING} deep",
            )
            return await self._failed(job, error)
        try:
            # NaN and infinity are not JSON: no client could read such a result back.
            result_json = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            error = JobError("TypeError", f"the result is not JSON serialisable: {exc}")
            return await self._failed(job, error)
        if await self.store.succeed(job_id, result_json, job.attempt_id):
            return JobState.SUCCEEDED
        # Cancelled while running, or begun again elsewhere: the late result is dropped.
        return None

    def _unknown(self, task: str) -> JobError:
        """Why this worker cannot run ``task``: a module it failed to import, if any."""
        for module_name, exc in self.registry.import_errors.items():
            message = f"{task!r} is not known here: importing {module_name} failed: {exc}"
            return JobError(type(exc).__name__, message)
        return JobError("UnknownTask", f"this worker has no task named {task!r}")

    async def _call(self, spec: TaskSpec, job: Job) -> Any:
        args, kwargs = list(job.args), dict(job.kwargs)
        if spec.takes_ctx:
            ctx = TaskContext(
                job_id=job.id,
                task=job.task,
                attempt=job.attempts,
                _cancelled=lambda: self.is_cancelled(job.id),
                _report=self._reporter(job),
            )
            at = spec.ctx_index
            if at is not None and len(args) >= at:
                args.insert(at, ctx)  # def f(ctx, n): the caller's args fill the rest
            else:
                kwargs["ctx"] = ctx
        limit = job.timeout_s or spec.timeout_s
        if spec.is_async:
            call = spec.fn(*args, **kwargs)
        elif not self.inline_sync:
            call = asyncio.to_thread(spec.fn, *args, **kwargs)
        elif spec.takes_ctx:
            # The engine enforces the time limit of sync tasks in their own process. A task
            # that takes ctx runs on a thread, so that this loop is free to carry its
            # progress reports to Redis.
            return await asyncio.to_thread(spec.fn, *args, **kwargs)
        else:
            return spec.fn(*args, **kwargs)
        if limit is None:
            return await call
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await call
        except TimeoutError:
            if deadline.expired():
                raise TimeLimitExceeded(f"{job.task} ran past its {limit:g} s time limit") from None
            raise

    def _reporter(self, job: Job) -> Callable[[float, str], Awaitable[bool]]:
        """How ``ctx.progress`` reaches the store: a call on this loop (an async task's)
        starts the write (awaiting it waits for it); a call from another thread (a sync
        task's, or one an async task handed work to) waits for it there."""
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        async def record(fraction: float, message: str) -> bool:
            try:
                return await self.store.progress(job, fraction, message)
            except (RedisError, OSError) as exc:  # a report is news, not the job's outcome
                log.warning("job %s: progress not recorded (%s)", job.id, exc)
                return False

        def report(fraction: float, message: str) -> Awaitable[bool]:
            if threading.get_ident() == loop_thread:
                write = loop.create_task(record(fraction, message))
                self._reports.add(write)  # held until done, awaited or not
                write.add_done_callback(self._reports.discard)
                return write
            written = asyncio.run_coroutine_threadsafe(record(fraction, message), loop)
            return Reported(written.result())

        return report

    async def _failed(
        self,
        job: Job,
        error: JobError,
        retry_in: float | None = None,
        raised: BaseException | None = None,
    ) -> JobState | None:
        """End the attempt: failed; with ``retry_in``, retrying after that many seconds,
        or dead when this was the job's last attempt. What the task ``raised`` goes to the
        worker's log with its traceback (the record keeps its type and message only)."""
        if retry_in is None:
            state = JobState.FAILED
        elif job.attempts < job.max_attempts:
            log.info(
                "job %s (%s) will be retried in %.1f s: %s: %s",
                job.id,
                job.task,
                retry_in,
                error.type,
                error.message,
                # A Retry is the task's own wish, not a fault: no traceback for it.
                exc_info=None if isinstance(raised, Retry) else raised,
            )
            return JobState.RETRYING if await self.store.retry(job, error, retry_in) else None
        else:
            state = JobState.DEAD
        log.info(
            "job %s (%s) %s: %s: %s",
            job.id,
            job.task,
            state.value,
            error.type,
            error.message,
            exc_info=raised,
        )
        if await self.store.fail(job.id, error, state, job.attempt_id):
            return state
        return None


def retry_delay(spec: TaskSpec, job: Job, exc: Exception) -> float | None:
    """Seconds until the job should run again after ``exc``; None when ``exc`` fails it."""
    if isinstance(exc, Retry):
        return exc.delay_s if exc.delay_s is not None else spec.retry_delay(job.attempts)
    if spec.retry_on and isinstance(exc, spec.retry_on):
        return spec.retry_delay(job.attempts)
    return None


def error_of(exc: BaseException) -> JobError:
    """The error a client sees: the exception's own type name and message, no traceback."""
    return JobError(type(exc).__name__, str(exc))
