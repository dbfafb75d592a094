"""Job priorities: of the jobs waiting on a queue, a worker takes high ones first.

``options.priority`` is ``high``, ``normal`` (the default) or ``low``. Stream queues keep a
stream per level and their consumers take entries level by level; Celery queues use
kombu's priority lists. Tested with one free slot, so the order jobs run in is the order
they were taken in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from service import keys
from service.engines.celery_ import celery_lists
from service.settings import Settings
from tasks import task
from tests.conftest import Gateway, start_gateway, wait_state

#: Submitted in this order; each names its priority.
LABELS = ["low-1", "normal-1", "high-1", "normal-2", "low-2", "high-2"]
#: The order one free slot runs them in.
TAKEN = ["high-1", "high-2", "normal-1", "normal-2", "low-1", "low-2"]


def _priority(label: str) -> str:
    return label.split("-")[0]


@pytest.fixture
async def one_slot(settings: Settings, redis: aioredis.Redis) -> AsyncIterator[Gateway]:
    """A gateway whose embedded io worker runs one job at a time."""
    single = replace(settings, io=replace(settings.io, concurrency=1))
    server, session = await start_gateway(single)
    yield Gateway(server, session)
    await session.close()
    await server.close()


async def _noted(redis: aioredis.Redis, count: int) -> list[str]:
    """The labels of ``count`` jobs, in the order they ran (waited for on the list)."""
    order: list[str] = []
    for _ in range(count):
        _key, label = await redis.blpop(["test:order"], timeout=60)  # type: ignore[misc]
        order.append(label)
    return order


async def test_an_io_worker_takes_high_before_normal_before_low(
    one_slot: Gateway, redis: aioredis.Redis
) -> None:
    gate = await one_slot.submit("test.io_gate")
    await wait_state(redis, gate["id"], "running")
    jobs = [await one_slot.submit("test.note", x, priority=_priority(x)) for x in LABELS]
    assert [job["options"].get("priority") for job in jobs] == [_priority(x) for x in LABELS]
    assert await redis.xlen(keys.stream("io", "high")) == 2
    assert await redis.xlen(keys.stream("io", "low")) == 2
    status, queues = await one_slot.call("GET", "/v1/queues")
    assert status == 200
    io = queues["engines"]["asyncio"]["queues"]["io"]
    assert io["waiting"] == 6 and io["waiting_by_priority"] == {"high": 2, "normal": 2, "low": 2}

    await redis.rpush(f"test:release:{gate['id']}", 1)
    assert await _noted(redis, len(LABELS)) == TAKEN


async def test_a_celery_worker_takes_high_before_normal_before_low(
    gateway: Gateway, redis: aioredis.Redis, celery_worker: object
) -> None:
    """Both children held, then one freed: it takes the waiting jobs by priority."""
    gates = [await gateway.submit("test.cpu_gate") for _ in range(2)]
    for gate in gates:
        await wait_state(redis, gate["id"], "running")
    for label in LABELS:
        await gateway.submit("test.cpu_note", label, priority=_priority(label))
    lengths = [await redis.llen(name) for name in celery_lists("cpu")]
    assert lengths == [2, 2, 2, 0]  # kombu's steps 0, 3, 6 and 9
    status, queues = await gateway.call("GET", "/v1/queues")
    assert status == 200
    cpu = queues["engines"]["celery"]["queues"]["cpu"]
    assert cpu["waiting"] == 6 and cpu["waiting_by_priority"] == {"high": 2, "normal": 2, "low": 2}

    await redis.rpush(f"test:release:{gates[0]['id']}", 1)
    try:
        assert await _noted(redis, len(LABELS)) == TAKEN
    finally:
        await redis.rpush(f"test:release:{gates[1]['id']}", 1)
    assert (await gateway.wait(gates[1]["id"], 60))["state"] == "succeeded"


async def test_a_bad_priority_is_refused_and_stores_nothing(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    for bad in ("urgent", 5, None, ["high"]):
        body = {"task": "io.echo", "args": [1], "options": {"priority": bad}}
        status, reply = await gateway.call("POST", "/v1/jobs", json=body)
        assert status == 400, bad
        assert reply["error"]["code"] == "invalid_body"
        assert "priority" in reply["error"]["message"]
        assert reply["error"]["detail"]["allowed"] == ["high", "normal", "low"]
    assert await redis.zcard("cf:jobs") == 0


async def test_a_queue_limit_counts_every_priority(
    settings: Settings, redis: aioredis.Redis
) -> None:
    limited = replace(
        settings, max_queue_length=2, gateway=replace(settings.gateway, embedded_io_worker=False)
    )
    server, session = await start_gateway(limited)
    gateway = Gateway(server, session)
    try:
        await gateway.submit("io.echo", 1, priority="high")
        await gateway.submit("io.echo", 2, priority="low")
        status, reply = await gateway.call(
            "POST", "/v1/jobs", json={"task": "io.echo", "args": [3]}
        )
        assert status == 429 and reply["error"]["detail"]["length"] == 2
        assert sum([await redis.xlen(s) for s in keys.streams("io")]) == 2
    finally:
        await session.close()
        await server.close()


async def test_a_delayed_job_is_released_onto_its_priority(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    job = await bare_gateway.submit("io.echo", 1, priority="high", delay_s=0.2)
    high = keys.stream("io", "high")
    # Released by the gateway's scheduler: the entry appears on the high stream.
    reply = await redis.xread({high: "0-0"}, count=1, block=10_000)
    assert reply and reply[0][1][0][1]["id"] == job["id"]
    assert await redis.xlen(keys.stream("io")) == 0


async def test_a_task_may_declare_the_priority_of_its_jobs(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    status, listed = await bare_gateway.call("GET", "/v1/tasks")
    assert status == 200
    described = {t["name"]: t for t in listed["tasks"]}
    assert described["test.urgent_note"]["priority"] == "high"
    assert described["test.note"]["priority"] == "normal"
    declared = await bare_gateway.submit("test.urgent_note", "a")
    overridden = await bare_gateway.submit("test.urgent_note", "b", priority="low")
    assert declared["options"] == {"priority": "high"}
    assert overridden["options"] == {"priority": "low"}
    high = await redis.xrange(keys.stream("io", "high"))
    low = await redis.xrange(keys.stream("io", "low"))
    assert [fields["id"] for _, fields in high] == [declared["id"]]
    assert [fields["id"] for _, fields in low] == [overridden["id"]]


def test_a_task_with_an_unknown_priority_is_refused() -> None:
    with pytest.raises(ValueError, match="priority must be one of high, normal, low"):
        task("test.bad_priority", kind="io", priority="urgent")


async def test_the_designs_example_submit_is_accepted(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """The body DESIGN.md shows for POST /v1/jobs, priority included."""
    body = {
        "task": "cpu.count_primes",
        "args": [1000000],
        "kwargs": {},
        "options": {"priority": "high", "timeout_s": 30, "max_attempts": 3, "delay_s": 0},
    }
    status, job = await gateway.call("POST", "/v1/jobs", json=body)
    assert status == 202, job
    assert (job["engine"], job["queue"], job["state"]) == ("celery", "cpu", "queued")
    assert job["options"]["priority"] == "high" and job["max_attempts"] == 3


def test_a_task_queue_name_that_its_keys_could_not_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="queue must be 1 to 64 letters"):
        task("test.bad_queue", kind="io", queue="io#high")
