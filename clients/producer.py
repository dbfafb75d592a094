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
from collections.abc import Iterable
from typing import Any

from service.engines import build_engines
from service.jobs import Job
from service.settings import Settings
from service.store import JobStore, connect
from service.submit import Submitter
from tasks import Registry


class AsyncProducer:
    def __init__(
        self, redis_url: str, task_modules: Iterable[str] = (), settings: Settings | None = None
    ) -> None:
        base = settings or Settings.from_env()
        self.settings = base.with_redis(redis_url)
        self.redis = connect(redis_url)
        store = JobStore.for_submits(self.redis, self.settings)
        registry = Registry.load(tuple(task_modules) or self.settings.task_modules)
        self._submitter = Submitter(
            store,
            registry,
            build_engines(self.redis, self.settings),
            webhook_hosts=self.settings.webhooks.hosts,
        )

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
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
        return await self._submitter.submit(body, idempotency_key)

    async def get(self, job_id: str) -> Job | None:
        return await self._submitter.store.get(job_id)


class Producer:
    """The blocking twin of ``AsyncProducer``, with an event loop of its own."""

    def __init__(
        self, redis_url: str, task_modules: Iterable[str] = (), settings: Settings | None = None
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._inner = AsyncProducer(redis_url, task_modules, settings)

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._inner.aclose())
            self._loop.close()

    def submit(
        self,
        task: str,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        return self._loop.run_until_complete(
            self._inner.submit(
                task, *args, kwargs=kwargs, options=options, idempotency_key=idempotency_key
            )
        )

    def get(self, job_id: str) -> Job | None:
        return self._loop.run_until_complete(self._inner.get(job_id))
