"""cpu jobs on real Celery prefork workers: answers, routing, limits, kills and cancels."""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest
import redis.asyncio as aioredis

from clients import AsyncProducer, InvalidArguments
from service import presence
from service.engines.celery_ import celery_lists
from service.settings import Settings
from tests.conftest import (
    CeleryWorker,
    Gateway,
    celery_waiting,
    wait_gone,
    wait_state,
    wait_workers,
)
from tests.procs import Proc

pytestmark = pytest.mark.usefixtures("celery_worker")


async def _started(redis: aioredis.Redis, job_id: str) -> tuple[int, int]:
    """Wait until the task recorded a start; its (attempt, pid)."""
    _key, value = await redis.blpop([f"test:started:{job_id}"], timeout=60)
    attempt, pid = value.split(":")
    return int(attempt), int(pid)


async def test_count_primes_known_answer(gateway: Gateway) -> None:
    """cpu.count_primes(1,000,000) runs on a Celery worker and finds 78,498 primes."""
    job = await gateway.submit("cpu.count_primes", 1_000_000)
    assert (job["engine"], job["queue"], job["kind"]) == ("celery", "cpu", "cpu")
    done = await gateway.wait(job["id"], 60)
    assert done["state"] == "succeeded" and done["result"] == 78498


def _mandelbrot_reference(width: int, height: int, max_iter: int) -> int:
    """The same iteration in NumPy, with the kernel's arithmetic (so rounding agrees)."""
    cr = np.broadcast_to(-2.0 + 3.0 * np.arange(width) / width, (height, width))
    ci = np.broadcast_to((-1.5 + 3.0 * np.arange(height) / height)[:, None], (height, width))
    zr = np.zeros((height, width))
    zi = np.zeros((height, width))
    counts = np.zeros((height, width), dtype=np.int64)
    for _ in range(max_iter):
        inside = zr * zr + zi * zi <= 4.0
        zr, zi = (
            np.where(inside, zr * zr - zi * zi + cr, zr),
            np.where(inside, 2.0 * zr * zi + ci, zi),
        )
        counts += inside
    return int(counts.sum())


async def test_mandelbrot_matches_numpy(gateway: Gateway) -> None:
    """cpu.mandelbrot's Numba checksum equals a NumPy computation of the same grid."""
    done = await gateway.wait((await gateway.submit("cpu.mandelbrot", 120, 80, 60))["id"], 60)
    assert done["state"] == "succeeded", done
    assert done["result"]["checksum"] == _mandelbrot_reference(120, 80, 60)


async def test_monte_carlo_pi_matches_numpys_stream(gateway: Gateway) -> None:
    """cpu.monte_carlo_pi uses the seeded stream NumPy gives: same hits, pi within 0.01."""
    samples, seed = 200_000, 7
    job = await gateway.submit("cpu.monte_carlo_pi", samples, seed)
    done = await gateway.wait(job["id"], 60)
    np.random.seed(seed)
    points = np.random.random(2 * samples)
    hits = int(((points[0::2] ** 2 + points[1::2] ** 2) <= 1.0).sum())
    assert done["result"]["hits"] == hits
    assert abs(done["result"]["pi"] - np.pi) < 0.01


async def test_a_raising_cpu_task_fails_with_its_own_error(gateway: Gateway) -> None:
    """An exception in a worker process becomes the job's error, type and message."""
    done = await gateway.wait((await gateway.submit("test.cpu_boom", "nope"))["id"], 60)
    assert done["state"] == "failed" and done["error"]["type"] == "KeyError"


async def test_a_per_job_queue_routes_elsewhere(gateway: Gateway, redis: aioredis.Redis) -> None:
    """options.queue sends the message to that Celery queue; no worker there, so it waits."""
    job = await gateway.submit("cpu.count_primes", 10, queue="cpu-elsewhere")
    assert job["queue"] == "cpu-elsewhere"
    assert await celery_waiting(redis, "cpu-elsewhere") == 1
    assert await redis.hget(f"cf:job:{job['id']}", "state") == "queued"


async def test_time_limit_fails_the_job_and_the_worker_carries_on(
    gateway: Gateway, celery_worker: CeleryWorker, redis: aioredis.Redis
) -> None:
    """A job past its limit fails with TimeLimitExceeded; its child is replaced."""
    job = await gateway.submit("test.cpu_hold", 60, timeout_s=1)
    _attempt, pid = await _started(redis, job["id"])
    done = await gateway.wait(job["id"], 60)
    assert done["state"] == "failed" and done["error"]["type"] == "TimeLimitExceeded"
    await wait_gone(pid)
    after = await gateway.wait((await gateway.submit("cpu.count_primes", 100))["id"], 60)
    assert after["result"] == 25


