"""Nothing lost: accepted jobs survive a Redis restart and a gateway crash."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import aiohttp
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from celery.exceptions import Reject
from redis.exceptions import ConnectionError as RedisConnectionError

from service import ids, keys, middleware, store
from service.engines.celery_ import CELERY_TASK
from service.engines.celery_worker import build_worker_app
from service.jobs import Job
from service.settings import Settings
from service.store import Dispatch, JobStore, connect
from service.worker_runtime import WorkerConfig, run_job_here
from tests.conftest import Gateway, start_gateway, wait_state
from tests.fleet_tasks import LOCAL_GATES, LocalGate
from tests.procs import Proc, RedisServer, env_with, free_port, gateway_process


async def test_queued_jobs_survive_a_redis_restart(
    bare_gateway: Gateway, redis_server: RedisServer, redis: aioredis.Redis, settings: Settings
) -> None:
    """Jobs accepted (202) before Redis restarts run after it, and the gateway keeps serving."""
    ids = [(await bare_gateway.submit("io.echo", i))["id"] for i in range(20)]
    redis_server.restart()
    env = env_with(COREFLEET_REDIS_URL=settings.redis)
    worker = Proc(["io-worker"], env)
    try:
        results = [(await bare_gateway.wait(job_id))["result"] for job_id in ids]
    finally:
        worker.stop()
    assert results == list(range(20))
    # The gateway reconnects on its own: a new submit after the restart is accepted.
    assert (await bare_gateway.submit("io.echo", "after"))["state"] == "queued"


async def test_delayed_jobs_survive_a_redis_restart(
    bare_gateway: Gateway, redis_server: RedisServer, redis: aioredis.Redis, settings: Settings
) -> None:
    """A job waiting for its delay_s is in Redis: after a restart of Redis it is still due,
    and the gateway's scheduler, reconnected, queues it on time."""
    job = await bare_gateway.submit("io.echo", "later", delay_s=1.5)
    redis_server.restart()
    worker = Proc(["io-worker"], env_with(COREFLEET_REDIS_URL=settings.redis))
    try:
        done = await bare_gateway.wait(job["id"])
    finally:
        worker.stop()
    assert done["state"] == "succeeded" and done["result"] == "later"
    assert done["started_at"] >= job["run_at"]  # ISO 8601 in UTC sorts as time does


async def test_running_jobs_survive_a_gateway_crash(
    redis: aioredis.Redis, settings: Settings
) -> None:
    """kill -9 of a gateway running jobs on its embedded worker: a new gateway finishes them."""
    port = free_port()
    env = env_with(
        COREFLEET_REDIS_URL=settings.redis,
        COREFLEET_PORT=str(port),
        COREFLEET_IO_LEASE_S="1",
        COREFLEET_TASK_MODULES="tests.fleet_tasks",
    )
    first, url = await asyncio.to_thread(gateway_process, env)
    second: Proc | None = None
    try:
        async with aiohttp.ClientSession() as session:
            ids = []
            for _ in range(5):
                async with session.post(
                    url + "/v1/jobs", json={"task": "test.hold", "args": [1.0]}
                ) as resp:
                    assert resp.status == 202
                    ids.append((await resp.json())["id"])
            for job_id in ids:
                await wait_state(redis, job_id, "running")
            first.kill()
            second, _ = await asyncio.to_thread(gateway_process, env)
            for job_id in ids:
                async with session.get(f"{url}/v1/jobs/{job_id}?wait=30") as resp:
                    record = await resp.json()
                assert record["state"] == "succeeded" and record["attempts"] == 2
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_a_worker_process_store_rides_out_a_redis_restart(
    redis_server: RedisServer, redis: aioredis.Redis
) -> None:
    """The store a Celery, Ray or Dask worker keeps across jobs (one call at a time, a
    pooled connection) reconnects after Redis restarts, instead of failing the next job's
    first call with "Connection closed by server"."""
    store = JobStore(connect(redis_server.url), 60, group_commit=False)
    job = Job(id=ids.new_id(), task="io.echo", kind="io", engine="asyncio", queue="io")
    await store.create([job], lambda j: Dispatch("xadd", keys.stream(j.queue), j.id))
    # Blocking on purpose: a worker's loop runs only during a job, so nothing reads the
    # closed socket before the next job's first call.
    redis_server.restart()
    begun = await store.begin(job.id, "worker-1")  # the first call after the restart
    assert begun.job is not None and begun.job.attempts == 1  # the test Redis keeps data
    await store.redis.aclose()


