"""Progress reports (``ctx.progress``) and the live event streams that push them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from service.events import EventHub, Feed
from service.jobs import JobState
from service.store import JobStore
from tasks import TaskContext
from tests.conftest import Gateway, wait_state


async def sse(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    """The events of a Server-Sent Events response, as (event, parsed data)."""
    event, data = "message", ""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            data = line[len("data: ") :]
        elif not line and data:
            yield event, json.loads(data)
            event, data = "message", ""


async def next_for(events: AsyncIterator[tuple[str, Any]], job_id: str) -> tuple[str, Any]:
    """The next event about ``job_id`` (a feed carries every job's)."""
    async with asyncio.timeout(30):
        async for name, data in events:
            if data.get("id") == job_id:
                return name, data
    raise AssertionError("the stream ended")


async def subscribers(redis: aioredis.Redis, channel: str) -> int:
    counts = dict(await redis.pubsub_numsub(channel))
    return int(counts.get(channel, 0))


async def wait_subscribers(redis: aioredis.Redis, channel: str, count: int) -> None:
    async with asyncio.timeout(20):
        while await subscribers(redis, channel) != count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # sleep-ok: Redis has no event for a subscription


async def test_progress_is_recorded_and_pushed_to_the_jobs_stream(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """An io task's ``await ctx.progress`` shows in the record and arrives on the job's SSE
    stream as a progress event; the record keeps it once the job ends."""
    job = await gateway.submit("test.io_progress", "halfway")
    async with gateway.session.get(f"{gateway.url}/v1/jobs/{job['id']}/events") as response:
        events = sse(response)
        name, record = await anext(events)
        assert name == "state" and record["progress"] is None
        if record["state"] == "queued":
            name, record = await anext(events)
        assert name == "state" and record["state"] == "running"
        await redis.rpush(f"test:go:{job['id']}", 1)
        name, progress = await anext(events)
        assert name == "progress"
        assert progress == {"id": job["id"], "fraction": 0.5, "message": "halfway"}
        status, running = await gateway.call("GET", f"/v1/jobs/{job['id']}")
        assert status == 200 and running["progress"] == {"fraction": 0.5, "message": "halfway"}
        await redis.rpush(f"test:release:{job['id']}", 1)
        name, done = await anext(events)
        assert name == "state" and done["state"] == "succeeded"
        assert done["result"] is True  # the report said it was recorded
        assert done["progress"] == {"fraction": 0.5, "message": "halfway"}


async def test_the_jobs_stream_tells_of_a_new_attempt_in_the_same_state(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """A job begun again after its worker was lost is running before and after: the
    stream still sends the record of the new attempt."""
    store = JobStore(redis, 3600, group_commit=False)
    job = await bare_gateway.submit("io.echo", 1)
    await store.begin(job["id"], "worker-a", "1-1")
    url = f"{bare_gateway.url}/v1/jobs/{job['id']}/events"
    async with bare_gateway.session.get(url) as response:
        events = sse(response)
        name, record = await anext(events)
        assert (name, record["state"], record["attempts"]) == ("state", "running", 1)
        await store.begin(job["id"], "worker-b", "1-1")  # taken over: attempt 2
        async with asyncio.timeout(10):
            name, record = await anext(events)
        assert (name, record["state"], record["attempts"]) == ("state", "running", 2)


async def test_an_out_of_range_progress_fails_the_job_with_the_reason(gateway: Gateway) -> None:
    job = await gateway.submit("test.bad_progress", 1.5)
    done = await gateway.wait(job["id"])
    assert done["state"] == "failed"
    assert done["error"]["type"] == "ValueError"
    assert "between 0 and 1" in done["error"]["message"]


def test_progress_arguments_are_checked_in_the_task() -> None:
    ctx = TaskContext(job_id="j", task="t", attempt=1)
    for fraction in (-0.1, 1.01, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            ctx.progress(fraction)
    with pytest.raises(TypeError):
        ctx.progress(True)
    with pytest.raises(TypeError):
        ctx.progress(0.5, 7)  # type: ignore[arg-type]
    assert not ctx.progress(0.5)  # no runner behind this context: nothing recorded


async def test_only_the_running_attempt_may_report(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """A report carries its attempt's id: a replaced attempt, or a job no longer running,
    writes nothing and publishes nothing."""
    store = JobStore(redis, 3600, group_commit=False)
    job = await bare_gateway.submit("io.echo", 1)
    begun = await store.begin(job["id"], "worker-a")
    assert begun.job is not None
    first = begun.job
    assert await store.progress(first, 0.1, "first")
    again = await store.begin(job["id"], "worker-b")  # redelivered: a new attempt
    assert again.job is not None and again.job.progress is None  # it starts without
    assert not await store.progress(first, 0.9, "stale")
    assert await store.progress(again.job, 0.2, "second")
    assert (await store.get(job["id"])).progress == {"fraction": 0.2, "message": "second"}  # type: ignore[union-attr]
    await store.cancel(job["id"])
    assert not await store.progress(again.job, 0.3, "after cancel")
    assert (await store.get(job["id"])).progress == {"fraction": 0.2, "message": "second"}  # type: ignore[union-attr]


async def test_the_events_feed_pushes_every_jobs_changes_and_only_listens_while_open(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """GET /v1/events: new jobs (batches too), state changes and progress of every job, in
    order; the gateway hears new-job announcements only while a feed is open."""
    assert await subscribers(redis, "cf:submitted") == 0
    async with gateway.session.get(f"{gateway.url}/v1/events") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert await subscribers(redis, "cf:submitted") == 1  # ready before the answer
        events = sse(response)
        job = await gateway.submit("test.io_progress", "on the feed")
        assert await next_for(events, job["id"]) == ("job", {"id": job["id"], "state": "queued"})
        name, change = await next_for(events, job["id"])
        assert (name, change["state"], change["from"]) == ("job", "running", "queued")
        await redis.rpush(f"test:go:{job['id']}", 1)
        name, change = await next_for(events, job["id"])
        assert change == {
            "id": job["id"],
            "state": "running",
            "progress": {"fraction": 0.5, "message": "on the feed"},
        }
        await redis.rpush(f"test:release:{job['id']}", 1)
        name, change = await next_for(events, job["id"])
        assert (change["state"], change["from"]) == ("succeeded", "running")
        assert "job" not in change  # views read the records they show

        status, batch = await gateway.call(
            "POST",
            "/v1/jobs/batch",
            json={"jobs": [{"task": "io.echo", "args": [i]} for i in range(3)]},
        )
        assert status == 202
        for submitted in batch["jobs"]:
            assert await next_for(events, submitted["id"]) == (
                "job",
                {"id": submitted["id"], "state": "queued"},
            )
    # The gateway notices a gone client when it next writes to it: the next new job.
    await gateway.submit("io.echo", "after")
    await wait_subscribers(redis, "cf:submitted", 0)


async def test_a_feed_opened_as_the_last_one_closes_gets_ready(redis: aioredis.Redis) -> None:
    """The last feed closing stops the announcements; one opened meanwhile starts them
    again rather than waiting on the subscription being stopped."""
    hub = EventHub(redis)
    await hub.start()
    try:
        first = hub.feed()
        feed = await first.__aenter__()
        await asyncio.wait_for(feed.ready.wait(), 5)
        closing = asyncio.create_task(first.__aexit__(None, None, None))
        await asyncio.sleep(0)  # sleep-ok: one loop turn, so the close reaches its await
        async with hub.feed() as second:
            await asyncio.wait_for(second.ready.wait(), 5)
            assert await subscribers(redis, "cf:submitted") == 1
        await closing
    finally:
        await hub.close()


def test_a_feed_that_falls_behind_is_told_to_read_again() -> None:
    feed = Feed()
    for i in range(Feed.MAX_PENDING):
        feed.put({"id": str(i), "state": "queued"})
    assert not feed.missed and len(feed.pending) == Feed.MAX_PENDING
    feed.put({"id": "one too many", "state": "queued"})
    assert feed.missed and not feed.pending  # a resync replaces what was held


async def test_a_cpu_task_reports_progress_from_a_celery_child(
    gateway: Gateway, redis: aioredis.Redis, celery_worker: Any
) -> None:
    """A sync task's ``ctx.progress`` waits until Redis has the report."""
    job = await gateway.submit("test.cpu_progress")
    _, started = await redis.blpop([f"test:started:{job['id']}"], timeout=60)  # type: ignore[misc]
    pid = started.split(":")[1]
    status, running = await gateway.call("GET", f"/v1/jobs/{job['id']}")
    assert status == 200 and running["state"] == JobState.RUNNING.value
    assert running["progress"] == {"fraction": 0.25, "message": f"a quarter, pid {pid}"}
    await redis.rpush(f"test:release:{job['id']}", 1)
    done = await gateway.wait(job["id"])
    assert done["state"] == "succeeded" and done["result"] is True
    assert await wait_state(redis, job["id"], "succeeded") == "succeeded"


async def test_an_odd_message_on_the_events_channel_stops_no_feed(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """Another program's message on the events channel (not JSON) is logged and passed
    over: the gateway's subscription goes on, and feeds and waits with it."""
    async with gateway.session.get(f"{gateway.url}/v1/events") as response:
        assert response.status == 200
        events = sse(response)
        await redis.publish("cf:events", "not json")
        job = await gateway.submit("io.echo", 1)
        name, change = await next_for(events, job["id"])
        assert (name, change["id"]) == ("job", job["id"])
    done = await gateway.wait(job["id"])
    assert done["state"] == "succeeded"
