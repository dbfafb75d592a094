"""The asyncio engine: concurrency on one loop, exactly-once delivery, reclaim after a kill."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import redis.asyncio as aioredis

from service import keys
from service.engines.asyncio_ import StreamConsumer
from service.settings import IoWorkerSettings, Settings
from tests.conftest import Gateway, wait_state
from tests.procs import Proc, env_with


async def test_a_thousand_concurrent_sleeps_finish_together(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """1,000 io.sleep(0.5) jobs all succeed, each run exactly once, in a few seconds."""
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def submit() -> str:
            async with session.post(
                gateway.url + "/v1/jobs", json={"task": "io.sleep", "args": [0.5]}
            ) as resp:
                assert resp.status == 202
                return str((await resp.json())["id"])

        ids = await asyncio.gather(*(submit() for _ in range(1000)))

        async def wait(job_id: str) -> dict[str, object]:
            async with session.get(f"{gateway.url}/v1/jobs/{job_id}?wait=60") as resp:
                return dict(await resp.json())

        records = await asyncio.gather(*(wait(i) for i in ids))
    elapsed = time.monotonic() - started
    assert len(set(ids)) == 1000
    assert all(r["state"] == "succeeded" and r["result"] == 0.5 for r in records)
    # attempts counts every start: 1 means no job ran twice.
    assert all(r["attempts"] == 1 for r in records)
    assert elapsed < 20, f"1,000 concurrent 0.5 s sleeps took {elapsed:.1f} s"
    assert (await redis.xpending("cf:stream:io", "corefleet-io"))["pending"] == 0


async def test_a_job_held_by_a_killed_worker_is_reclaimed(
    bare_gateway: Gateway, settings: Settings, redis: aioredis.Redis
) -> None:
    """kill -9 of the io worker running a job: another worker reclaims it after the lease."""
    env = env_with(
        COREFLEET_REDIS_URL=settings.redis,
        COREFLEET_IO_LEASE_S="1",
        COREFLEET_TASK_MODULES="tests.fleet_tasks",
    )
    first = Proc(["io-worker"], env)
    try:
        job = await bare_gateway.submit("test.hold", 1.5)
        # The first worker has started it (attempt 1 recorded by the task itself).
        async with asyncio.timeout(30):
            await redis.blpop([f"test:started:{job['id']}"], timeout=30)
        first.kill()
        assert await redis.hget(f"cf:job:{job['id']}", "state") == "running"
        second = Proc(["io-worker"], env)
        try:
            assert await wait_state(redis, job["id"], "succeeded", "failed", "dead") == "succeeded"
        finally:
            second.stop()
    finally:
        first.stop()
    record = await bare_gateway.wait(job["id"])
    assert record["attempts"] == 2 and record["result"] == 2


async def test_taking_jobs_makes_a_group_redis_lost_and_strands_nothing(
    redis: aioredis.Redis,
) -> None:
    """After Redis lost its data, a job queued on one priority's stream makes that stream
    without its group: ``take`` makes the group and returns every entry, not an error that
    would leave the entries already taken from other streams with it, unstarted."""
    consumer = StreamConsumer(redis, _never, IoWorkerSettings(queues=("q",)))
    high, normal = keys.stream("q", "high"), keys.stream("q")
    await redis.xgroup_create(high, keys.IO_GROUP, id="0", mkstream=True)
    first = await redis.xadd(high, {"id": "job-1"})
    second = await redis.xadd(normal, {"id": "job-2"})  # a stream with no group
    taken = await consumer._take(list(keys.streams("q")), 10)
    assert taken == [(high, [(first, {"id": "job-1"})]), (normal, [(second, {"id": "job-2"})])]
    assert (await redis.xpending(normal, keys.IO_GROUP))["pending"] == 1


async def _never(job_id: str, entry_id: str, fields: object) -> None:
    raise AssertionError("not run in this test")


async def test_entries_taken_but_not_started_are_handed_back_as_the_reader_stops(
    redis: aioredis.Redis,
) -> None:
    """Parked entries (taken beyond the room there was) are marked idle for a whole lease
    when the consumer stops reading, so another consumer takes them over at once."""
    settings = IoWorkerSettings(queues=("q",), lease_s=30.0)
    consumer = StreamConsumer(redis, _never, settings)
    stream = keys.stream("q")
    await redis.xgroup_create(stream, keys.IO_GROUP, id="0", mkstream=True)
    entry = await redis.xadd(stream, {"id": "job-1"})
    await redis.xreadgroup(keys.IO_GROUP, consumer.name, {stream: ">"}, count=1)
    consumer._parked = [(stream, entry, {"id": "job-1"})]
    await consumer._release_parked()
    assert consumer._parked == []
    idle = await redis.xpending_range(stream, keys.IO_GROUP, "-", "+", 10, idle=30_000)
    assert [item["message_id"] for item in idle] == [entry]
