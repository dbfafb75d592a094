"""Enqueue corefleet jobs from another Python service without HTTP.

``Producer`` validates, stores and dispatches with the gateway's own ``Submitter``: the
same checks, the same record, the same queue entry, in the same single round trip.

    async with AsyncProducer("redis://127.0.0.1:6379/0") as producer:
        job = await producer.submit("cpu.count_primes", 1_000_000)

    with Producer("redis://127.0.0.1:6379/0") as producer:   # from synchronous code
        job_id = producer.submit("io.echo", "hello").id
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from service.engines import build_engines
from service.jobs import Job
from service.settings import Settings
from service.store import JobStore, connect
from service.submit import Submitter
from tasks import Registry

T = TypeVar("T")


class AsyncProducer:
    def __init__(
        self, redis_url: str, task_modules: Iterable[str] = (), settings: Settings | None = None
    ) -> None:
        base = settings or Settings.from_env()
        self.settings = base.with_redis(redis_url)
        self.redis = connect(redis_url)
        store = JobStore.for_submits(self.redis, self.settings)
        registry = Registry.load(tuple(task_modules) or self.settings.task_modules)
        self._engines = build_engines(self.redis, self.settings)
        self._submitter = Submitter(
            store, registry, self._engines, webhook_hosts=self.settings.webhooks.hosts
        )
        self._started: asyncio.Task[None] | None = None

    async def _start_engines(self) -> None:
        """As a gateway does at start, on the first submit: a Ray or Dask address that does
        not answer makes its jobs an ``EngineUnavailable``, not jobs stored for nobody."""
        for engine in self._engines.values():
            await engine.start()

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._started is not None:
            await asyncio.gather(self._started, return_exceptions=True)
        for engine in self._engines.values():
            await engine.close()
        await self.redis.aclose()

    async def submit(
        self,
        task: str,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Store and queue one job; raises the gateway's errors for a bad call.

        ``idempotency_key``: the same call made again with it (say, after an error) stores
        nothing and returns the job the key already stands for.
        """
        body = {"task": task, "args": list(args), "kwargs": kwargs or {}, "options": options or {}}
        job = self._submitter.prepare(body)  # a bad call is refused before anything is written
        started = self._started
        if started is None or (started.done() and not _succeeded(started)):
            # Once, however many submits wait on it; again after a start that failed (a
            # Redis that did not answer, say).
            body = {
                "task": task,
                "args": list(args),
                "kwargs": kwargs or {},
                "options": options or {},
            }
        job = self._submitter.prepare(body)  # a bad call is refused before anything is written
        started = self._started = asyncio.ensure_future(self._start_engines())
        await asyncio.shield(started)
        return await self._submitter.enqueue([job], idempotency_key) or job

    async def get(self, job_id: str) -> Job | None:
        return await self._submitter.store.get(job_id)


def _succeeded(task: asyncio.Task[None]) -> bool:
    return not task.cancelled() and task.exception() is None


class Producer:
    """The blocking twin of ``AsyncProducer``, with an event loop of its own on a thread of
    its own: it works from any thread, threads may share it, and code that runs an event
    loop already (a notebook, an async framework's sync callback) may call it."""

    def __init__(
        self, redis_url: str, task_modules: Iterable[str] = (), settings: Settings | None = None
    ) -> None:
        self._inner = AsyncProducer(redis_url, task_modules, settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="corefleet-producer", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(call, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._inner.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def submit(
        self,
        task: str,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        return self._run(
            self._inner.submit(
                task, *args, kwargs=kwargs, options=options, idempotency_key=idempotency_key
            )
        )

    def get(self, job_id: str) -> Job | None:
        return self._run(self._inner.get(job_id))
