"""The asyncio engine: concurrency on one loop, exactly-once delivery, reclaim after a kill."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from service import keys
from service.engines.asyncio_ import StreamConsumer, ensure_group, leave_group
from service.settings import IoWorkerSettings, Settings
from tests.conftest import Gateway, start_gateway, wait_state
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


async def _never(job_id: str, entry_id: str, fields: object) -> None:
    await asyncio.Event().wait()


async def test_a_cancel_before_a_jobs_first_step_frees_its_slot_and_entry(
    redis: aioredis.Redis,
) -> None:
    """A cancel that reaches the worker in the very loop turn it took the job (before the
    job's task ran a step) still frees the slot and acknowledges the entry. (The clean-up
    was the task's own ``finally``, which such a cancel never reaches: the slot was lost
    and the entry kept renewed by nobody's job.)"""
    stream = keys.stream("early-cancel")
    await redis.xgroup_create(stream, keys.IO_GROUP, id="0", mkstream=True)
    entry = await redis.xadd(stream, {"id": "01ARZ3NDEKTSV4RRFFQ69G5FAV"})
    consumer = StreamConsumer(redis, _never, IoWorkerSettings(queues=("early-cancel",)))
    await redis.xreadgroup(keys.IO_GROUP, consumer.name, {stream: ">"})
    assert consumer._start(stream, entry, {"id": "01ARZ3NDEKTSV4RRFFQ69G5FAV"})
    consumer._on_cancel('{"id": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "from": "queued"}')
    for _ in range(100):
        if not consumer.held and not consumer._acks:
            break
        await asyncio.sleep(0)  # sleep-ok: handing the loop turns to the task and its ack
    assert consumer.held == 0
    assert (await redis.xpending(stream, keys.IO_GROUP))["pending"] == 0
    assert consumer.is_cancelled("01ARZ3NDEKTSV4RRFFQ69G5FAV")


async def test_a_sync_io_task_sees_its_cancel(gateway: Gateway, redis: aioredis.Redis) -> None:
    """A plain-def io task runs on a thread the cancel cannot stop; polling
    ``ctx.cancelled()`` it sees the cancel (the mark went with the job's slot before)."""
    job = await gateway.submit("test.sync_io_until_cancelled")
    assert await redis.blpop([f"test:started:{job['id']}"], timeout=30) is not None
    status, body = await gateway.call("DELETE", f"/v1/jobs/{job['id']}")
    assert status == 200 and body["state"] == "cancelled"
    assert await redis.blpop([f"test:saw-cancel:{job['id']}"], timeout=10) is not None


async def test_a_silent_consumers_entry_behind_many_live_ones_is_reclaimed(
    redis: aioredis.Redis,
) -> None:
    """Redis looks at ten times COUNT pending entries per XAUTOCLAIM: a worker with room
    for one job sees ten. Behind more than ten entries of a live worker (renewed, so not
    idle), a silent worker's entry is still reached: each look goes on from the last."""
    stream = keys.stream("far-behind")
    await ensure_group(redis, "far-behind")
    for i in range(25):
        await redis.xadd(stream, {"id": f"live-{i}"})
    await redis.xreadgroup(keys.IO_GROUP, "live-worker", {stream: ">"})
    silent = await redis.xadd(stream, {"id": "silent-job"})
    await redis.xreadgroup(keys.IO_GROUP, "silent-worker", {stream: ">"})
    # Idle for longer than the lease (1 s), as a dead worker's entry is.
    await redis.xclaim(stream, keys.IO_GROUP, "silent-worker", 0, [silent], idle=60_000)
    consumer = StreamConsumer(
        redis, _never, IoWorkerSettings(queues=("far-behind",), concurrency=1, lease_s=1.0)
    )
    try:
        for _ in range(5):
            await consumer._reclaim()
            if consumer.held:
                break
        assert [held[2] for held in consumer._held.values()] == [silent]
    finally:
        for task, _stream, _entry in list(consumer._held.values()):
            task.cancel()


async def _consumers(redis: aioredis.Redis, queue: str) -> set[str]:
    names: set[str] = set()
    for stream in keys.streams(queue):
        names |= {c["name"] for c in await redis.xinfo_consumers(stream, keys.IO_GROUP)}
    return names


async def test_a_stopping_worker_leaves_its_group_unless_it_holds_an_entry(
    redis: aioredis.Redis,
) -> None:
    """Each process's consumer name is new: one that stops takes itself out of the group
    (which grew by one entry per start, for good), unless it still holds an entry, which
    would then never be delivered again."""
    await ensure_group(redis, "leaving")
    done = asyncio.Event()

    async def run_it(job_id: str, entry_id: str, fields: object) -> None:
        done.set()

    consumer = StreamConsumer(redis, run_it, IoWorkerSettings(queues=("leaving",)))
    await redis.xadd(keys.stream("leaving"), {"id": "01ARZ3NDEKTSV4RRFFQ69G5FAW"})
    stop = asyncio.Event()
    running = asyncio.create_task(consumer.run(stop, grace_s=1))
    await asyncio.wait_for(done.wait(), 30)  # it read (and so joined the group) and ran it
    stop.set()
    await asyncio.wait_for(running, 30)
    assert consumer.name not in await _consumers(redis, "leaving")
    # One holding an entry stays in the group, with its entry.
    stream = keys.stream("leaving")
    await redis.xadd(stream, {"id": "01ARZ3NDEKTSV4RRFFQ69G5FAV"})
    await redis.xreadgroup(keys.IO_GROUP, "holder", {stream: ">"})
    await leave_group(redis, keys.streams("leaving"), keys.IO_GROUP, "holder")
    assert "holder" in await _consumers(redis, "leaving")
    assert (await redis.xpending(stream, keys.IO_GROUP))["pending"] == 1


async def test_queues_list_every_queue_a_live_io_worker_consumes(
    bare_gateway: Gateway, settings: Settings, redis: aioredis.Redis
) -> None:
    """An io-worker started on other queues than the gateway's shows in /v1/queues with its
    jobs (as a Celery worker's --queues do), and goes once it has stopped."""
    env = env_with(COREFLEET_REDIS_URL=settings.redis, COREFLEET_IO_QUEUES="bulk")
    worker = Proc(["io-worker"], env)
    try:
        async with asyncio.timeout(30):
            while not await redis.zcard("cf:consumers:bulk"):  # noqa: ASYNC110  # another process's write
                await asyncio.sleep(0.05)  # sleep-ok: the worker checks in on start
        job = await bare_gateway.submit("io.echo", "bulk", queue="bulk")
        assert (await bare_gateway.wait(job["id"]))["result"] == "bulk"
        _status, body = await bare_gateway.call("GET", "/v1/queues")
        queues = body["engines"]["asyncio"]["queues"]
        assert queues["bulk"]["workers"] == 1 and queues["io"]["workers"] == 0, queues
    finally:
        worker.stop()
    _status, body = await bare_gateway.call("GET", "/v1/queues")
    assert "bulk" not in body["engines"]["asyncio"]["queues"]


async def test_what_a_worker_killed_outright_said_is_forgotten(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """A worker killed outright never takes back what it said when it checked in: once it
    has been silent long enough, the next look at the queues removes it, so the hash of
    what workers said does not grow with every worker that ever crashed."""
    long_ago = time.time() - 10 * 60
    # What two workers killed outright left: one on a queue since emptied, one on a queue
    # where a job still waits; and an older corefleet's entry, without its check-in time.
    for name, queue in (("killed-1", "ghost"), ("killed-2", "backlog")):
        said = {"kind": "io", "queues": [queue], "seen": long_ago}
        await redis.hset("cf:worker-info", name, json.dumps(said))
        await redis.zadd(f"cf:consumers:{queue}", {name: long_ago})
        await redis.sadd("cf:known-queues:io", queue)
    await redis.hset("cf:worker-info", "older-format", json.dumps({"kind": "io"}))
    await bare_gateway.submit("io.echo", 1, queue="backlog")
    _status, body = await bare_gateway.call("GET", "/v1/queues")
    queues = body["engines"]["asyncio"]["queues"]
    assert "ghost" not in queues  # nothing waits and nobody reads it: no longer listed
    # Its workers are gone, its backlog is not: it stays in view (and in the gauges).
    assert (queues["backlog"]["waiting"], queues["backlog"]["workers"]) == (1, 0)
    assert await redis.smembers("cf:known-queues:io") == {"backlog"}
    left = set(await redis.hkeys("cf:worker-info"))  # the gateway's own dispatchers are live
    assert not left & {"killed-1", "killed-2", "older-format"}, left


async def test_a_consumer_whose_lease_was_taken_over_leaves_the_entry_alone(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """A worker silent past its lease (a stalled loop, Redis away) finds its entry taken
    over by another: it neither claims the entry back as it renews its leases, nor deletes
    it when its own attempt ends. The entry is the other's, whose attempt runs now."""
    server, session = await start_gateway(replace(settings, io=replace(settings.io, lease_s=1.0)))
    gateway = Gateway(server, session)
    stream = keys.stream("io")
    renewing: asyncio.Task[None] | None = None
    try:
        job = await gateway.submit("test.io_gate")
        await wait_state(redis, job["id"], "running")
        [pending] = await redis.xpending_range(stream, keys.IO_GROUP, "-", "+", 10)
        entry, holder = pending["message_id"], pending["consumer"]
        # Taken over, as another worker's reclaim would after the lease; that worker is
        # alive, and renews its lease as the holder renews its own.

        async def another_worker() -> None:
            while True:
                await redis.xclaim(stream, keys.IO_GROUP, "another-worker", 0, [entry], justid=True)
                await asyncio.sleep(0.2)  # sleep-ok: a live consumer's lease renewal period

        renewing = asyncio.create_task(another_worker())

        async def check_in_after(seen: float) -> dict[str, Any]:
            """The holder's first check-in after ``seen`` (its leases are renewed next)."""
            async with asyncio.timeout(30):
                while True:
                    info = json.loads(await redis.hget(keys.WORKER_INFO, holder) or "{}")
                    if info.get("seen", 0) > seen:
                        return dict(info)
                    await asyncio.sleep(0.05)  # sleep-ok: polling another loop's check-in

        # Two check-ins on, the holder has renewed its leases in between.
        await check_in_after((await check_in_after(0))["seen"])
        [still] = await redis.xpending_range(stream, keys.IO_GROUP, "-", "+", 10)
        assert still["consumer"] == "another-worker"
        # Its attempt ends (nobody began another): the entry stays for the one holding it.
        await redis.rpush(f"test:release:{job['id']}", "go")
        assert await wait_state(redis, job["id"], "succeeded", "failed") == "succeeded"
        info = await check_in_after(0)
        while info["running"]:  # it let go of the job, and tried to acknowledge its entry
            info = await check_in_after(info["seen"])
        await check_in_after(info["seen"])
        assert await redis.xrange(stream, entry, entry), "the holder deleted another's entry"
    finally:
        if renewing is not None:
            renewing.cancel()
        await session.close()
        await server.close()
