"""A dropped pub/sub connection loses no news: whoever listens is told to look again.

redis-py makes a dropped subscription again on its own, inside its next read, without
raising; what was published in between never arrives. Each test drops the connections
with CLIENT KILL on a Redis of its own and publishes at once, within redis-py's backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from service import ids, keys
from service.events import EventHub
from service.settings import Settings
from service.store import connect
from tests.conftest import start_gateway
from tests.fleet_tasks import LOCAL_GATES, LocalGate
from tests.procs import RedisServer


@pytest.fixture
async def own_redis() -> AsyncIterator[tuple[RedisServer, aioredis.Redis]]:
    server = RedisServer()
    server.start()
    client = connect(server.url)
    yield server, client
    await client.aclose()
    server.stop()


async def _drop_subscriptions(redis: aioredis.Redis) -> None:
    killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    assert int(killed) >= 1


async def test_a_waiter_is_told_to_read_again_after_its_subscription_dropped(
    own_redis: tuple[RedisServer, aioredis.Redis],
) -> None:
    """A job's change published while the subscription was down is lost; the waiter on
    that job is woken with its state unknown, so that it reads the record."""
    _server, redis = own_redis
    hub = EventHub(redis)
    await hub.start()
    job_id = ids.new_id()
    try:
        with hub.watch(job_id) as changed:
            await _drop_subscriptions(redis)
            await redis.publish(keys.EVENTS, f'{{"id": "{job_id}", "state": "succeeded"}}')
            await asyncio.wait_for(changed.wait(), 10)
            assert changed.state is None  # not the lost news: "read the record"
    finally:
        await hub.close()


async def test_a_cancel_sent_while_the_workers_subscription_was_down_stops_the_job(
    settings: Settings, own_redis: tuple[RedisServer, aioredis.Redis]
) -> None:
    """The io worker learns of cancels by pub/sub: one published while its subscription
    was down is found in the job's record when the subscription is back."""
    server_proc, redis = own_redis
    server, session = await start_gateway(replace(settings, redis_url=server_proc.url))
    try:
        url = str(server.make_url("")).rstrip("/")
        async with session.post(url + "/v1/jobs", json={"task": "test.local_gate"}) as resp:
            job_id = (await resp.json())["id"]
        gate = LOCAL_GATES.setdefault(job_id, LocalGate())
        await asyncio.wait_for(gate.started.wait(), 30)
        await _drop_subscriptions(redis)
        async with session.delete(f"{url}/v1/jobs/{job_id}") as resp:
            assert (await resp.json())["state"] == "cancelled"
        await asyncio.wait_for(gate.cancelled.wait(), 10)
    finally:
        await session.close()
        await server.close()
        LOCAL_GATES.clear()
