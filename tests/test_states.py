"""Job state transitions run atomically in Redis and refuse every illegal move."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from service import ids, keys
from service.events import EventHub
from service.jobs import ALLOWED_FROM, TERMINAL, Job, JobState, now_iso
from service.store import Dispatch, JobStore

PAIRS = list(itertools.product(JobState, JobState))


async def _job_in(store: JobStore, state: JobState, max_attempts: int = 3) -> str:
    job = Job(
        id=ids.new_id(),
        task="io.echo",
        kind="io",
        engine="asyncio",
        queue="io",
        args=[1],
        state=state,
        max_attempts=max_attempts,
        created_at=now_iso(),
    )
    await store.redis.hset(keys.job(job.id), mapping=job.to_hash())
    return job.id


@pytest.fixture
def store(redis: aioredis.Redis) -> JobStore:
    return JobStore(redis, job_ttl_s=60)


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
async def test_transition_is_allowed_exactly_when_the_table_says(
    store: JobStore, src: JobState, dst: JobState
) -> None:
    """Each of the 49 (from, to) pairs moves if and only if ALLOWED_FROM lists it."""
    job_id = await _job_in(store, src)
    moved, previous = await store.transition(job_id, dst, {"note": "x"})
    assert previous is src
    assert moved is (src in ALLOWED_FROM[dst])
    stored = await store.redis.hgetall(keys.job(job_id))
    assert stored["state"] == (dst if moved else src).value
    assert ("note" in stored) is moved  # a refused move writes nothing
    ttl = await store.redis.ttl(keys.job(job_id))
    assert (ttl > 0) is (moved and dst in TERMINAL)


async def test_terminal_jobs_never_change(store: JobStore) -> None:
    """No target state is reachable from a terminal state."""
    for src in TERMINAL:
        for dst in JobState:
            assert src not in ALLOWED_FROM[dst]


async def test_transition_of_a_missing_job_reports_none(store: JobStore) -> None:
    """A transition on an id with no record changes nothing and says so."""
    moved, previous = await store.transition(ids.new_id(), JobState.CANCELLED)
    assert (moved, previous) == (False, None)
    assert await store.redis.dbsize() == 0


async def _next_messages(pubsub: aioredis.client.PubSub, count: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(5):
        while len(messages) < count:
            message = await pubsub.get_message(timeout=5)
            if message is not None:
                messages.append(json.loads(message["data"]))
    return messages


async def test_every_transition_is_published(store: JobStore) -> None:
    """A move publishes {id, state, from} on the events channel; a refusal publishes nothing.
    A move to a terminal state carries the finished record, and a cancel goes to whoever
    holds the job too."""
    job_id = await _job_in(store, JobState.QUEUED)
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.EVENTS, keys.CANCEL)
    await store.transition(job_id, JobState.SUCCEEDED)  # refused: queued -> succeeded
    await store.transition(job_id, JobState.RUNNING)
    await store.transition(job_id, JobState.CANCELLED)
    running, cancelled, cancel = await _next_messages(pubsub, 3)
    await pubsub.aclose()
    assert running == {"id": job_id, "state": "running", "from": "queued"}
    record = await store.redis.hgetall(keys.job(job_id))
    assert cancelled == {"id": job_id, "state": "cancelled", "from": "running", "job": record}
    assert cancel == {"id": job_id, "from": "running"}


async def test_a_terminal_event_leaves_a_large_record_out(store: JobStore) -> None:
    """A record too large to travel with every event is read back by whoever needs it."""
    job_id = await _job_in(store, JobState.RUNNING)
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.EVENTS)
    assert await store.succeed(job_id, json.dumps("x" * 10_000))
    (finished,) = await _next_messages(pubsub, 1)
    await pubsub.aclose()
    assert finished == {"id": job_id, "state": "succeeded", "from": "running"}


@pytest.mark.parametrize("state", [JobState.CANCELLED, *sorted(TERMINAL - {JobState.CANCELLED})])
async def test_begin_refuses_finished_and_cancelled_jobs(store: JobStore, state: JobState) -> None:
    """A cancelled or finished job never starts: begin leaves it as it is."""
    job_id = await _job_in(store, state)
    begun = await store.begin(job_id, "w1")
    assert begun.job is None and begun.reason == state.value
    assert await store.redis.hget(keys.job(job_id), "attempts") == "0"


async def test_begin_counts_attempts_and_marks_running(store: JobStore) -> None:
    """begin moves queued -> running and counts the attempt."""
    job_id = await _job_in(store, JobState.QUEUED)
    begun = await store.begin(job_id, "w1")
    assert begun.job is not None
    assert begun.job.state is JobState.RUNNING and begun.job.attempts == 1
    assert begun.job.started_at


async def test_redelivery_past_max_attempts_is_dead(store: JobStore) -> None:
    """A job redelivered after its last attempt was lost goes dead with the reason."""
    job_id = await _job_in(store, JobState.QUEUED, max_attempts=2)
    assert (await store.begin(job_id, "w1")).job is not None
    assert (await store.begin(job_id, "w2")).job is not None  # w1 was lost
    begun = await store.begin(job_id, "w3")  # w2 was lost too
    assert begun.job is None and begun.reason == "dead"
    job = await store.get(job_id)
    assert job is not None and job.state is JobState.DEAD and job.attempts == 2
    assert job.error is not None and job.error["type"] == "WorkerLost"


async def test_a_watch_gets_the_finished_record_with_the_event(store: JobStore) -> None:
    """Whoever waits on a job gets its finished record from the terminal event itself."""
    hub = EventHub(store.redis)
    await hub.start()
    job_id = await _job_in(store, JobState.RUNNING)
    try:
        with hub.watch(job_id) as changed:
            assert await store.succeed(job_id, "42")
            await asyncio.wait_for(changed.wait(), 5)
    finally:
        await hub.close()
    assert changed.state == "succeeded"
    assert changed.record == await store.redis.hgetall(keys.job(job_id))
    assert changed.record is not None and Job.from_hash(changed.record).result == 42


# A client sends a call again when its connection drops, even after Redis ran it: each
# script must then change nothing the first sending did not.


async def test_a_create_sent_twice_stores_and_queues_the_job_once(store: JobStore) -> None:
    """The second sending of a create neither resets a job already begun nor queues it
    again."""
    job = Job(id=ids.new_id(), task="io.echo", kind="io", engine="asyncio", queue="io")
    stream = keys.stream(f"replay-{job.id}")

    def dispatch(j: Job) -> Dispatch:
        return Dispatch("xadd", stream, j.id)

    await store.create([job], dispatch)
    assert (await store.begin(job.id, "w1")).job is not None
    await store.create([job], dispatch)  # the same call, sent again
    again = await store.get(job.id)
    assert again is not None and again.state is JobState.RUNNING and again.attempts == 1
    assert await store.redis.xlen(stream) == 1


async def test_a_begin_sent_twice_counts_one_attempt(store: JobStore) -> None:
    """The second sending of a begin finds its own attempt running: it neither counts a
    second attempt nor, on a job's last one, sends the job to the dead letter."""
    job_id = await _job_in(store, JobState.QUEUED, max_attempts=1)
    call = store._begin_args(job_id, "w1")
    begin_keys = [keys.job(job_id), keys.STATS, keys.DELAYED]
    first = await store.batch.script("begin", begin_keys, call)
    again = await store.batch.script("begin", begin_keys, call)
    assert first[0] == again[0] == "run"
    job = await store.get(job_id)
    assert job is not None and job.state is JobState.RUNNING and job.attempts == 1
    # A begin of another attempt (a redelivery) is counted, as before.
    assert (await store.begin(job_id, "w2")).reason == "dead"


async def test_a_finish_sent_twice_is_reported_as_done_both_times(store: JobStore) -> None:
    """The second sending of a succeed finds the job finished with its own fields: it says
    moved (the runner must not think its result was dropped) and counts nothing again; a
    different finish is still refused."""
    job_id = await _job_in(store, JobState.RUNNING)
    fields = {"result": "1", "finished_at": now_iso()}
    assert await store.transition(job_id, JobState.SUCCEEDED, fields) == (True, JobState.RUNNING)
    assert (await store.transition(job_id, JobState.SUCCEEDED, fields))[0] is True
    counted = await store.redis.hget(keys.STATS, "succeeded\tasyncio\tio.echo")
    assert counted == "1"
    other = {"result": "2", "finished_at": now_iso()}
    assert await store.transition(job_id, JobState.SUCCEEDED, other) == (
        False,
        JobState.SUCCEEDED,
    )