async def test_a_time_limit_redis_refused_to_record_puts_the_job_back(
    gateway: Gateway, redis: aioredis.Redis, celery_worker: CeleryWorker
) -> None:
    """The hard time limit's failure is stored before Celery acknowledges the message; where
    Redis refuses it (here the record is, for a moment, a key of another type), the
    message goes back on its queue and the job runs again once Redis takes writes. Celery
    acknowledged first: the job stayed ``running`` with nothing to run it."""
    env = dict(celery_worker.env, COREFLEET_WORKER_QUEUES="limits")
    worker = Proc(["worker", "--concurrency", "1"], env)
    try:
        job = await gateway.submit("test.cpu_slow_first", timeout_s=1, queue="limits")
        attempt, pid = await _started(redis, job["id"])
        assert attempt == 1
        key = f"cf:job:{job['id']}"
        record = await redis.hgetall(key)
        await redis.delete(key)
        await redis.rpush(key, "not a record")  # writes to it fail with WRONGTYPE
        await wait_gone(pid)  # the limit's handling (store, then ack or requeue) came first
        await redis.delete(key)
        await redis.hset(key, mapping=record)
        done = await gateway.wait(job["id"], 60)
        assert (done["state"], done["result"], done["attempts"]) == ("succeeded", 2, 2), done
    finally:
        worker.stop()


