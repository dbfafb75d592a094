"""Heavy jobs on a real local Ray and a real Dask cluster, each started once per session."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis

from service import ids, keys, presence
from service.engines import dask_
from service.engines.cluster import DISPATCH_CONCURRENCY, ClusterEngine, ray_options
from service.engines.ray_ import RayEngine, start_ray
from service.engines.ray_dispatcher import (
    ASK_COUNTS_S,
    MIN_IN_FLIGHT,
    RecentLowest,
    ensure_dispatcher,
    in_flight_for,
)
from service.engines.ray_runners import IDLE_S, Runner, WarmRunners, shape_of
from service.errors import InvalidBody
from service.jobs import Job
from service.settings import EngineSettings, Settings
from service.store import Dispatch, JobStore
from service.worker_runtime import WorkerConfig
from tasks.heavy import block_sizes, pi_chunk, random_block, seeded_matrices, split
from tests.conftest import Gateway, start_gateway, wait_gone, wait_state
from tests.procs import (
    Proc,
    RedisServer,
    env_with,
    free_port,
    gateway_process,
    wait_until,
)


# Module scope is once per session (only this module uses Ray), and Ray, with its detached
# dispatcher, stops before other modules' tests, which expect nothing else using Redis.
@pytest.fixture(scope="module")
def local_ray(redis_server: RedisServer) -> Iterator[str]:
    """A local Ray of 2 CPUs in its own temp dir (after Redis: workers inherit its URL);
    yields its address, which gateways connect to through their Ray keeper."""
    temp_dir = tempfile.mkdtemp(prefix="cf-ray-test-", dir="/tmp")
    start_ray(EngineSettings(ray_cpus=2), temp_dir, log_to_driver=False)
    import ray

    yield str(ray.get_runtime_context().gcs_address)
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def dask_scheduler(redis_server: RedisServer) -> Iterator[str]:
    """A Dask LocalCluster of 2 single-thread worker processes; yields its address."""
    from distributed import LocalCluster

    cluster = LocalCluster(
        processes=True, n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0"
    )
    yield str(cluster.scheduler_address)
    cluster.close()


@pytest.fixture
async def heavy_gateway(
    settings: Settings, redis: aioredis.Redis, local_ray: str, dask_scheduler: str
) -> AsyncIterator[Gateway]:
    engines = replace(settings.engines, dask_address=dask_scheduler, ray_address=local_ray)
    server, session = await start_gateway(replace(settings, engines=engines))
    yield Gateway(server, session)
    await session.close()
    await server.close()


async def test_heavy_tasks_give_their_known_answers(
    heavy_gateway: Gateway, dask_scheduler: str, local_ray: str, redis: aioredis.Redis
) -> None:
    """heavy.pi, heavy.matmul_blocks (Ray) and heavy.array_stats (Dask) match NumPy."""
    pi_job = await heavy_gateway.submit("heavy.pi", 200_000, 4, 7)
    mm_job = await heavy_gateway.submit("heavy.matmul_blocks", 96, 32, 3)
    st_job = await heavy_gateway.submit("heavy.array_stats", 250, 100, 5)
    assert pi_job["engine"] == "ray" and st_job["engine"] == "dask"

    pi = await heavy_gateway.wait(pi_job["id"], 60)
    assert pi["state"] == "succeeded", pi
    hits = sum(pi_chunk(size, 7, i) for i, size in enumerate(split(200_000, 4)))
    assert pi["result"]["hits"] == hits and abs(pi["result"]["pi"] - math.pi) < 0.02

    mm = await heavy_gateway.wait(mm_job["id"], 60)
    assert mm["state"] == "succeeded", mm
    a, b = seeded_matrices(96, 3)
    assert mm["result"]["blocks"] == 9
    assert mm["result"]["checksum"] == pytest.approx(float((a @ b).sum()), rel=1e-9)

    st = await heavy_gateway.wait(st_job["id"], 60)
    assert st["state"] == "succeeded", st
    sizes = block_sizes(250, 100)
    whole = np.block(
        [[random_block(5, i, j, r, c) for j, c in enumerate(sizes)] for i, r in enumerate(sizes)]
    )
    assert st["result"]["mean"] == pytest.approx(float(whole.mean()), rel=1e-9)
    assert st["result"]["std"] == pytest.approx(float(whole.std()), rel=1e-9)

    status, queues = await heavy_gateway.call("GET", "/v1/queues")
    assert status == 200
    assert queues["engines"]["ray"]["state"] == f"connected to {local_ray}"
    assert queues["engines"]["dask"]["state"] == f"connected to {dask_scheduler}"
    assert queues["engines"]["ray"]["queues"]["heavy"]["waiting"] == 0
    # Ray's dispatcher runs: the gateway no longer stands in for it as a worker of Ray's
    # queue (it does until one runs, for require_worker), so the one worker is Ray's.
    async with asyncio.timeout(30):
        while True:
            kinds = [w.get("kind") for w in await presence.live(redis, "heavy")]
            if kinds == ["dispatcher"]:
                break
            await asyncio.sleep(0.1)  # sleep-ok: check-ins come every few seconds


async def test_cancelling_a_running_ray_job_kills_its_ray_task(
    heavy_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """DELETE on a running Ray job ends it cancelled and kills the worker running it."""
    job = await heavy_gateway.submit("test.ray_hold", 60)
    started = await redis.blpop([f"test:started:{job['id']}"], timeout=60)
    assert started is not None
    pid = int(started[1].split(":")[1])
    status, record = await heavy_gateway.call("DELETE", f"/v1/jobs/{job['id']}")
    assert status == 200 and record["state"] == "cancelled"
    await wait_gone(pid)  # ray.cancel(force=True) killed the Ray worker process
    assert await redis.hget(f"cf:job:{job['id']}", "state") == "cancelled"


async def _warm_runner(
    gateway: Gateway, resources: dict[str, float], first: str | None = "task"
) -> dict[str, Any]:
    """Run ``test.ray_where`` jobs of ``resources`` one after another until one runs in a
    warm runner; where it ran. ``first="task"``: the first job runs as a Ray task (a lone
    job starts no runner). Until the runner's process is up (seconds, here), the jobs go
    as Ray tasks."""
    where: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = await gateway.submit("test.ray_where", resources=resources)
        done = await gateway.wait(job["id"])
        assert done["state"] == "succeeded", done
        where.append(done["result"])
        if where[-1]["actor"] is not None:
            break
    if first == "task":
        assert where[0]["actor"] is None, where
    assert where[-1]["actor"] is not None, where
    return where[-1]


async def test_jobs_of_one_shape_in_a_row_go_to_a_warm_runner(heavy_gateway: Gateway) -> None:
    """Jobs asking for the same resources, one after another, reach a warm runner (a Ray
    actor, no worker lease per job), and the same one again; a job of another shape does
    not."""
    shape = {"num_cpus": 0.5}
    seen = [(await _warm_runner(heavy_gateway, shape))["actor"]]
    # The same runner again (not always the next job: one may come before the runner has
    # answered, go as a task and start a second runner).
    while len(set(seen)) == len(seen) and len(seen) < 10:
        seen.append((await _warm_runner(heavy_gateway, shape, first=None))["actor"])
    assert len(set(seen)) < len(seen), seen
    other = await heavy_gateway.submit("test.ray_where", resources={"num_cpus": 0.4})
    assert (await heavy_gateway.wait(other["id"]))["result"]["actor"] is None


async def _hold_in_a_runner(
    gateway: Gateway, redis: aioredis.Redis, shape: dict[str, float], **options: Any
) -> tuple[str, int]:
    """A ``test.ray_hold`` job of ``shape`` running in a warm runner; its id and pid."""
    for _ in range(5):
        await _warm_runner(gateway, shape, first=None)
        job = await gateway.submit("test.ray_hold", 60, resources=shape, **options)
        started = await redis.blpop([f"test:started:{job['id']}"], timeout=60)
        assert started is not None
        _attempt, pid, actor = started[1].split(":")
        if actor != "None":
            return job["id"], int(pid)
        # It came before the runner had answered, and went as a Ray task: again.
        await gateway.call("DELETE", f"/v1/jobs/{job['id']}")
    raise AssertionError("no job reached a warm runner")


# A shape each, so that neither finds the other's runner.
@pytest.mark.parametrize(("stop", "cpus"), [("cancel", 0.25), ("time limit", 0.3)])
async def test_a_running_job_in_a_warm_runner_is_killed_with_it(
    heavy_gateway: Gateway, redis: aioredis.Redis, stop: str, cpus: float
) -> None:
    """A cancel or a time limit kills the warm runner running the job (Ray refuses
    force=True for actor tasks); the job ends as it would in a Ray task, and the next job
    of its shape runs."""
    shape = {"num_cpus": cpus}
    options = {"timeout_s": 0.5} if stop == "time limit" else {}
    job_id, pid = await _hold_in_a_runner(heavy_gateway, redis, shape, **options)
    if stop == "cancel":
        status, record = await heavy_gateway.call("DELETE", f"/v1/jobs/{job_id}")
        assert status == 200 and record["state"] == "cancelled"
    else:
        done = await heavy_gateway.wait(job_id)
        assert done["state"] == "failed" and done["error"]["type"] == "TimeLimitExceeded"
    await wait_gone(pid)
    after = await heavy_gateway.submit("test.ray_where", resources=shape)
    done = await heavy_gateway.wait(after["id"])
    assert done["state"] == "succeeded" and done["result"]["pid"] != pid, done


async def test_a_job_whose_warm_runner_dies_is_delivered_again(
    heavy_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """A warm runner killed under its job (an OOM kill, say) is a lost worker: the job is
    delivered again, a new attempt, rather than failed."""
    job_id, pid = await _hold_in_a_runner(heavy_gateway, redis, {"num_cpus": 0.35})
    os.kill(pid, signal.SIGKILL)
    again = await redis.blpop([f"test:started:{job_id}"], timeout=60)
    assert again is not None and again[1].split(":")[0] == "2", again
    status, record = await heavy_gateway.call("DELETE", f"/v1/jobs/{job_id}")
    assert status == 200 and record["state"] == "cancelled"


async def test_a_job_handed_to_a_warm_runner_that_died_idle_runs_at_once(
    settings: Settings, local_ray: str
) -> None:
    """A warm runner that died while idle (an OOM kill, say) is found dead as the next job
    of its shape is handed to it: that job never began, so it goes as a Ray task at once,
    not after a lease (a minute here) as a lost worker's job would."""
    import ray

    lease = replace(settings.io, lease_s=60.0)
    engines = replace(settings.engines, ray_address=local_ray)
    server, session = await start_gateway(replace(settings, io=lease, engines=engines))
    gateway = Gateway(server, session)
    shape = {"num_cpus": 0.45}  # a shape of its own
    try:
        for _ in range(5):
            runner = await _warm_runner(gateway, shape, first=None)
            idle_from = time.monotonic()  # about when it went idle: it ends 2 s after
            os.kill(runner["pid"], signal.SIGKILL)
            async with asyncio.timeout(30):  # until Ray has marked it dead (no event for it)
                while True:
                    if ray._private.state.actors(runner["actor"])["State"] == "DEAD":
                        break
                    await asyncio.sleep(0.01)  # sleep-ok: polling Ray's record of the actor
            if time.monotonic() - idle_from > IDLE_S / 2:
                continue  # it may have ended as idle before the next job came: again
            job = await gateway.submit("test.ray_where", resources=shape)
            done = await gateway.wait(job["id"], 20)
            assert done["state"] == "succeeded" and done["attempts"] == 1, done
            assert done["result"]["actor"] != runner["actor"]
            return
        raise AssertionError("never handed a job to a dead runner in time")
    finally:
        await session.close()
        await server.close()


