"""Ops watch cpu jobs in a real Flower, over its HTTP API with basic auth."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from typing import Any

import pytest

from service.flower import flower_argv
from service.settings import FlowerSettings, Settings, SettingsError
from tests.conftest import CeleryWorker, Gateway
from tests.procs import Proc, RedisServer, env_with, free_port, wait_until

AUTH = "ops:s3cret"


@pytest.fixture(scope="module")
def flower(redis_server: RedisServer, celery_worker: CeleryWorker) -> Iterator[str]:
    port = free_port()
    proc = Proc(
        ["flower", "--port", str(port)],
        env_with(COREFLEET_REDIS_URL=redis_server.url, COREFLEET_FLOWER_BASIC_AUTH=AUTH),
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _status(url + "/healthcheck") == 200, 60, "flower")
    yield url
    proc.stop()


def _status(url: str, auth: str | None = None) -> int:
    try:
        return _get(url, auth)[0]
    except OSError:
        return 0


def _get(url: str, auth: str | None) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            body = resp.read()
            return int(resp.status), json.loads(body) if body.startswith(b"{") else None
    except urllib.error.HTTPError as exc:
        return exc.code, None


def test_flower_api_requires_the_credentials(flower: str) -> None:
    """Flower's API answers 401 without credentials and 200 with them."""
    assert _status(flower + "/api/workers") == 401
    assert _status(flower + "/api/workers", "ops:wrong") == 401
    assert _status(flower + "/api/workers", AUTH) == 200


def test_flower_lists_the_worker(flower: str) -> None:
    """The corefleet worker appears in /api/workers."""
    _, workers = _get(flower + "/api/workers?refresh=1", AUTH)
    assert any(name.startswith("corefleet-cpu") for name in workers)


async def test_a_finished_job_shows_as_success_in_flower(flower: str, gateway: Gateway) -> None:
    """A cpu job's Celery task appears in /api/tasks with state SUCCESS and its call."""
    job = await gateway.submit("cpu.count_primes", 100)
    assert (await gateway.wait(job["id"], 60))["state"] == "succeeded"

    def seen() -> bool:
        _code, tasks = _get(flower + "/api/tasks", AUTH)
        return bool(tasks) and tasks.get(job["id"], {}).get("state") == "SUCCESS"

    wait_until(seen, 30, "the task in Flower")
    _code, tasks = _get(flower + "/api/tasks", AUTH)
    assert tasks[job["id"]]["args"].startswith("cpu.count_primes(")


def test_flower_off_loopback_needs_basic_auth() -> None:
    """Flower refuses to listen beyond loopback without credentials."""
    with pytest.raises(SettingsError, match="COREFLEET_FLOWER_BASIC_AUTH"):
        flower_argv(Settings(flower=FlowerSettings(host="0.0.0.0")))
    argv = flower_argv(Settings(flower=FlowerSettings(host="0.0.0.0", basic_auth=AUTH)))
    assert f"--basic_auth={AUTH}" in argv


def test_a_loopback_flower_without_credentials_keeps_its_api_closed(
    redis_server: RedisServer,
) -> None:
    """Without credentials (as `corefleet up` starts it) Flower's pages answer on loopback
    and its API does not: an open API answers any web page's scripts, so a site the
    operator visits could shut workers down or send tasks."""
    port = free_port()
    env = env_with(COREFLEET_REDIS_URL=redis_server.url)
    env.pop("COREFLEET_FLOWER_BASIC_AUTH", None)
    env.pop("FLOWER_UNAUTHENTICATED_API", None)
    proc = Proc(["flower", "--port", str(port)], env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _status(url + "/healthcheck") == 200, 60, "flower")
        assert _status(url + "/") == 200
        assert _status(url + "/api/workers") == 401
        assert _status(url + "/api/tasks") == 401
    finally:
        proc.stop()