@pytest.fixture
def quick_give_up(monkeypatch: pytest.MonkeyPatch) -> float:
    """Requests give up on an absent Redis sooner (3 retries, about 0.7 s, and a 3 s
    deadline, where the defaults are 8 retries, about 5 s, and 6 s), so that the outage
    tests below need not last as long; yields the deadline (still above the readiness
    check's own 2 s)."""
    monkeypatch.setattr(store, "RETRIES", 3)
    monkeypatch.setattr(middleware, "STORE_DEADLINE_S", 3.0)
    return 3.0


@pytest.mark.usefixtures("quick_give_up")
async def test_an_unreachable_store_gets_a_503_and_changes_nothing(settings: Settings) -> None:
    """With Redis away past the client's retries, requests get a JSON 503 that says so and
    when to try again (no 500, no traceback), and nothing is half-written: once Redis is
    back the gateway serves again and holds exactly the jobs accepted before."""
    own = RedisServer()  # this test's own: the session's Redis stays up for the others
    own.start()
    store_settings = replace(settings, redis_url=own.url, task_modules=())
    server, session = await start_gateway(
        replace(store_settings, gateway=replace(store_settings.gateway, embedded_io_worker=False))
    )
    gateway = Gateway(server, session)
    try:
        accepted = await gateway.submit("io.echo", 1)
        own.stop()
        status, body = await gateway.call("POST", "/v1/jobs", json={"task": "io.echo", "args": [2]})
        assert status == 503 and body["error"]["code"] == "store_unavailable", body
        assert "Redis" in body["error"]["message"]
        async with session.get(f"{gateway.url}/v1/jobs/{accepted['id']}") as resp:
            assert resp.status == 503 and resp.headers["Retry-After"].isdigit()
        own.start()
        status, job = await gateway.call("GET", f"/v1/jobs/{accepted['id']}")
        assert status == 200 and job["state"] == "queued"
        check = aioredis.Redis.from_url(own.url, decode_responses=True)
        assert [key async for key in check.scan_iter(keys.job("*"))] == [keys.job(job["id"])]
        await check.aclose()
    finally:
        await session.close()
        await server.close()
        own.stop()


async def test_a_redis_that_never_answers_gets_a_503_not_a_hang(
    settings: Settings, quick_give_up: float
) -> None:
    """A Redis that takes connections and never answers (stopped here; a host cut off
    without a reset looks the same) makes no request hang: each is answered 503 once the
    wait it asked for and the store deadline have passed. Once Redis answers again, so
    does the gateway."""
    own = RedisServer()
    own.start()
    store_settings = replace(settings, redis_url=own.url, task_modules=())
    server, session = await start_gateway(
        replace(store_settings, gateway=replace(store_settings.gateway, embedded_io_worker=False))
    )
    gateway = Gateway(server, session)
    assert own.proc is not None
    try:
        accepted = await gateway.submit("io.echo", 1)
        os.kill(own.proc.pid, signal.SIGSTOP)
        body = {"task": "io.echo", "args": [2]}

        async def scrape() -> tuple[int, str]:
            async with session.get(f"{gateway.url}/metrics") as response:
                return response.status, await response.text()

        async with asyncio.timeout(3 * quick_give_up):  # each would hang without it
            answers = await asyncio.gather(
                gateway.call("POST", "/v1/jobs", json=body),
                gateway.call("POST", "/v1/jobs?wait=1", json=body),
                gateway.call("GET", f"/v1/jobs/{accepted['id']}"),
                gateway.call("GET", "/v1/jobs"),
                gateway.call("GET", "/readyz"),
            )
            metrics_status, metrics = await scrape()
        *stored, (ready_status, ready) = answers
        # A scrape still answers, says Redis did not, and keeps the HTTP metrics.
        assert metrics_status == 200 and "\ncorefleet_redis_up 0\n" in metrics, metrics
        assert "corefleet_http_requests_total{" in metrics
        assert "corefleet_jobs_submitted_total" not in metrics
        for status, reply in stored:
            assert status == 503 and reply["error"]["code"] == "store_unavailable", reply
        # Readiness says which check failed, within its own time.
        assert ready_status == 503 and ready["checks"]["redis"] == "unreachable: TimeoutError"
        os.kill(own.proc.pid, signal.SIGCONT)
        status, job = await gateway.call("GET", f"/v1/jobs/{accepted['id']}")
        assert status == 200 and job["state"] == "queued"
        assert (await gateway.submit("io.echo", 3))["state"] == "queued"
        assert "\ncorefleet_redis_up 1\n" in (await scrape())[1]
    finally:
        os.kill(own.proc.pid, signal.SIGCONT)
        await session.close()
        await server.close()
        own.stop()