async def test_an_idle_warm_runner_gives_its_resources_back(heavy_gateway: Gateway) -> None:
    """A warm runner holds its CPU only while jobs keep coming: once idle it ends, and a
    job asking for every CPU of the cluster starts."""
    # A shape of its own (other tests' jobs ask for one CPU too).
    runner = await _warm_runner(heavy_gateway, {"num_cpus": 1, "memory": 2**20})
    whole = await heavy_gateway.submit("test.ray_where", resources={"num_cpus": 2})
    done = await heavy_gateway.wait(whole["id"], 60)
    assert done["state"] == "succeeded", done
    await wait_gone(runner["pid"])


def test_warm_runners_hold_at_most_half_of_each_resource() -> None:
    """Runners together never hold more than half of any of the cluster's resources (Ray
    tasks, a fan-out's children among them, find the rest), nor more runners than the
    limit; a shape holding nothing needs only room under the limit."""
    runners = WarmRunners(limit=3, task_events=False)
    runners.config = WorkerConfig("redis://", 60, ())
    runners.capacity = {"CPU": 4.0, "GPU": 1.0}
    assert runners._room_for(shape_of({}))  # one CPU of four
    assert runners._room_for(shape_of({"num_cpus": 2}))
    assert not runners._room_for(shape_of({"num_cpus": 3}))
    assert not runners._room_for(shape_of({"num_cpus": 0, "num_gpus": 1}))
    assert runners._room_for(shape_of({"num_cpus": 0, "num_gpus": 0.5}))
    assert not runners._room_for(shape_of({"memory": 1}))  # the cluster's memory is unknown
    runners._runners.add(Runner(None, shape_of({"num_cpus": 1.5}), runners.config))
    assert not runners._room_for(shape_of({}))
    assert runners._room_for(shape_of({"num_cpus": 0.5}))
    runners._runners.add(Runner(None, shape_of({"num_cpus": 0}), runners.config))
    runners._runners.add(Runner(None, shape_of({"num_cpus": 0}), runners.config))
    assert not runners._room_for(shape_of({"num_cpus": 0}))  # the limit
    assert shape_of({}) == (("num_cpus", 1),)  # a Ray task's default, which an actor lacks


