"""The Python clients and the CLI against a real gateway process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

import clients
from clients import AsyncClient, Client
from service import errors
from service.jobs import JobState
from tests.procs import (
    ROOT,
    RedisServer,
    env_with,
    free_port,
    gateway_process,
)


@pytest.fixture(scope="module")
def gateway_url(redis_server: RedisServer) -> Iterator[str]:
    proc, url = gateway_process(
        env_with(
            COREFLEET_REDIS_URL=redis_server.url,
            COREFLEET_PORT=str(free_port()),
            COREFLEET_TASK_MODULES="tests.fleet_tasks",
        )
    )
    yield url
    proc.stop()


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clients.cli", *args, "--url", url],
        cwd=ROOT,
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_sync_client_submit_wait_cancel_tasks(gateway_url: str) -> None:
    """Client.submit/wait return records; cancel cancels; tasks lists the registry."""
    with Client(gateway_url) as client:
        job = client.submit("io.echo", {"x": 1})
        assert job.state is JobState.QUEUED
        done = client.wait(job.id, timeout_s=30)
        assert done.state is JobState.SUCCEEDED and done.result == {"x": 1}
        assert client.get(job.id).result == {"x": 1}
        held = client.submit("io.sleep", 30)
        assert client.cancel(held.id).state is JobState.CANCELLED
        assert "io.http_get" in {t["name"] for t in client.tasks()}


def test_sync_client_raises_the_mirrored_errors(gateway_url: str) -> None:
    """Gateway errors come back as the same error classes the gateway raised."""
    with Client(gateway_url) as client:
        with pytest.raises(errors.UnknownTask):
            client.submit("no.such")
        with pytest.raises(errors.InvalidArguments) as info:
            client.submit("io.sleep", "soon")
        assert info.value.status == 400 and "seconds" in info.value.message
        with pytest.raises(errors.InvalidJobId):
            client.get("nope")
        with pytest.raises(errors.WaitTimeout):
            client.wait(client.submit("io.sleep", 5).id, timeout_s=0.2)
    with pytest.raises(errors.TransportError), Client(f"http://127.0.0.1:{free_port()}") as dead:
        dead.tasks()


async def test_async_client_round_trip(gateway_url: str) -> None:
    """AsyncClient does the same over aiohttp."""
    async with AsyncClient(gateway_url) as client:
        job = await client.submit("io.sleep", 0.01)
        done = await client.wait(job.id, timeout_s=30)
        assert done.state is JobState.SUCCEEDED and done.result == 0.01
        with pytest.raises(errors.JobNotFound):
            await client.get("01ARZ3NDEKTSV4RRFFQ69G5FAV")


def test_cli_submit_wait_prints_the_result(gateway_url: str) -> None:
    """`corefleet submit io.echo '[1,2]' --wait` prints the finished record and exits 0."""
    out = _cli(gateway_url, "submit", "io.echo", "[1, 2]", "--wait")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["state"] == "succeeded" and record["result"] == [1, 2]
    got = _cli(gateway_url, "get", record["id"])
    assert json.loads(got.stdout)["id"] == record["id"]


def test_cli_reports_errors_and_exits_non_zero(gateway_url: str) -> None:
    """Bad calls print a one-line reason and exit non-zero; a failed job exits 1."""
    bad = _cli(gateway_url, "submit", "io.sleep", '"x"')
    assert bad.returncode == 1 and "invalid_arguments" in bad.stderr
    assert "Traceback" not in bad.stderr
    unparsable = _cli(gateway_url, "submit", "io.sleep", "{nope")
    assert unparsable.returncode != 0 and "not valid JSON" in unparsable.stderr
    failed = _cli(gateway_url, "submit", "test.boom", '"bad"', "--wait")
    assert failed.returncode == 1 and json.loads(failed.stdout)["state"] == "failed"
    tasks = _cli(gateway_url, "tasks")
    assert tasks.returncode == 0 and "io.sleep" in tasks.stdout
    held = json.loads(_cli(gateway_url, "submit", "io.sleep", "30").stdout)
    cancelled = _cli(gateway_url, "cancel", held["id"])
    assert json.loads(cancelled.stdout)["state"] == "cancelled"


def test_public_surface() -> None:
    """clients.__all__ names exactly what the package exports."""
    public = {name for name in vars(clients) if not name.startswith("_")}
    assert set(clients.__all__) <= public
    assert {"AsyncClient", "Client", "CorefleetError", "JobState"} <= set(clients.__all__)
