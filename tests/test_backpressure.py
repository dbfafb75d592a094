"""Back-pressure: a queue holding COREFLEET_MAX_QUEUE_LENGTH jobs refuses new ones (429)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from clients import AsyncClient
from service.errors import QueueFull
from service.settings import Settings
from tests.conftest import Gateway, celery_waiting, start_gateway


@pytest.fixture
async def small(settings: Settings, redis: aioredis.Redis) -> AsyncIterator[Gateway]:
    """A gateway whose queues hold 3 jobs at most, and no io worker to empty them."""
    limited = replace(
        settings,
        max_queue_length=3,
        gateway=replace(settings.gateway, embedded_io_worker=False),
    )
    server, session = await start_gateway(limited)
    yield Gateway(server, session)
    await session.close()
    await server.close()


async def test_a_full_queue_refuses_new_jobs_with_429_and_stores_nothing(
    small: Gateway, redis: aioredis.Redis
) -> None:
    for i in range(3):
        await small.submit("io.echo", i)
    async with small.session.post(
        f"{small.url}/v1/jobs", json={"task": "io.echo", "args": [4]}
    ) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
        error = (await response.json())["error"]
    assert error["code"] == "queue_full"
    assert error["detail"]["queue"] == "io" and error["detail"]["length"] == 3
    assert "COREFLEET_MAX_QUEUE_LENGTH" in error["message"]
    assert await redis.zcard("cf:jobs") == 3 and await redis.xlen("cf:stream:io") == 3

    # Other queues are not affected; a delayed job is not counted until it is queued.
    await small.submit("cpu.count_primes", 10)
    delayed = await small.submit("io.echo", "later", delay_s=3600)
    assert delayed["state"] == "queued" and delayed["run_at"]


async def test_a_batch_that_would_overfill_a_queue_is_refused_whole(
    small: Gateway, redis: aioredis.Redis
) -> None:
    await small.submit("io.echo", 0)
    await small.submit("io.echo", 1)
    jobs = [{"task": "cpu.count_primes", "args": [10]}] + [
        {"task": "io.echo", "args": [i]} for i in range(2)
    ]
    status, body = await small.call("POST", "/v1/jobs/batch", json={"jobs": jobs})
    assert status == 429 and body["error"]["detail"]["queue"] == "io"
    assert await redis.zcard("cf:jobs") == 2  # not even the cpu job
    assert await celery_waiting(redis, "cpu") == 0


async def test_an_idempotent_resend_still_gets_its_job_from_a_full_queue(
    small: Gateway, redis: aioredis.Redis
) -> None:
    headers = {"Idempotency-Key": "order-7"}
    body = {"task": "io.echo", "args": ["once"]}
    status, first = await small.call("POST", "/v1/jobs", json=body, headers=headers)
    assert status == 202
    for i in range(2):
        await small.submit("io.echo", i)
    async with small.session.post(f"{small.url}/v1/jobs", json=body, headers=headers) as again:
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert (await again.json())["id"] == first["id"]


async def test_the_python_client_raises_queue_full(small: Gateway) -> None:
    async with AsyncClient(small.url) as client:
        for i in range(3):
            await client.submit("io.echo", i)
        with pytest.raises(QueueFull) as refused:
            await client.submit("io.echo", 3)
    assert refused.value.detail["queue"] == "io"
