"""A remote Dask scheduler (``COREFLEET_DASK_ADDRESS``) that goes away and comes back:
the jobs it held are delivered again, not failed."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from service.settings import Settings
from tests.conftest import start_gateway, wait_state
from tests.procs import ROOT, RedisServer, env_with, free_port, process_tree, wait_until

DASK = str(Path(sys.executable).with_name("dask"))


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


class RemoteDask:
    """A `dask scheduler` and one `dask worker` (under its nanny), processes of their own."""

    def __init__(self, redis_url: str) -> None:
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.env = env_with(COREFLEET_REDIS_URL=redis_url)
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [DASK, *args],
            env=self.env,
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start_scheduler(self) -> None:
        self.scheduler = self._spawn(
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dashboard-address",
            "127.0.0.1:0",
        )
        wait_until(lambda: _answers(self.port), 60, "dask scheduler")

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        self.scheduler.kill()  # no goodbye to its clients: a lost connection
        self.scheduler.wait(30)

    def start_worker(self) -> None:
        worker = self._spawn(
            "worker", self.address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"
        )
        self.workers.append(worker)

    def stop(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            if proc is None:
                continue
            for pid in process_tree(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(30)


@pytest.fixture(scope="module")  # each test leaves it running (a killed one started again)
def remote_dask(redis_server: RedisServer) -> Iterator[RemoteDask]:
    dask = RemoteDask(redis_server.url)
    dask.start_scheduler()
    dask.start_worker()
    yield dask
    dask.stop()


async def test_jobs_held_by_a_lost_scheduler_run_again_when_it_is_back(
    settings: Settings, redis: aioredis.Redis, remote_dask: RemoteDask
) -> None:
    """The scheduler is killed while a job runs: the job is not failed (the client cancels
    its futures on the lost connection, which is not the job's doing). Once a scheduler
    answers at the address again, the job runs again and ends."""
    engines = replace(settings.engines, dask_address=remote_dask.address)
    server, session = await start_gateway(
        replace(settings, engines=engines, io=replace(settings.io, lease_s=1.0))
    )
    try:
        url = str(server.make_url("")).rstrip("/")
        body = {"task": "test.dask_gate", "options": {"max_attempts": 3}}
        async with session.post(url + "/v1/jobs", json=body) as resp:
            job_id = (await resp.json())["id"]
        first = await redis.blpop([f"test:started:{job_id}"], timeout=60)
        assert first is not None and first[1].startswith("1:")
        remote_dask.kill_scheduler()
        # Not failed: the lost connection is not the job's doing.
        assert await redis.hget(f"cf:job:{job_id}", "state") == "running"
        # Dask's workers stop with their scheduler; the deployment starts both again.
        remote_dask.start_scheduler()
        remote_dask.start_worker()
        # The job comes again, as its second attempt: the first was lost with its worker.
        again = await redis.blpop([f"test:started:{job_id}"], timeout=90)
        assert again is not None and again[1].startswith("2:"), again
        # Two releases: the first attempt may still wait on its thread in the stopping
        # worker (Dask cannot stop a thread); its late outcome is refused all the same.
        await redis.rpush(f"test:release:{job_id}", "go", "go")
        assert await wait_state(redis, job_id, "succeeded", "failed", "dead") == "succeeded"
        async with session.get(f"{url}/v1/jobs/{job_id}") as resp:
            record = await resp.json()
        assert (record["result"], record["attempts"]) == (2, 2)
    finally:
        await session.close()
        await server.close()


async def test_jobs_running_when_the_cluster_is_restarted_run_again(
    settings: Settings, redis: aioredis.Redis, remote_dask: RemoteDask
) -> None:
    """Another user of the scheduler restarts the cluster (``Client.restart``): every
    client's futures are cancelled, but not for anything the job did. The job is delivered
    again, not failed."""
    from distributed import Client

    engines = replace(settings.engines, dask_address=remote_dask.address)
    server, session = await start_gateway(
        replace(settings, engines=engines, io=replace(settings.io, lease_s=1.0))
    )
    try:
        url = str(server.make_url("")).rstrip("/")
        body = {"task": "test.dask_gate", "options": {"max_attempts": 3}}
        async with session.post(url + "/v1/jobs", json=body) as resp:
            job_id = (await resp.json())["id"]
        first = await redis.blpop([f"test:started:{job_id}"], timeout=60)
        assert first is not None and first[1].startswith("1:")
        async with Client(remote_dask.address, asynchronous=True) as other:  # type: ignore[no-untyped-call]
            await other.restart()
        again = await redis.blpop([f"test:started:{job_id}"], timeout=90)
        assert again is not None and again[1].startswith("2:"), again
        await redis.rpush(f"test:release:{job_id}", "go", "go")
        assert await wait_state(redis, job_id, "succeeded", "failed", "dead") == "succeeded"
        async with session.get(f"{url}/v1/jobs/{job_id}") as resp:
            record = await resp.json()
        assert (record["state"], record["attempts"]) == ("succeeded", 2)
    finally:
        await session.close()
        await server.close()