async def test_a_job_counts_as_begun_in_a_dead_runner_unless_its_record_says_otherwise(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """The job of a runner found dead goes as a task at once only if it never began there:
    ``queued``, or unended and still naming the attempt it named at launch. A ``retrying``
    job names the attempt that asked for the retry: run again now, it would skip its
    backoff (and run twice once the retry fell due)."""
    engine = RayEngine(redis, settings)
    job = Job(id=ids.new_id(), task="test.ray_where", kind="heavy", engine="ray", queue="heavy")
    cases = [  # state, attempt in the record, attempt read at launch (None: not read)
        ("queued", None, None, True),
        ("queued", None, "", True),
        ("running", "a1", "a1", True),  # a lost worker's attempt, named at launch still
        ("retrying", "a1", "a1", True),
        ("running", "a2", "a1", False),  # begun in the runner
        ("retrying", "a2", "a1", False),  # begun, and asked for a retry
        ("retrying", "a1", None, False),  # not known: delivered again after the lease
        ("succeeded", "a1", "a1", False),  # ended: nothing to run
    ]
    for state, attempt, before, never_began in cases:
        await redis.delete(keys.job(job.id))
        await redis.hset(keys.job(job.id), mapping={"state": state, "attempt_id": attempt or ""})
        if attempt is None:
            await redis.hdel(keys.job(job.id), "attempt_id")
        engine._attempt_before.pop(job.id, None)
        if before is not None:
            engine._attempt_before[job.id] = before
        assert await engine._never_began(job) is never_began, (state, attempt, before)


def test_warm_runners_beyond_a_new_limit_end_when_it_comes() -> None:
    """A lower limit, or a cluster that shrank, ends idle runners beyond it at once, the
    longest idle first, and busy ones as their job ends; not after a job more each."""
    runners = WarmRunners(limit=3, task_events=False)
    runners.config = WorkerConfig("redis://", 60, ())
    shape = shape_of({"num_cpus": 0.5})
    idle = [Runner(None, shape, runners.config, idle_since=t, ready=True) for t in (2.0, 1.0)]
    busy = Runner(None, shape, runners.config, ready=True)
    runners._runners |= {*idle, busy}
    runners._idle[shape] = list(idle)
    runners.resize(3, {"CPU": 4.0})
    assert not any(r.ended for r in (*idle, busy))
    runners.resize(2, {"CPU": 4.0})
    assert [r.ended for r in (*idle, busy)] == [False, True, False]  # the longest idle
    runners.resize(2, {"CPU": 1.0})  # half of it: one runner of half a CPU
    assert [r.ended for r in (*idle, busy)] == [True, True, False]
    assert runners._runners == {busy} and not runners._idle


def test_the_dispatcher_takes_the_lowest_setting_gateways_asked_for_lately() -> None:
    """Gateways set apart (a rolling deploy) do not set the warm runners' limit or the jobs
    in flight in turns: the lowest asked for within a few serves holds."""
    lowest = RecentLowest()
    assert lowest.ask(4, now=0.0) == 4
    assert lowest.ask(0, now=1.0) == 0
    assert lowest.ask(4, now=5.0) == 0  # the gateway that asked for 0 still counts
    assert lowest.ask(4, now=1.0 + ASK_COUNTS_S + 0.1) == 4  # until it has stopped asking


async def _until_held(
    redis: aioredis.Redis, count: Callable[[int], bool], stream: str = "cf:stream:heavy"
) -> None:
    """Until the number of entries a dispatcher holds (read, not acknowledged) on ``stream``
    passes ``count``: a stream's pending count has no event to wait on."""
    async with asyncio.timeout(30):
        while True:
            if count(int((await redis.xpending(stream, "corefleet-io"))["pending"])):
                return
            await asyncio.sleep(0.05)  # sleep-ok: polling a count that has no event


async def test_a_ray_job_cancelled_while_waiting_for_a_cpu_never_runs(
    heavy_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """Two jobs hold Ray's 2 CPUs; a third, launched and waiting in Ray, is cancelled: its
    Ray task is dropped at once (its entry acknowledged while the CPUs are still held), and
    it never runs once they are free."""
    gates = [await heavy_gateway.submit("test.ray_gate") for _ in range(2)]
    for gate in gates:
        assert await redis.blpop([f"test:started:{gate['id']}"], timeout=60) is not None
    waiting = await heavy_gateway.submit("test.ray_gate")
    await _until_held(redis, lambda held: held == 3)  # the dispatcher launched it
    status, record = await heavy_gateway.call("DELETE", f"/v1/jobs/{waiting['id']}")
    assert status == 200 and record["state"] == "cancelled"
    await _until_held(redis, lambda held: held == 2)
    for gate in gates:
        await redis.rpush(f"test:release:{gate['id']}", "go")
    for gate in gates:
        assert (await heavy_gateway.wait(gate["id"]))["state"] == "succeeded"
    await _until_held(redis, lambda held: held == 0)
    assert await redis.llen(f"test:started:{waiting['id']}") == 0
    assert await redis.hget(f"cf:job:{waiting['id']}", "attempts") == "0"
    assert await redis.hget(f"cf:job:{waiting['id']}", "state") == "cancelled"


async def test_a_running_dask_job_is_cancelled_cooperatively(
    heavy_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """A cancelled Dask job's task sees ctx.cancelled() turn true, and the job stays cancelled."""
    job = await heavy_gateway.submit("test.dask_until_cancelled")
    assert await redis.blpop([f"test:started:{job['id']}"], timeout=60) is not None
    status, record = await heavy_gateway.call("DELETE", f"/v1/jobs/{job['id']}")
    assert status == 200 and record["state"] == "cancelled"
    saw = await redis.blpop([f"test:saw_cancel:{job['id']}"], timeout=30)
    assert saw is not None and saw[1] == "True"
    assert await wait_state(redis, job["id"], "cancelled") == "cancelled"


async def test_a_raising_task_fails_with_its_own_error(heavy_gateway: Gateway) -> None:
    """An exception raised inside Ray or Dask is the failed job's error type and message."""
    ray_job = await heavy_gateway.submit("test.ray_boom", "too big")
    dask_job = await heavy_gateway.submit("test.dask_boom", "not there")
    bad_pi = await heavy_gateway.submit("heavy.pi", 1, 2)
    expected = {
        ray_job["id"]: {"type": "OverflowError", "message": "too big"},
        dask_job["id"]: {"type": "LookupError", "message": "not there"},
        bad_pi["id"]: {"type": "ValueError", "message": "chunks must not exceed samples"},
    }
    for job_id, error in expected.items():
        record = await heavy_gateway.wait(job_id, 60)
        assert record["state"] == "failed" and record["error"] == error, record


async def test_an_unreachable_engine_address_gives_503_and_io_goes_on(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """Dead Ray/Dask addresses refuse their jobs with 503 (nothing stored); io jobs run."""
    engines = replace(
        settings.engines,
        ray_address=f"127.0.0.1:{free_port()}",
        dask_address=f"tcp://127.0.0.1:{free_port()}",
    )
    server, session = await start_gateway(replace(settings, engines=engines))
    gateway = Gateway(server, session)
    try:
        for task, engine in (("heavy.pi", "ray"), ("heavy.array_stats", "dask")):
            status, body = await gateway.call(
                "POST", "/v1/jobs", json={"task": task, "args": [100, 10]}
            )
            assert status == 503, body
            assert body["error"]["code"] == "engine_unavailable"
            assert (
                f"the {engine} engine is unreachable: nothing answers at"
                in (body["error"]["message"])
            )
        assert await redis.keys("cf:job:*") == []
        io_job = await gateway.submit("io.echo", 5)
        assert (await gateway.wait(io_job["id"]))["result"] == 5
        status, queues = await gateway.call("GET", "/v1/queues")
        assert queues["engines"]["ray"]["state"] == "unreachable"
        assert queues["engines"]["dask"]["state"] == "unreachable"
        # Still ready: every gateway sees the same cluster, and must stay in service.
        status, ready = await gateway.call("GET", "/readyz")
        assert status == 200, ready
        assert ready["checks"]["ray"] == ready["checks"]["dask"] == "unreachable"
    finally:
        await session.close()
        await server.close()


def test_a_job_can_override_its_tasks_ray_resources() -> None:
    """options.resources overrides the task's declared num_cpus/num_gpus/memory."""
    declared = {"num_cpus": 0.0, "num_gpus": 1.0}
    override = {"resources": {"num_cpus": 2, "memory": 1e9}}
    assert ray_options(declared, override) == {
        "num_cpus": 2.0,
        "num_gpus": 1.0,
        "memory": 1_000_000_000,
    }
    assert ray_options(declared, {}) == {"num_cpus": 0.0, "num_gpus": 1.0}
    for bad in ({"cpus": 1}, {"num_cpus": -1}, {"num_gpus": True}, [1]):
        with pytest.raises(InvalidBody, match=r"options\.resources"):
            ray_options(declared, {"resources": bad})


async def test_a_task_the_cluster_cannot_import_fails_the_job(
    settings: Settings,
    redis: aioredis.Redis,
    local_ray: str,
    dask_scheduler: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A heavy task whose module Ray's workers cannot import fails the job, not loops."""
    (tmp_path / "only_here.py").write_text(
        "from tasks import task\n\n"
        "@task('only.here', kind='heavy')\n"
        "def only_here() -> int:\n"
        "    return 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # this process only, not Ray's workers
    mine = replace(
        settings,
        task_modules=(*settings.task_modules, "only_here"),
        engines=replace(settings.engines, dask_address=dask_scheduler, ray_address=local_ray),
    )
    # Ray's dispatcher is shared by the session's gateways: have it take these settings
    # first, as this gateway's would once it sees the job, so that the job cannot reach
    # the dispatcher while it still has an earlier gateway's task modules.
    await asyncio.to_thread(ensure_dispatcher, mine)
    server, session = await start_gateway(mine)
    try:
        gateway = Gateway(server, session)
        done = await gateway.wait((await gateway.submit("only.here"))["id"], 60)
        # The module that failed takes only its own tasks down: Ray's workers serve jobs
        # of every gateway, with everything else they could import.
        other = await gateway.wait((await gateway.submit("heavy.pi", 1000, 2, 1))["id"], 60)
    finally:
        await session.close()
        await server.close()
    assert done["state"] == "failed", done
    assert (
        done["error"]["type"] == "ModuleNotFoundError" and "only_here" in done["error"]["message"]
    )
    assert other["state"] == "succeeded", other


def _gateway_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a gateway process on a free port, with the session's settings."""
    return env_with(
        COREFLEET_REDIS_URL=settings.redis,
        COREFLEET_PORT=str(free_port()),
        COREFLEET_TASK_MODULES=",".join(settings.task_modules),
        **extra,
    )


async def _started(
    session: aiohttp.ClientSession, url: str, redis: aioredis.Redis, task: str
) -> str:
    """Submit a gated test task; its id once it runs (the gate waits for a release)."""
    async with session.post(url + "/v1/jobs", json={"task": task}) as resp:
        assert resp.status == 202
        job_id = str((await resp.json())["id"])
    assert await redis.blpop([f"test:started:{job_id}"], timeout=60) is not None
    return job_id


async def test_a_running_ray_job_keeps_its_result_through_a_gateway_crash(
    settings: Settings, redis: aioredis.Redis, local_ray: str
) -> None:
    """kill -9 of the gateway that took a Ray job: the job runs on inside Ray, its result
    reaches Redis with no gateway up, it ran once, and a new gateway serves it."""

    env = _gateway_env(
        settings, COREFLEET_IO_LEASE_S=str(settings.io.lease_s), COREFLEET_RAY_ADDRESS=local_ray
    )
    first, url = await asyncio.to_thread(gateway_process, env)
    second: Proc | None = None
    try:
        async with aiohttp.ClientSession() as session:
            job_id = await _started(session, url, redis, "test.ray_gate")
            first.kill()
            await redis.rpush(f"test:release:{job_id}", "go")
            assert await wait_state(redis, job_id, "succeeded", "failed", "dead") == "succeeded"
            # One attempt: the Ray task was not killed with the gateway, nor run again.
            assert await redis.hget(f"cf:job:{job_id}", "attempts") == "1"
            assert await redis.llen(f"test:started:{job_id}") == 0
            second, _ = await asyncio.to_thread(gateway_process, env)
            async with session.get(f"{url}/v1/jobs/{job_id}") as resp:
                record = await resp.json()
            assert record["state"] == "succeeded" and record["result"] == 1
    finally:
        first.stop()
        if second is not None:
            second.stop()
    # Ray's dispatcher acknowledged the entry itself: nothing is left to run again.
    assert await redis.xlen("cf:stream:heavy") == 0


async def _ray_state(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/v1/queues") as resp:
        return str((await resp.json())["engines"]["ray"]["state"])


async def _until_ray_state(session: aiohttp.ClientSession, url: str, state: str) -> None:
    async with asyncio.timeout(120):
        while True:
            if await _ray_state(session, url) == state:
                return
            await asyncio.sleep(0.2)  # sleep-ok: polling the gateway's view of Ray


def _ray_head(port: int, temp_dir: str) -> subprocess.Popen[bytes]:
    """A Ray head of 1 CPU on ``port``, in a session of its own, once it answers."""
    argv = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block"]
    argv += [f"--port={port}", "--num-cpus=1", f"--temp-dir={temp_dir}"]
    head = subprocess.Popen(
        [*argv, "--include-dashboard=false"],
        env=env_with(RAY_AUTH_MODE="disabled"),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def answers() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        return False

    wait_until(answers, 60, "the Ray head")
    return head


async def test_a_ray_cluster_that_dies_leaves_the_gateway_serving(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Ray ends every process connected to a cluster whose head is gone. The gateway is not
    one of them (its Ray keeper is): it stays up, io jobs go on, Ray jobs get a 503."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="cf-ray-head-", dir="/tmp")
    head = await asyncio.to_thread(_ray_head, port, temp_dir)
    gateway: Proc | None = None
    try:
        env = _gateway_env(
            settings,
            COREFLEET_RAY_ADDRESS=f"127.0.0.1:{port}",
            # Ray ends its connected processes this long after the head is gone (60 s
            # unless set).
            RAY_gcs_rpc_server_reconnect_timeout_s="3",
        )
        gateway, url = await asyncio.to_thread(gateway_process, env)
        async with aiohttp.ClientSession() as session:
            ray_job = {"task": "test.ray_boom", "args": ["x"]}
            async with session.post(url + "/v1/jobs", json=ray_job) as resp:
                assert resp.status == 202  # a Ray job waiting: the gateway connects to Ray
            await _until_ray_state(session, url, f"connected to 127.0.0.1:{port}")
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
            await _until_ray_state(session, url, "unreachable")
            assert gateway.proc.poll() is None
            io_job = {"task": "io.echo", "args": ["still here"]}
            async with session.post(url + "/v1/jobs?wait=30", json=io_job) as resp:
                assert resp.status == 200
                assert (await resp.json())["result"] == "still here"
            async with session.post(url + "/v1/jobs", json=ray_job) as resp:
                assert resp.status == 503
                assert "ray" in (await resp.json())["error"]["message"]
    finally:
        if gateway is not None:
            gateway.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _dask_wants(scheduler: str, job_id: str) -> list[set[str]]:
    """For each task of ``job_id`` on the Dask scheduler, the clients that want it."""
    from distributed import Client

    def wants(dask_scheduler: Any) -> list[set[str]]:
        return [
            {client.client_key for client in task.who_wants or ()}
            for key, task in dask_scheduler.tasks.items()
            if job_id in str(key)
        ]

    with Client(scheduler, timeout=10) as client:
        return list(client.run_on_scheduler(wants))


async def _until_dask_wants(
    scheduler: str, job_id: str, check: Callable[[list[set[str]]], bool]
) -> None:
    async with asyncio.timeout(60):
        while True:
            if check(await asyncio.to_thread(_dask_wants, scheduler, job_id)):
                return
            await asyncio.sleep(0.1)  # sleep-ok: polling the scheduler, which has no event


async def test_a_running_dask_job_runs_once_through_a_gateway_crash(
    settings: Settings, redis: aioredis.Redis, dask_scheduler: str
) -> None:
    """kill -9 of the gateway that took a Dask job: the scheduler keeps the task, and the
    next gateway, taking the job over, waits for that very task instead of starting the
    job again. The job succeeds after one attempt."""
    env = _gateway_env(settings, COREFLEET_IO_LEASE_S="2", COREFLEET_DASK_ADDRESS=dask_scheduler)
    first, url = await asyncio.to_thread(gateway_process, env)
    second: Proc | None = None
    try:
        async with aiohttp.ClientSession() as session:
            job_id = await _started(session, url, redis, "test.dask_gate")
            first.kill()
            # The scheduler keeps the running task, wanted by nobody but itself...
            await _until_dask_wants(
                dask_scheduler, job_id, lambda tasks: tasks == [{"fire-and-forget"}]
            )
            second, _ = await asyncio.to_thread(gateway_process, env)
            # ... until the second gateway takes the job over (after the lease) and waits
            # for that same task: still one task for the job.
            await _until_dask_wants(
                dask_scheduler,
                job_id,
                lambda tasks: len(tasks) == 1 and len(tasks[0] - {"fire-and-forget"}) == 1,
            )
            await redis.rpush(f"test:release:{job_id}", "go")
            assert await wait_state(redis, job_id, "succeeded", "failed", "dead") == "succeeded"
            # The second gateway lets go of the entry once the task it waited for ended.
            await _until_held(redis, lambda held: held == 0, "cf:stream:dask")
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert await redis.hget(f"cf:job:{job_id}", "attempts") == "1"
    assert await redis.llen(f"test:started:{job_id}") == 0  # it ran once


async def test_a_ray_job_past_its_time_limit_is_killed_and_fails(
    heavy_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """A sync Ray task past options.timeout_s: its worker is killed, the job fails."""
    job = await heavy_gateway.submit("test.ray_hold", 60, timeout_s=0.5)
    started = await redis.blpop([f"test:started:{job['id']}"], timeout=60)
    assert started is not None
    done = await heavy_gateway.wait(job["id"], 30)
    assert done["state"] == "failed", done
    assert done["error"]["type"] == "TimeLimitExceeded" and "0.5 s" in done["error"]["message"]
    await wait_gone(int(started[1].split(":")[1]))


async def test_a_dask_job_past_its_time_limit_fails_and_sees_ctx_cancelled(
    heavy_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """Dask cannot kill a running task: past its limit the job fails, and ctx.cancelled()
    turns true so that the task can stop."""
    job = await heavy_gateway.submit("test.dask_until_cancelled", timeout_s=0.5)
    assert await redis.blpop([f"test:started:{job['id']}"], timeout=60) is not None
    done = await heavy_gateway.wait(job["id"], 30)
    assert done["state"] == "failed", done
    assert done["error"]["type"] == "TimeLimitExceeded"
    saw = await redis.blpop([f"test:saw_cancel:{job['id']}"], timeout=30)
    assert saw is not None and saw[1] == "True"


async def test_a_dask_job_that_ignores_its_time_limit_has_its_worker_restarted(
    heavy_gateway: Gateway, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Dask task that never looks at ctx.cancelled() would hold its one-thread worker
    for good: past its time limit and a grace, that worker process is restarted."""
    monkeypatch.setattr(dask_, "STOP_GRACE_S", 1.0)  # the gateway runs in this process
    job = await heavy_gateway.submit("test.dask_stubborn", 120, timeout_s=0.5)
    started = await redis.blpop([f"test:started:{job['id']}"], timeout=60)
    assert started is not None
    done = await heavy_gateway.wait(job["id"], 30)
    assert done["state"] == "failed" and done["error"]["type"] == "TimeLimitExceeded", done
    await wait_gone(int(started[1].split(":")[1]))
    # The cluster goes on: the restarted worker takes jobs again.
    after = await heavy_gateway.submit("test.dask_boom", "after")
    assert (await heavy_gateway.wait(after["id"], 60))["state"] == "failed"


@pytest.mark.parametrize(("engine", "queue"), [("ray", "heavy"), ("dask", "dask")])
async def test_a_taken_over_jobs_time_limit_starts_with_its_new_attempt(
    heavy_gateway: Gateway, redis: aioredis.Redis, engine: str, queue: str
) -> None:
    """A job taken over from a lost dispatcher still says running (the lost attempt) as it
    is launched again: its time limit starts when the new attempt begins, not then. (Ray:
    the lost dispatcher's tasks died with it; Dask: the scheduler no longer holds the lost
    launch's task, its workers having gone with that gateway.) Here the new attempt waits
    for a free CPU for longer than the limit, and still runs."""
    task = f"test.{engine}_gate"
    blockers = [await heavy_gateway.submit(task) for _ in range(2)]
    for blocker in blockers:  # both CPUs (Ray's, Dask's workers) are taken
        assert await redis.blpop([f"test:started:{blocker['id']}"], timeout=60) is not None
    # The job as a lost dispatcher left it: its first attempt running, its entry not acked.
    store = JobStore(redis, 3600, group_commit=False)
    job = Job(
        id=ids.new_id(),
        task=task,
        kind="heavy",
        engine=engine,
        queue=queue,
        max_attempts=3,
        timeout_s=1.0,
    )
    await store.create([job], lambda j: Dispatch("xadd", "cf:stream:nobody-reads", j.id))
    entry = f"{int(time.time() * 1000) + 1000}-0"  # after every entry there is
    assert (await store.begin(job.id, "lost-worker", entry)).job is not None
    await redis.xadd(keys.stream(queue), {"id": job.id}, id=entry)
    # Past the limit and its grace, waiting for a CPU: not failed.
    with pytest.raises(TimeoutError):
        await wait_state(redis, job.id, "failed", within=3)
    for blocker in blockers:
        await redis.rpush(f"test:release:{blocker['id']}", "go")
    assert await redis.blpop([f"test:started:{job.id}"], timeout=60) is not None
    await redis.rpush(f"test:release:{job.id}", "go")
    done = await heavy_gateway.wait(job.id, 30)
    assert (done["state"], done["attempts"], done["result"]) == ("succeeded", 2, 2), done


class _SlowStart(ClusterEngine):
    """A cluster engine whose start waits for the test (nothing of a real cluster is
    started: the point is the engine's own bookkeeping)."""

    name = "slow"

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        super().__init__(redis, settings, "")
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.starts = 0
        self.finished = 0

    async def _connect(self) -> None:
        self.starts += 1
        self.entered.set()
        await self.release.wait()
        self.finished += 1

    async def _disconnect(self) -> None:
        return None


async def test_a_cancel_of_the_job_starting_a_cluster_does_not_cut_the_start_short(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """The first job starts the cluster; cancelling it (a user's cancel) leaves the start
    to finish, and the next job uses that cluster rather than starting another (a start
    cut short left a LocalCluster's processes with nothing to stop them)."""
    engine = _SlowStart(redis, settings)
    first = asyncio.create_task(engine.ensure_started())
    await engine.entered.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    second = asyncio.create_task(engine.ensure_started())
    engine.release.set()
    await asyncio.wait_for(second, 10)
    assert (engine.starts, engine.finished, engine.connected) == (1, 1, True)
    await engine.close()


async def test_a_new_dispatcher_loop_leaves_running_ray_jobs_to_the_old_one(
    heavy_gateway: Gateway, settings: Settings, redis: aioredis.Redis
) -> None:
    """Ray's dispatcher starting a new loop (here: a gateway with another lease) does not
    run a job in flight again: the old loop keeps its lease and acknowledges it."""
    job = await heavy_gateway.submit("test.ray_gate")
    assert await redis.blpop([f"test:started:{job['id']}"], timeout=60) is not None
    other = replace(settings, io=replace(settings.io, lease_s=settings.io.lease_s + 0.5))
    await asyncio.to_thread(ensure_dispatcher, other)
    # Three leases pass with no second attempt: nobody reclaimed the held entry.
    again = await redis.blpop([f"test:started:{job['id']}"], timeout=3 * other.io.lease_s)
    assert again is None
    await redis.rpush(f"test:release:{job['id']}", "go")
    done = await heavy_gateway.wait(job["id"], 30)
    assert done["state"] == "succeeded" and done["result"] == 1 and done["attempts"] == 1
    await asyncio.to_thread(ensure_dispatcher, settings)  # back to the session's settings


class _OldDispatcher:
    """Stands in for Ray's dispatcher of another corefleet version."""

    async def serve(self, settings: Settings) -> dict[str, str]:
        return {"version": "0.0.0-old"}


async def test_a_dispatcher_of_another_corefleet_version_is_replaced(
    settings: Settings, local_ray: str
) -> None:
    """After an upgrade the detached actor still runs the old code: the gateway replaces it."""
    import ray

    from service.engines.ray_dispatcher import NAMESPACE, actor_name, corefleet_version

    mine = replace(settings, redis_url=settings.redis.rsplit("/", 1)[0] + "/3")
    name = actor_name(mine.redis)
    old = ray.remote(_OldDispatcher).options(name=name, namespace=NAMESPACE, lifetime="detached")
    old.remote()
    handle = await asyncio.to_thread(ensure_dispatcher, mine)
    try:
        info = await asyncio.to_thread(ray.get, handle.info.remote(), timeout=60)
        assert info["version"] == corefleet_version() and info["serving"]
    finally:
        ray.kill(handle, no_restart=True)


class _NewerDispatcher:
    """Stands in for Ray's dispatcher of a newer corefleet (a rolling deploy's)."""

    async def serve(self, settings: Settings) -> dict[str, str]:
        return {"version": "99.0.0"}


async def test_a_newer_dispatcher_is_left_to_serve(
    settings: Settings, local_ray: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During a rolling deploy gateways of two versions run side by side: the older one
    uses the newer dispatcher rather than replacing it (each replacement kills every Ray
    job the dispatcher runs, and the newer gateway would replace it back)."""
    import ray

    from service.engines import ray_dispatcher
    from service.engines.ray_dispatcher import NAMESPACE, actor_name

    monkeypatch.setattr(ray_dispatcher, "corefleet_version", lambda: "1.0.0")
    mine = replace(settings, redis_url=settings.redis.rsplit("/", 1)[0] + "/4")
    name = actor_name(mine.redis)
    newer = ray.remote(_NewerDispatcher).options(
        name=name, namespace=NAMESPACE, lifetime="detached"
    )
    first = newer.remote()
    try:
        handle = await asyncio.to_thread(ensure_dispatcher, mine)
        assert handle._actor_id == first._actor_id
        served = await asyncio.to_thread(ray.get, handle.serve.remote(mine), timeout=60)
        assert served["version"] == "99.0.0"
    finally:
        ray.kill(first, no_restart=True)


async def test_a_ray_task_reports_progress(heavy_gateway: Gateway, redis: aioredis.Redis) -> None:
    """``ctx.progress`` from inside a Ray task reaches the record while the job runs."""
    job = await heavy_gateway.submit("test.ray_progress")
    _, started = await redis.blpop([f"test:started:{job['id']}"], timeout=120)  # type: ignore[misc]
    pid = started.split(":")[1]
    status, running = await heavy_gateway.call("GET", f"/v1/jobs/{job['id']}")
    assert status == 200 and running["state"] == "running"
    assert running["progress"] == {"fraction": 0.25, "message": f"a quarter, pid {pid}"}
    await redis.rpush(f"test:release:{job['id']}", 1)
    done = await heavy_gateway.wait(job["id"], 60)
    assert done["state"] == "succeeded" and done["result"] is True


async def test_a_ray_task_is_retried_after_a_retryable_error(heavy_gateway: Gateway) -> None:
    """The retry is queued again on Ray's stream and launched by Ray's dispatcher."""
    job = await heavy_gateway.submit("test.ray_flaky", 1)
    done = await heavy_gateway.wait(job["id"], 60)
    assert done["state"] == "succeeded" and done["result"] == 2 and done["attempts"] == 2


async def test_a_dask_job_retried_at_once_runs_again(heavy_gateway: Gateway) -> None:
    """The retry comes by a new stream entry and is launched as a new Dask task."""
    job = await heavy_gateway.submit("test.dask_retry_now")
    done = await heavy_gateway.wait(job["id"], 60)
    assert done["state"] == "succeeded" and done["result"] == 2 and done["attempts"] == 2


async def test_a_high_priority_ray_job_overtakes_low_ones_not_yet_started(
    heavy_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """Ray runs the tasks it holds in its own order, so its dispatcher hands it only four
    jobs per CPU (8 here); the rest wait on the streams, where a high job goes first."""
    gates = [await heavy_gateway.submit("test.ray_gate") for _ in range(2)]
    for gate in gates:  # both CPUs busy
        assert await redis.blpop([f"test:started:{gate['id']}"], timeout=60)
    lows = [
        await heavy_gateway.submit("test.ray_note", f"low{i}", priority="low") for i in range(10)
    ]
    # Six lows are handed to Ray beside the gates, 8 jobs in all; four wait on the stream.
    # (With no bound, all ten would be in Ray, and the high job would run after them.)
    async with asyncio.timeout(60):
        while await _heavy_queue(heavy_gateway) != (8, 4):  # noqa: ASYNC110  # no event for it
            await asyncio.sleep(0.05)  # sleep-ok: the dispatcher takes them in its own time
    high = await heavy_gateway.submit("test.ray_note", "high", priority="high")
    for gate in gates:
        await redis.rpush(f"test:release:{gate['id']}", 1)
    for job in [*lows, high]:
        assert (await heavy_gateway.wait(job["id"], 60))["state"] == "succeeded"
    order = await redis.lrange("test:ray-order", 0, -1)
    # Before all but the six lows Ray already held, and one launched with it that may end
    # first on the other CPU; without the bound it would be last.
    assert order.index("high") <= 7, order
    assert sorted(order) == sorted(["high", *(f"low{i}" for i in range(10))])


async def _heavy_queue(gateway: Gateway) -> tuple[int, int]:
    """Ray jobs handed to Ray (running or held there) and low ones waiting on the stream."""
    status, queues = await gateway.call("GET", "/v1/queues")
    assert status == 200
    heavy = queues["engines"]["ray"]["queues"]["heavy"]
    return heavy["running"], heavy["waiting_by_priority"]["low"]


def test_the_dispatcher_hands_ray_four_jobs_per_cpu_unless_told() -> None:
    assert in_flight_for(2.0, 0) == 8
    assert in_flight_for(0.0, 0) == MIN_IN_FLIGHT  # a cluster scaled to nothing grows back
    assert in_flight_for(48.0, 0) == 192
    assert in_flight_for(10_000.0, 0) == DISPATCH_CONCURRENCY
    assert in_flight_for(2.0, 500) == 500  # COREFLEET_RAY_IN_FLIGHT
    assert Settings.from_env({"COREFLEET_RAY_IN_FLIGHT": "64"}).engines.ray_in_flight == 64


async def test_ray_and_dask_jobs_of_every_priority_run(heavy_gateway: Gateway) -> None:
    """Each priority has its own stream; the dispatchers read them all (Dask also gets the
    priority, for the tasks waiting in its scheduler)."""
    jobs = [
        await heavy_gateway.submit(task, 0, priority=priority)
        for task in ("test.ray_hold", "test.dask_hold")
        for priority in ("high", "normal", "low")
    ]
    for job in jobs:
        done = await heavy_gateway.wait(job["id"], 60)
        assert done["state"] == "succeeded", done