async def test_a_killed_child_means_the_job_runs_again(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """kill -9 of the child running a job: it is delivered again, succeeds, 2 attempts."""
    job = await gateway.submit("test.cpu_hold", 1.0)
    attempt, pid = await _started(redis, job["id"])
    assert attempt == 1
    os.kill(pid, signal.SIGKILL)
    done = await gateway.wait(job["id"], 60)
    assert done["state"] == "succeeded" and done["attempts"] == 2 and done["result"] == 2


async def test_a_job_that_always_kills_its_worker_ends_dead(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """A task that kills its process on every attempt ends dead after 3 attempts."""
    job = await gateway.submit("test.cpu_die")
    state = await wait_state(redis, job["id"], "dead", "succeeded", "failed", within=90)
    assert state == "dead"
    done = await gateway.wait(job["id"])
    assert done["attempts"] == 3 and done["error"]["type"] == "WorkerLost"
    assert await redis.llen(f"test:started:{job['id']}") == 3


async def test_cancel_of_a_queued_cpu_job_means_it_never_runs(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """With both children busy, a queued job cancelled now never starts afterwards."""
    busy = [await gateway.submit("test.cpu_hold", 1.5) for _ in range(2)]
    for job in busy:
        await _started(redis, job["id"])
    target = await gateway.submit("test.cpu_hold", 0)
    status, body = await gateway.call("DELETE", f"/v1/jobs/{target['id']}")
    assert status == 200 and body["state"] == "cancelled"
    for job in busy:
        assert (await gateway.wait(job["id"], 60))["state"] == "succeeded"
    marker = await gateway.wait((await gateway.submit("cpu.count_primes", 10))["id"], 60)
    assert marker["state"] == "succeeded"
    # The worker has taken the cancelled message and skipped it: the list is empty.
    assert await celery_waiting(redis, "cpu") == 0
    assert await redis.llen(f"test:started:{target['id']}") == 0
    assert (await gateway.wait(target["id"]))["attempts"] == 0


async def test_cancel_of_a_running_cpu_job_terminates_it(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """DELETE on a running cpu job terminates its child and the job ends cancelled."""
    job = await gateway.submit("test.cpu_hold", 60)
    _attempt, pid = await _started(redis, job["id"])
    status, body = await gateway.call("DELETE", f"/v1/jobs/{job['id']}")
    assert status == 200 and body["state"] == "cancelled"
    await wait_gone(pid)
    assert (await gateway.wait(job["id"]))["state"] == "cancelled"


async def test_cancel_of_a_cpu_job_in_native_code_kills_its_child(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """A child in native code (a Numba loop, a long NumPy call) never returns to Python's
    signal handlers: the cancel kills it (SIGKILL) rather than ask it to exit."""
    job = await gateway.submit("test.cpu_native_loop")
    _attempt, pid = await _started(redis, job["id"])
    status, body = await gateway.call("DELETE", f"/v1/jobs/{job['id']}")
    assert status == 200 and body["state"] == "cancelled"
    await wait_gone(pid)


async def test_producer_enqueues_exactly_like_the_gateway(
    gateway: Gateway, settings: Settings, redis: aioredis.Redis
) -> None:
    """AsyncProducer validates, stores and queues without HTTP; a worker runs the job."""
    async with AsyncProducer(settings.redis, task_modules=["tests.fleet_tasks"]) as producer:
        job = await producer.submit("cpu.count_primes", 1000)
        assert job.engine == "celery"
        before = set(await redis.keys("cf:job:*"))
        with pytest.raises(InvalidArguments):
            await producer.submit("cpu.count_primes", "many")
        assert set(await redis.keys("cf:job:*")) == before
    done = await gateway.wait(job.id, 60)
    assert done["state"] == "succeeded" and done["result"] == 168


async def test_queues_show_celery_workers(gateway: Gateway, redis: aioredis.Redis) -> None:
    """GET /v1/queues lists the cpu queue with its live worker."""
    await wait_workers(redis, "cpu")
    status, body = await gateway.call("GET", "/v1/queues")
    assert status == 200
    assert body["engines"]["celery"]["queues"]["cpu"]["workers"] >= 1


async def test_queues_show_every_queue_a_live_worker_consumes(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """A worker started with --queues bulk checks in with its queues: GET /v1/queues shows
    bulk, its waiting jobs and its worker; once the worker is gone and bulk is empty, not."""
    name = "corefleet-bulk-test@here"
    info = {"kind": "celery", "queues": ["bulk"], "concurrency": 1}
    await presence.check_in(redis, name, ("bulk",), info)
    job = await gateway.submit("cpu.count_primes", 10, queue="bulk")
    _status, queues = await gateway.call("GET", "/v1/queues")
    bulk = queues["engines"]["celery"]["queues"]["bulk"]
    assert (bulk["waiting"], bulk["workers"]) == (1, 1)
    await gateway.call("DELETE", f"/v1/jobs/{job['id']}")
    await redis.delete(*celery_lists("bulk"))  # the cancelled job's message, as if consumed
    await presence.leave(redis, name, ("bulk",))
    _status, queues = await gateway.call("GET", "/v1/queues")
    assert "bulk" not in queues["engines"]["celery"]["queues"]
    assert {"cpu", "gpu"} <= set(queues["engines"]["celery"]["queues"])


async def test_a_stopped_worker_puts_its_running_job_back_at_once(
    gateway: Gateway, redis: aioredis.Redis, celery_worker: CeleryWorker
) -> None:
    """SIGTERM (what systemd, ``docker stop`` and ``corefleet up`` send) gives a running job
    the grace, then stops it and puts its message back on the queue: the next worker runs
    it at once. Celery's own SIGTERM waited for the job, the SIGKILL after the grace
    period followed, and the message came back only after the visibility timeout (1 h)."""
    env = dict(
        celery_worker.env,
        COREFLEET_WORKER_QUEUES="stopping",
        COREFLEET_WORKER_SHUTDOWN_GRACE_S="0.5",
    )
    first = Proc(["worker", "--concurrency", "1"], env)
    try:
        job = await gateway.submit("test.cpu_held_until_released", queue="stopping")
        attempt, _pid = await _started(redis, job["id"])
        assert attempt == 1
        first.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.proc.wait, 30) is not None
        assert await celery_waiting(redis, "stopping") == 1  # back on its queue
    finally:
        first.stop()
    second = Proc(["worker", "--concurrency", "1"], env)
    try:
        attempt, _pid = await _started(redis, job["id"])
        assert attempt == 2
        await redis.rpush(f"test:release:{job['id']}", 1)
        done = await gateway.wait(job["id"], 60)
        assert (done["state"], done["result"], done["attempts"]) == ("succeeded", 2, 2), done
    finally:
        second.stop()


async def test_a_stopped_worker_puts_back_a_later_attempt_too(
    gateway: Gateway, redis: aioredis.Redis, celery_worker: CeleryWorker
) -> None:
    """Every message of a job carries the job's id as its Celery task id, and an attempt
    that asked for a retry ended as a Celery success: its id must not make a stopping
    worker leave the next attempt, run by the same worker, to run on (for its whole time
    limit, or until a SIGKILL; its message came back only after the visibility timeout)."""
    env = dict(
        celery_worker.env,
        COREFLEET_WORKER_QUEUES="stopping-later",
        COREFLEET_WORKER_SHUTDOWN_GRACE_S="0.5",
    )
    worker = Proc(["worker", "--concurrency", "1"], env)
    try:
        job = await gateway.submit("test.cpu_retry_then_hold", queue="stopping-later")
        attempt, _pid = await _started(redis, job["id"])
        assert attempt == 2  # the first asked for a retry; this worker took the retry
        worker.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.proc.wait, 30) is not None
        assert await celery_waiting(redis, "stopping-later") == 1  # back on its queue
    finally:
        worker.stop()