@pytest.mark.usefixtures("quick_give_up")
async def test_a_job_runner_waits_out_redis_for_as_long_as_it_is_away() -> None:
    """The store of a Celery, Ray or Dask worker's job runner keeps trying after a request
    would have given up: a job Celery already handed over is not dropped by an outage."""
    own = RedisServer()
    own.start()
    config = WorkerConfig(own.url, 60, ())
    request = connect(own.url)  # what the gateway uses: gives up after some retries
    store = JobStore(request, 60)
    job = Job(id=ids.new_id(), task="io.echo", kind="io", engine="asyncio", queue="io", args=["x"])
    await store.create([job], lambda j: Dispatch("xadd", keys.stream(j.queue), j.id))
    own.stop()
    running = asyncio.create_task(asyncio.to_thread(run_job_here, config, job.id, "test"))
    try:
        # Two requests give up one after the other meanwhile: the runner, started first, has
        # been without Redis for longer than a request's retries, twice over.
        for _ in range(2):
            with pytest.raises(RedisConnectionError):
                await store.get(job.id)
        assert not running.done(), running.result()
        own.start()
        assert await asyncio.wait_for(running, 30) == "succeeded"
        record = await store.get(job.id)
        assert record is not None and record.result == "x" and record.attempts == 1
    finally:
        if not running.done():  # let the runner's thread end, or it holds the test run open
            if own.proc is None:
                own.start()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(running, 30)
        await request.aclose()
        own.stop()


@pytest.mark.usefixtures("quick_give_up")
async def test_an_io_job_that_ends_while_redis_is_away_is_stored_once_it_is_back(
    settings: Settings,
) -> None:
    """An io job whose task ends while Redis is away waits to store its outcome, for as
    long as Redis is away: it is not run again once its lease runs out (nor ends dead, on
    its only attempt)."""
    own = RedisServer()
    own.start()
    request = connect(own.url)  # what the gateway's API uses: gives up after some retries
    store = JobStore(request, 60)
    server, session = await start_gateway(replace(settings, redis_url=own.url))
    try:
        url = str(server.make_url("")).rstrip("/")
        async with session.post(url + "/v1/jobs", json={"task": "test.local_gate"}) as resp:
            assert resp.status == 202
            job_id = (await resp.json())["id"]
        gate = LOCAL_GATES.setdefault(job_id, LocalGate())
        await asyncio.wait_for(gate.started.wait(), 30)
        own.stop()
        gone = time.monotonic()
        gate.release.set()
        # Two requests give up one after the other meanwhile: the runner, whose task ended
        # first, has been without Redis for longer than a request's retries, twice over.
        for _ in range(2):
            with pytest.raises(RedisConnectionError):
                await store.get(job_id)
        # And for longer than the job's lease: had it given up, the job would run again.
        assert time.monotonic() - gone > settings.io.lease_s
        own.start()
        async with session.get(f"{url}/v1/jobs/{job_id}?wait=30") as resp:
            record = await resp.json()
        assert (record["state"], record["result"], record["attempts"]) == ("succeeded", 1, 1)
    finally:
        if own.proc is None:
            own.start()  # let the gateway's runners end
        await session.close()
        await server.close()
        await request.aclose()
        own.stop()
        LOCAL_GATES.clear()


def test_a_celery_child_puts_back_a_job_redis_refused_to_record() -> None:
    """Redis answering with an error (here: out of memory) as a Celery child begins a job:
    the message goes back to the queue (``Reject(requeue=True)``) instead of being
    acknowledged with the job left queued and nothing to run it. Once Redis takes writes
    again, the job runs."""
    own = RedisServer()
    own.start()
    control = sync_redis.Redis.from_url(own.url, decode_responses=True)
    try:
        settings = Settings(redis_url=own.url)
        app = build_worker_app(settings)
        # Messages without corefleet's timelimit header (bare send_task) get the default.
        assert app.conf.task_time_limit == settings.celery.default_time_limit_s
        job = Job(id=ids.new_id(), task="io.echo", kind="cpu", engine="celery", queue="cpu")
        job.args = ["x"]

        async def create() -> None:
            store = JobStore(connect(own.url), 60)
            await store.create([job], lambda j: Dispatch("xadd", "cf:stream:nobody-reads", j.id))
            await store.redis.aclose()

        asyncio.run(create())
        run = app.tasks[CELERY_TASK].run
        with ThreadPoolExecutor(1) as child:  # one thread, as a child's one runner
            control.config_set("maxmemory", 1)  # every write is refused: OOM
            with pytest.raises(Reject):
                child.submit(run, job.id).result(timeout=60)
            assert control.hget(f"cf:job:{job.id}", "state") == "queued"
            control.config_set("maxmemory", 0)
            child.submit(run, job.id).result(timeout=60)
        assert control.hget(f"cf:job:{job.id}", "state") == "succeeded"
    finally:
        control.close()
        own.stop()
