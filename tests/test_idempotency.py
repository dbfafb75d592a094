"""Idempotency-Key: a submit sent again (after a lost answer, a timeout, a 503) creates no
second job, whoever sends it: HTTP, the Python clients or the direct producer."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from clients import AsyncClient, Client
from clients.producer import AsyncProducer
from service import errors, keys, presence
from service.app import SUBMITTER
from service.settings import Settings
from service.submit import Submitter
from tasks import Registry
from tests.conftest import Gateway, start_gateway, wait_workers
from tests.procs import RedisServer


async def _post(
    gateway: Gateway, body: dict[str, Any], key: str, query: str = ""
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    headers = {"Idempotency-Key": key}
    async with gateway.session.post(
        f"{gateway.url}/v1/jobs{query}", json=body, headers=headers
    ) as resp:
        return resp.status, await resp.json(), resp.headers


async def _jobs_stored(redis: aioredis.Redis) -> list[str]:
    return [key async for key in redis.scan_iter(keys.job("*"))]


async def test_the_same_submit_sent_again_creates_no_second_job(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    body = {"task": "io.echo", "args": [1]}
    status, first, headers = await _post(bare_gateway, body, "order-17")
    assert status == 202 and "Idempotent-Replayed" not in headers
    status, again, headers = await _post(bare_gateway, body, "order-17")
    assert status == 202 and headers["Idempotent-Replayed"] == "true"
    assert again["id"] == first["id"] and again["state"] == "queued"
    assert await _jobs_stored(redis) == [keys.job(first["id"])]
    assert await redis.xlen(keys.stream("io")) == 1  # queued once
    # Another key is another job.
    status, other, _ = await _post(bare_gateway, body, "order-18")
    assert status == 202 and other["id"] != first["id"]


async def test_sends_at_the_same_moment_make_one_job(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    body = {"task": "io.echo", "args": ["same"]}
    answers = await asyncio.gather(*(_post(bare_gateway, body, "burst") for _ in range(10)))
    assert {job["id"] for _, job, _ in answers} == {answers[0][1]["id"]}
    assert sum("Idempotent-Replayed" in headers for _, _, headers in answers) == 9
    assert len(await _jobs_stored(redis)) == 1


async def test_the_key_with_another_request_is_a_409_that_changes_nothing(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    _, first, _ = await _post(bare_gateway, {"task": "io.echo", "args": [1]}, "k1")
    status, body, _ = await _post(bare_gateway, {"task": "io.echo", "args": [2]}, "k1")
    assert status == 409 and body["error"]["code"] == "idempotency_key_reused"
    assert body["error"]["detail"] == {"id": first["id"]}
    assert await _jobs_stored(redis) == [keys.job(first["id"])]


async def test_a_resend_after_the_declared_priority_changed_is_the_same_request(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    # test.urgent_note declares priority high, which the record shows; a deploy then
    # declares it low. The resend (the request as sent, unchanged) is answered with its job.
    body = {"task": "test.urgent_note", "args": ["x"]}
    status, first, _ = await _post(bare_gateway, body, "deploy-1")
    assert status == 202 and first["options"] == {"priority": "high"}
    submitter = bare_gateway.server.app[SUBMITTER]
    spec = submitter.registry.get("test.urgent_note")
    assert spec is not None
    redeployed = Submitter(
        submitter.store, Registry([replace(spec, priority="low")]), submitter.engines
    )
    job = redeployed.prepare(body)
    assert job.options == {"priority": "low"}
    earlier = await redeployed.enqueue([job], "deploy-1")
    assert earlier is not None and earlier.id == first["id"]
    assert await _jobs_stored(redis) == [keys.job(first["id"])]
    # A request that differs from the first is still refused.
    with pytest.raises(errors.IdempotencyKeyReused):
        await redeployed.enqueue([redeployed.prepare({**body, "args": ["y"]})], "deploy-1")


async def test_a_replay_with_wait_answers_with_the_finished_job(gateway: Gateway) -> None:
    body = {"task": "io.echo", "args": ["done"]}
    status, first, _ = await _post(gateway, body, "w1", "?wait=30")
    assert status == 200 and first["state"] == "succeeded"
    status, again, headers = await _post(gateway, body, "w1", "?wait=30")
    assert status == 200 and headers["Idempotent-Replayed"] == "true"
    assert again["id"] == first["id"] and again["result"] == "done"


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "tab\there", "naïve"])
async def test_a_malformed_key_is_a_400_that_stores_nothing(
    bare_gateway: Gateway, redis: aioredis.Redis, key: str
) -> None:
    async with bare_gateway.session.post(
        f"{bare_gateway.url}/v1/jobs",
        json={"task": "io.echo", "args": [1]},
        headers={"Idempotency-Key": key},
    ) as resp:
        body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "invalid_parameter"
    assert body["error"]["detail"] == {"header": "Idempotency-Key"}
    assert await _jobs_stored(redis) == []


async def test_a_batch_with_a_key_is_refused(bare_gateway: Gateway, redis: aioredis.Redis) -> None:
    async with bare_gateway.session.post(
        f"{bare_gateway.url}/v1/jobs/batch",
        json={"jobs": [{"task": "io.echo", "args": [1]}]},
        headers={"Idempotency-Key": "b1"},
    ) as resp:
        body = await resp.json()
    assert resp.status == 400 and "POST /v1/jobs" in body["error"]["message"]
    assert await _jobs_stored(redis) == []


async def test_the_key_lasts_as_configured(bare_gateway: Gateway, redis: aioredis.Redis) -> None:
    await _post(bare_gateway, {"task": "io.echo", "args": [1]}, "ttl")
    ttl = await redis.ttl(keys.idempotency("ttl"))
    assert 0 < ttl <= 24 * 3600


async def test_clients_and_producer_send_a_key(
    bare_gateway: Gateway, redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with AsyncClient(bare_gateway.url) as client:
        first = await client.submit("io.echo", 1, idempotency_key="c1")
        again = await client.submit("io.echo", 1, idempotency_key="c1")
        assert again.id == first.id
        with pytest.raises(errors.IdempotencyKeyReused):
            await client.submit("io.echo", 2, idempotency_key="c1")

    def blocking() -> str:
        with Client(bare_gateway.url) as client:
            return client.submit("io.echo", 1, idempotency_key="c1").id

    assert await asyncio.to_thread(blocking) == first.id
    async with AsyncProducer(redis_server.url) as producer:
        made = await producer.submit("io.echo", 3, idempotency_key="p1")
        assert (await producer.submit("io.echo", 3, idempotency_key="p1")).id == made.id
        # The producer and the gateway share one key space: one submit path.
        with pytest.raises(errors.IdempotencyKeyReused):
            await producer.submit("io.echo", 4, idempotency_key="c1")
    assert len(await _jobs_stored(redis)) == 2


async def test_a_resend_gets_its_job_even_when_it_could_not_be_queued_now(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """The first send found a worker (``require_worker``); the resend, after the worker
    left, is answered with that job, not a 503. Without the key, the 503 stands."""
    body = {"task": "io.echo", "args": [1], "options": {"require_worker": True}}
    server, session = await start_gateway(settings)  # its embedded io worker consumes io
    gateway = Gateway(server, session)
    try:
        await wait_workers(redis, "io")
        status, first, _ = await _post(gateway, body, "resend-1")
        assert status == 202
    finally:
        await session.close()
        await server.close()

    no_worker = replace(settings, gateway=replace(settings.gateway, embedded_io_worker=False))
    server, session = await start_gateway(no_worker)
    gateway = Gateway(server, session)
    try:
        assert not await presence.live(redis, "io")  # the worker left with its gateway
        status, again, headers = await _post(gateway, body, "resend-1")
        assert (status, again["id"], headers["Idempotent-Replayed"]) in (
            (202, first["id"], "true"),
            (200, first["id"], "true"),  # it may have finished meanwhile
        )
        status, refused = await gateway.call("POST", "/v1/jobs", json=body)
        assert status == 503 and refused["error"]["code"] == "engine_unavailable"
        assert len(await _jobs_stored(redis)) == 1
    finally:
        await session.close()
        await server.close()
