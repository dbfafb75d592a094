"""Retries with backoff, ``delay_s``, and the scheduler that queues jobs when they are due."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from service import keys
from service.jobs import JobError, JobState
from service.store import Dispatch, JobStore
from tasks import Retry, task
from tasks.context import MAX_DELAY_S
from tests.conftest import Gateway, start_gateway, wait_state
from tests.test_live import sse


def when(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


async def xadds(redis: aioredis.Redis) -> int:
    """Stream entries added since the last CONFIG RESETSTAT (scripts' count too)."""
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_xadd", {}).get("calls", 0))


async def changes_of(gateway: Gateway, submit: Any) -> tuple[str, list[str]]:
    """Submit (``await submit()`` gives the job) with ``GET /v1/events`` open: the job's id
    and every state it went through, in order, to its end."""
    async with gateway.session.get(f"{gateway.url}/v1/events") as response:
        job = await submit()
        states = []
        async with asyncio.timeout(30):
            async for _, change in sse(response):
                if change.get("id") == job["id"] and "progress" not in change:
                    states.append(change["state"])
                    if change["state"] in ("succeeded", "failed", "cancelled", "dead"):
                        return job["id"], states
    raise AssertionError("the stream ended")


async def test_a_retryable_error_runs_the_job_again_after_a_backoff(gateway: Gateway) -> None:
    job_id, states = await changes_of(gateway, lambda: gateway.submit("test.flaky", 2))
    assert states == [
        "queued",
        "running",
        "retrying",
        "running",
        "retrying",
        "running",
        "succeeded",
    ]
    done = await gateway.wait(job_id)
    assert done["result"] == 3 and done["attempts"] == 3
    assert done["error"] is None and done["run_at"] is None  # the last attempt starts clean
    async with gateway.session.get(f"{gateway.url}/metrics") as response:
        metrics = await response.text()
    assert 'corefleet_job_retries_total{engine="asyncio",task="test.flaky"} 2' in metrics


async def test_a_job_out_of_attempts_is_dead_with_its_last_error(gateway: Gateway) -> None:
    job = await gateway.submit("test.flaky", 10)  # 4 attempts (max_retries=3)
    done = await gateway.wait(job["id"])
    assert done["state"] == "dead" and done["attempts"] == 4
    assert done["error"] == {"type": "ConnectionError", "message": "attempt 4 failed"}


async def test_an_error_not_declared_retryable_fails_at_once(gateway: Gateway) -> None:
    job = await gateway.submit("test.not_retryable")
    done = await gateway.wait(job["id"])
    assert done["state"] == "failed" and done["attempts"] == 1
    assert done["error"]["type"] == "KeyError"


async def test_raising_retry_waits_the_delay_it_asks_for(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """While it waits, the record says why (the error) and until when (``run_at``); the
    next attempt begins no earlier."""
    job = await gateway.submit("test.retry_later", 0.5)
    await wait_state(redis, job["id"], "retrying")
    status, waiting = await gateway.call("GET", f"/v1/jobs/{job['id']}")
    assert status == 200 and waiting["state"] == "retrying"
    assert waiting["error"] == {"type": "Retry", "message": "not yet"}
    run_at = when(waiting["run_at"])
    done = await gateway.wait(job["id"])
    assert done["state"] == "succeeded" and done["result"] == 2
    assert when(done["started_at"]) >= run_at


async def test_delay_s_holds_a_job_until_its_time(gateway: Gateway, redis: aioredis.Redis) -> None:
    job = await gateway.submit("io.echo", "later", delay_s=1.0)
    assert job["state"] == "queued"
    assert (when(job["run_at"]) - when(job["created_at"])).total_seconds() == pytest.approx(1.0)
    status, queues = await gateway.call("GET", "/v1/queues")
    assert status == 200 and queues["delayed"] == 1
    done = await gateway.wait(job["id"])
    assert done["state"] == "succeeded" and done["result"] == "later"
    assert when(done["started_at"]) >= when(job["run_at"])
    status, queues = await gateway.call("GET", "/v1/queues")
    assert queues["delayed"] == 0


async def test_a_cancelled_delayed_job_never_runs(gateway: Gateway, redis: aioredis.Redis) -> None:
    job = await gateway.submit("io.echo", 1, delay_s=0.3)
    status, cancelled = await gateway.call("DELETE", f"/v1/jobs/{job['id']}")
    assert status == 200 and cancelled["state"] == "cancelled"
    assert await redis.zcard("cf:delayed") == 0  # it left the delayed set with the cancel
    status, queues = await gateway.call("GET", "/v1/queues")
    assert queues["delayed"] == 0
    status, record = await gateway.call("GET", f"/v1/jobs/{job['id']}")
    assert record["state"] == "cancelled" and record["attempts"] == 0
    assert record["started_at"] is None


async def test_a_record_the_scheduler_cannot_read_does_not_hold_up_the_others(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    await redis.hset("cf:job:01BROKENBROKENBROKENBROKEN", mapping={"state": "queued"})
    await redis.zadd("cf:delayed", {"01BROKENBROKENBROKENBROKEN": 0})  # due first
    job = await gateway.submit("io.echo", "next", delay_s=0.1)
    done = await gateway.wait(job["id"])
    assert done["state"] == "succeeded"


async def test_a_retrying_job_its_engine_cannot_start_can_fail(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """Back on its queue for its next attempt, a job whose engine cannot launch it (say,
    its cluster's workers cannot import the task) fails with the reason; it would
    otherwise stay retrying, on no queue, for ever."""
    store = JobStore(redis, 3600, group_commit=False)
    job = await bare_gateway.submit("io.echo", 1)
    begun = await store.begin(job["id"], "w")
    assert begun.job is not None
    assert await store.retry(begun.job, JobError("ConnectionError", "x"), 0)
    assert await store.fail(job["id"], JobError("ModuleNotFoundError", "no module named x"))
    record = await store.get(job["id"])
    assert record is not None and record.state.value == "failed"
    assert await redis.zcard("cf:delayed") == 0


async def test_delayed_jobs_survive_the_gateway_and_are_queued_once_by_many(
    settings: Any, redis: aioredis.Redis
) -> None:
    """Delayed jobs live in Redis: submitted through a gateway that then stops, they run
    when two other gateways are up, and each is queued exactly once between them."""
    server, session = await start_gateway(settings)
    first = Gateway(server, session)
    await redis.config_resetstat()  # count the queue entries made from here on
    jobs = [await first.submit("io.echo", i, delay_s=0.5) for i in range(20)]
    await session.close()
    await server.close()
    gateways = [await start_gateway(settings) for _ in range(2)]
    try:
        one = Gateway(*gateways[0])
        for job in jobs:
            done = await one.wait(job["id"])
            assert done["state"] == "succeeded" and done["attempts"] == 1
        assert await xadds(redis) == 20  # one entry per job (workers delete entries done)
    finally:
        for server, session in gateways:
            await session.close()
            await server.close()


@pytest.mark.parametrize("bad", [-1, MAX_DELAY_S + 1, True, "soon", float("inf")])
async def test_a_bad_delay_is_a_400_and_stores_nothing(
    gateway: Gateway, redis: aioredis.Redis, bad: Any
) -> None:
    body = f'{{"task": "io.echo", "args": [1], "options": {{"delay_s": {_json(bad)}}}}}'
    status, error = await gateway.call(
        "POST", "/v1/jobs", data=body, headers={"Content-Type": "application/json"}
    )
    assert status == 400, error
    assert error["error"]["code"] in ("invalid_body", "invalid_json")
    assert await redis.zcard("cf:delayed") == 0 and await redis.zcard("cf:jobs") == 0


def _json(value: Any) -> str:
    if value is True:
        return "true"
    if value == float("inf"):
        return "1e999"  # JSON has no infinity; Python's parser reads this as one
    return repr(value) if not isinstance(value, str) else f'"{value}"'


async def test_a_release_is_for_the_time_the_scheduler_read(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """A job set aside again since the scheduler read it (a new retry, a new time) is left
    for its new time; a release sent twice queues it once."""
    store = JobStore(redis, 3600, group_commit=False)
    job = await bare_gateway.submit("io.echo", 1)
    begun = await store.begin(job["id"], "w")
    assert begun.job is not None
    assert await store.retry(begun.job, JobError("ConnectionError", "x"), 60)
    due = int(await redis.zscore("cf:delayed", job["id"]))
    where = Dispatch("xadd", "cf:stream:io", job["id"])
    assert not await store.release(job["id"], due - 1, where)  # an older time: not this one
    assert await redis.zscore("cf:delayed", job["id"]) == due
    assert await store.release(job["id"], due, where)
    await redis.config_resetstat()
    assert not await store.release(job["id"], due, where)
    assert await xadds(redis) == 0


def test_the_backoff_doubles_up_to_its_maximum_with_jitter() -> None:
    @task("t.backoff", kind="io", retry_on=(OSError,), retry_backoff_s=1, retry_backoff_max_s=5)
    async def backoff() -> None: ...

    spec = backoff.__corefleet_task__  # type: ignore[attr-defined]
    for attempt, full in ((1, 1), (2, 2), (3, 4), (4, 5), (30, 5)):
        for _ in range(50):
            assert full / 2 <= spec.retry_delay(attempt) <= full


def test_retry_declarations_are_checked() -> None:
    with pytest.raises(ValueError):
        Retry("x", delay_s=-1)
    for delay in (float("nan"), True, MAX_DELAY_S + 1):
        with pytest.raises(ValueError):
            Retry("x", delay_s=delay)
    with pytest.raises(ValueError):
        task("t.bad", retry_on=(int,))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        task("t.bad", retry_backoff_s=10, retry_backoff_max_s=1)


async def test_a_cpu_task_is_retried_on_celery(gateway: Gateway, celery_worker: Any) -> None:
    job = await gateway.submit("test.cpu_flaky", 1)
    done = await gateway.wait(job["id"], 60)
    assert done["state"] == "succeeded" and done["result"] == 2 and done["attempts"] == 2


async def test_a_stale_entry_of_a_running_job_starts_no_second_attempt(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """A running job is begun again only by the entry that began it (its worker was lost);
    another entry of it (the failed attempt's, taken over after a retry queued the next)
    is skipped, so the job never runs twice at once."""
    store = JobStore(redis, 3600, group_commit=False)
    job = await bare_gateway.submit("io.echo", 1)
    first = await store.begin(job["id"], "worker-a", "1-1")
    assert first.job is not None and first.job.attempts == 1
    stale = await store.begin(job["id"], "worker-b", "0-9")
    assert stale.job is None and stale.reason == "running"
    taken_over = await store.begin(job["id"], "worker-c", "1-1")
    assert taken_over.job is not None and taken_over.job.attempts == 2


async def test_an_old_delivery_of_a_retrying_job_waits_for_its_backoff(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """The delivery of a failed attempt can come back after its retry was set aside (its
    worker was lost before acknowledging it): it does not cut the backoff short. The job
    runs again once it is due, and only then leaves the delayed set."""
    store = JobStore(redis, 3600, group_commit=False)
    job = await bare_gateway.submit("io.echo", 1)
    first = await store.begin(job["id"], "worker-a", "1-1")
    assert first.job is not None
    assert await store.retry(first.job, JobError("Flaky", "try again"), delay_s=600)
    early = await store.begin(job["id"], "worker-b", "1-1")
    assert early.job is None and early.reason == "retrying"
    assert await redis.zscore(keys.DELAYED, job["id"]) is not None
    record = await store.get(job["id"])
    assert record is not None and record.state == JobState.RETRYING
    await redis.zadd(keys.DELAYED, {job["id"]: 1})  # its backoff has ended
    due = await store.begin(job["id"], "worker-c", "1-1")
    assert due.job is not None and due.job.attempts == 2
    assert await redis.zscore(keys.DELAYED, job["id"]) is None


async def test_only_the_current_attempt_ends_the_job(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """A worker that stalled past its lease had its job taken over and begun again: its
    late outcome, success or failure, is refused; the attempt running now ends the job."""
    store = JobStore(redis, 3600, group_commit=False)
    job = await bare_gateway.submit("io.echo", 1)
    stalled = await store.begin(job["id"], "worker-a", "1-1")
    assert stalled.job is not None
    taken_over = await store.begin(job["id"], "worker-b", "1-1")
    assert taken_over.job is not None and taken_over.job.attempts == 2
    stale_id = stalled.job.attempt_id
    assert not await store.fail(job["id"], JobError("Boom", "late"), attempt_id=stale_id)
    assert not await store.succeed(job["id"], '"late"', stale_id)
    record = await store.get(job["id"])
    assert record is not None and record.state == JobState.RUNNING
    assert await store.succeed(job["id"], '"now"', taken_over.job.attempt_id)
    record = await store.get(job["id"])
    assert record is not None and (record.state, record.result) == (JobState.SUCCEEDED, "now")


async def test_a_delayed_job_whose_queue_became_another_programs_key_fails_saying_so(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """At its time the job's queue is a Redis key of another kind: it fails with the
    reason and leaves the delayed set. (The push used to fail after the job had left the
    set, which Redis does not undo: the job waited for good.)"""
    await redis.set("bulk-later", "another program's value")
    # A high job goes onto the list of the queue's very name (kombu's first priority step).
    job = await gateway.submit(
        "cpu.count_primes", 10, queue="bulk-later", delay_s=0.2, priority="high"
    )
    assert await wait_state(redis, job["id"], "failed", within=30) == "failed"
    done = await gateway.wait(job["id"])
    assert done["error"]["type"] == "QueueUnavailable", done
    assert "'bulk-later'" in done["error"]["message"]
    assert await redis.zscore(keys.DELAYED, job["id"]) is None
    assert await redis.get("bulk-later") == "another program's value"


async def test_a_progress_report_python_writes_is_stored_and_published(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """A message with a lone surrogate (a file name that is not UTF-8) is JSON Python writes
    and Lua's cjson refuses: the report is recorded, published, and said to be."""
    store = JobStore(redis, 3600, group_commit=False)
    job = await bare_gateway.submit("io.echo", 1)
    begun = await store.begin(job["id"], "worker-a", "1-1")
    assert begun.job is not None
    async with redis.pubsub() as events:
        await events.subscribe(keys.EVENTS)
        await events.get_message(timeout=5)  # the subscription's own answer
        assert await store.progress(begun.job, 0.5, "file \udcff.txt") is True
        event: dict[str, Any] = {}
        while event.get("id") != job["id"]:  # other tests' jobs may publish meanwhile
            message = await events.get_message(timeout=5)
            assert message is not None, "the report was not published"
            event = json.loads(message["data"])
    assert event["progress"] == {"fraction": 0.5, "message": "file \udcff.txt"}
    record = await store.get(job["id"])
    assert record is not None and record.progress == event["progress"]
