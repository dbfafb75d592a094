"""Fixtures: a real Redis on a free port for the session, a real gateway per test."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from service.app import create_app
from service.settings import IoWorkerSettings, Settings
from tests.procs import ROOT, Proc, RedisServer, alive, env_with, process_tree, wait_until

TEST_TASKS = "tests.fleet_tasks"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    # Test tasks reach Redis through this variable, in this process and in children; and
    # processes this one starts (Ray's workers among them) import tests.fleet_tasks.
    os.environ["COREFLEET_REDIS_URL"] = server.url
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    return Settings(
        redis_url=redis_server.url,
        task_modules=(TEST_TASKS,),
        io=IoWorkerSettings(lease_s=1.0),
    )


class Gateway:
    """A real gateway on a free port and an HTTP session pointed at it."""

    def __init__(self, server: TestServer, session: ClientSession) -> None:
        self.server = server
        self.session = session
        self.url = str(server.make_url("")).rstrip("/")

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.session.request(method, self.url + path, **kw) as resp:
            return resp.status, json.loads(await resp.read())

    async def submit(self, task: str, *args: Any, **options: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"task": task, "args": list(args)}
        if options:
            body["options"] = options
        status, job = await self.call("POST", "/v1/jobs", json=body)
        assert status == 202, job
        return dict(job)

    async def wait(self, job_id: str, seconds: float = 30) -> dict[str, Any]:
        status, job = await self.call("GET", f"/v1/jobs/{job_id}?wait={seconds}")
        assert status == 200, job
        return dict(job)


async def start_gateway(settings: Settings) -> tuple[TestServer, ClientSession]:
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    return server, ClientSession()


@pytest.fixture
async def gateway(settings: Settings, redis: aioredis.Redis) -> AsyncIterator[Gateway]:
    server, session = await start_gateway(settings)
    yield Gateway(server, session)
    await session.close()
    await server.close()


@pytest.fixture
async def bare_gateway(settings: Settings, redis: aioredis.Redis) -> AsyncIterator[Gateway]:
    """A gateway without its embedded io worker: io jobs stay queued."""
    no_worker = replace(settings, gateway=replace(settings.gateway, embedded_io_worker=False))
    server, session = await start_gateway(no_worker)
    yield Gateway(server, session)
    await session.close()
    await server.close()


_SAMPLE = re.compile(
    r'^([a-z_]+)(\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})? (-?[0-9.]+(?:e[+-]?[0-9]+)?|\+Inf)$'
)


async def scrape_metrics(gateway: Gateway) -> dict[str, float]:
    """Every sample, keyed by its name and labels as written."""
    async with gateway.session.get(f"{gateway.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# "):
            assert line.split()[1] in ("HELP", "TYPE"), line
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample: {line!r}"
        samples[line.rsplit(" ", 1)[0]] = float(match.group(3))
    return samples


async def wait_state(redis: aioredis.Redis, job_id: str, *states: str, within: float = 30) -> str:
    """Wait, on pub/sub events, until the job is in one of ``states``; return that state."""
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("cf:events")
    try:
        async with asyncio.timeout(within):
            while True:
                state = await redis.hget(f"cf:job:{job_id}", "state")
                if state in states:
                    return str(state)
                await pubsub.get_message(timeout=within)
    finally:
        await pubsub.aclose()


class CeleryWorker:
    """A real `corefleet worker` (Celery prefork, 2 children) for the whole session."""

    def __init__(self, redis_server: RedisServer, data_dir: str) -> None:
        self.env = env_with(
            COREFLEET_REDIS_URL=redis_server.url,
            COREFLEET_TASK_MODULES=TEST_TASKS,
            COREFLEET_DATA_DIR=data_dir,
            COREFLEET_LOG_LEVEL="WARNING",
        )
        self.proc = Proc(["worker", "--concurrency", "2"], self.env)
        self.redis_url = redis_server.url

    def children(self) -> set[int]:
        return process_tree(self.proc.pid) - {self.proc.pid}


@pytest.fixture(scope="session")
def celery_worker(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CeleryWorker]:
    worker = CeleryWorker(redis_server, str(tmp_path_factory.mktemp("worker-data")))
    # Ready when both children exist and the main process answers a broadcast ping.
    wait_until(
        lambda: len(worker.children()) >= 2 and _celery_ping(worker.redis_url), 60, "celery worker"
    )
    yield worker
    worker.proc.stop()


def _celery_ping(redis_url: str) -> bool:
    from service.engines.celery_ import make_celery_app

    app = make_celery_app(Settings(redis_url=redis_url))
    try:
        return bool(app.control.ping(timeout=0.5))
    finally:
        app.close()


async def celery_waiting(redis: aioredis.Redis, queue: str) -> int:
    """How many messages wait in a Celery queue, over all its priority lists."""
    from service.engines.celery_ import celery_lists

    return sum([await redis.llen(name) for name in celery_lists(queue)])  # type: ignore[misc]


async def wait_gone(pid: int, within: float = 30) -> None:
    """Wait until process ``pid`` has exited (a kill is not instant)."""
    async with asyncio.timeout(within):
        while alive(pid):  # noqa: ASYNC110  # another process's death has no event here
            await asyncio.sleep(0.05)  # sleep-ok: polling a process that is being killed


async def wait_workers(
    redis: aioredis.Redis, queue: str, count: int = 1, within: float = 30
) -> list[dict[str, Any]]:
    """Wait until ``count`` workers of ``queue`` have checked in (tests flush Redis)."""
    from service import presence

    async with asyncio.timeout(within):
        while len(workers := await presence.live(redis, queue)) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # sleep-ok: workers check in every few seconds
    return workers
