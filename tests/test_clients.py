"""The Python clients and the CLI against a real gateway process."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

import clients
from clients import AsyncClient, Client
from service import errors, ids
from service.jobs import JobState
from service.settings import Settings
from tests.conftest import start_gateway
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


def test_sync_client_batches_lists_and_reads_queues(gateway_url: str) -> None:
    """Client.submit_batch stores all or none; jobs() pages through the listing with its
    filters; queues() is GET /v1/queues."""
    with Client(gateway_url) as client:
        batch = client.submit_batch(
            [{"task": "io.echo", "args": [i], "options": {"queue": "listing"}} for i in range(3)]
        )
        assert [job.args for job in batch] == [[0], [1], [2]]
        with pytest.raises(errors.UnknownTask) as refused:
            client.submit_batch([{"task": "io.echo", "args": [9]}, {"task": "no.such"}])
        assert refused.value.detail["index"] == 1
        first = client.jobs(queue="listing", limit=2)
        assert [job.id for job in first.jobs] == [batch[2].id, batch[1].id]  # newest first
        assert first.next_cursor is not None
        rest = client.jobs(queue="listing", limit=2, cursor=first.next_cursor)
        assert [job.id for job in rest.jobs] == [batch[0].id] and rest.next_cursor is None
        assert client.jobs(task="no.such").jobs == []
        queues = client.queues()
        assert queues["engines"]["asyncio"]["queues"]["io"]["workers"] >= 0


async def test_async_client_batches_lists_and_reads_queues(gateway_url: str) -> None:
    """The same methods on AsyncClient."""
    async with AsyncClient(gateway_url) as client:
        parked = {"queue": "listing-async"}  # a queue no worker reads: they stay queued
        batch = await client.submit_batch(
            [{"task": "io.echo", "args": [i], "options": parked} for i in range(2)]
        )
        page = await client.jobs(task="io.echo", state=JobState.QUEUED, limit=500)
        assert {job.id for job in batch} <= {job.id for job in page.jobs}
        assert "engines" in await client.queues()


def test_cli_submit_wait_prints_the_result(gateway_url: str) -> None:
    """`corefleet submit io.echo '[1,2]' --wait` prints the finished record and exits 0."""
    out = _cli(gateway_url, "submit", "io.echo", "[1, 2]", "--wait")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["state"] == "succeeded" and record["result"] == [1, 2]
    # The id is said before the wait: a wait cut short leaves the job running.
    assert f"submitted {record['id']}" in out.stderr
    # A task's arguments may come after an option, as they would with any command.
    late = _cli(gateway_url, "submit", "io.echo", "--wait", "7")
    assert late.returncode == 0, late.stderr
    assert json.loads(late.stdout)["result"] == 7
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
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["state"] == "cancelled"
    # Reading it back (as a script after `submit --wait` would): it has no result.
    got = _cli(gateway_url, "get", held["id"])
    assert got.returncode == 1 and json.loads(got.stdout)["state"] == "cancelled"
    # A gpu worker's queue and children are the GPUs': said, not silently overridden.
    gpu = subprocess.run(
        [sys.executable, "-m", "clients.cli", "worker", "--gpu", "--concurrency", "4"],
        cwd=ROOT,
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gpu.returncode == 2 and "--gpu consumes the gpu queue" in gpu.stderr
    # A malformed gateway URL is a usage error, said in one line.
    no_scheme = _cli(gateway_url.removeprefix("http://"), "tasks")
    assert no_scheme.returncode == 2 and "base_url must be http" in no_scheme.stderr
    assert "Traceback" not in no_scheme.stderr


def test_a_gateway_500_is_not_a_client_side_error() -> None:
    """The gateway's ``internal_error`` comes back as a plain ``CorefleetError``: code
    that catches ``ClientError`` (the network, a wait that ran out) must not swallow it."""
    got = errors.from_json(500, {"error": {"code": "internal_error", "message": "boom"}})
    assert type(got) is errors.CorefleetError and got.message == "boom"
    assert errors.BY_CODE["client_error"] is errors.ClientError


def test_threads_may_share_a_sync_client(gateway_url: str) -> None:
    """Requests from several threads at once each get their own answer."""
    with Client(gateway_url) as client:
        jobs = [client.submit("io.echo", i) for i in range(4)]
        problems: list[BaseException] = []

        def read(job_id: str) -> None:
            try:
                for _ in range(40):
                    assert client.get(job_id).id == job_id
            except BaseException as exc:  # reported below, with the thread's own error
                problems.append(exc)

        threads = [threading.Thread(target=read, args=(job.id,)) for job in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert problems == []


def test_public_surface() -> None:
    """clients.__all__ names exactly what the package exports."""
    public = {name for name in vars(clients) if not name.startswith("_")}
    assert set(clients.__all__) <= public
    assert {"AsyncClient", "Client", "CorefleetError", "JobState"} <= set(clients.__all__)
    # Every error the gateway or a client can raise is importable from clients.
    every_error = {cls.__name__ for cls in errors.BY_CODE.values()}
    assert every_error <= set(clients.__all__)


async def test_a_wait_longer_than_the_gateways_maximum_is_asked_in_steps(
    settings: Settings,
) -> None:
    """A gateway whose COREFLEET_MAX_WAIT_S is under the client's step (30 s) refuses the
    step; the client asks for the maximum it names instead, and the wait goes on."""
    short = replace(settings, gateway=replace(settings.gateway, max_wait_s=0.5))
    server, session = await start_gateway(short)
    try:
        url = str(server.make_url("")).rstrip("/")
        async with AsyncClient(url) as client:
            job = await client.submit("io.sleep", 1.2)  # outlasts two steps of 0.5 s
            done = await client.wait(job.id, timeout_s=30)
            assert done.state is JobState.SUCCEEDED
            with pytest.raises(errors.InvalidParameter) as refused:
                await client._request("GET", f"/v1/jobs/{job.id}?wait=1")
            assert refused.value.detail["max"] == 0.5
    finally:
        await session.close()
        await server.close()


class _Hangup:
    """A server that reads each request and closes the connection without answering: the
    gateway gone between storing a job and answering. With ``answer``, it sends that first
    (the start of an answer, say) and then closes."""

    def __init__(self, answer: bytes = b"") -> None:
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                data = b""
                while not self._whole(data):
                    got = conn.recv(65536)
                    if not got:
                        break
                    data += got
                self.requests.append(data.split(b"\r\n", 1)[0])
                if self.answer:
                    conn.sendall(self.answer)

    @staticmethod
    def _whole(data: bytes) -> bool:
        """Whether ``data`` holds a whole request, its body included: a socket closed with
        bytes unread is reset, not closed, and the client would see that instead."""
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            return False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return len(body) >= int(value)
        return True

    def close(self) -> None:
        self.sock.close()


def test_a_threads_long_wait_holds_up_no_other_threads_request(gateway_url: str) -> None:
    """Threads sharing a ``Client``: one long-polling a job that runs on does not make
    another's submit wait for that poll to be answered (each request has its own socket)."""
    polling = threading.Event()

    class Watched(Client):
        def _request(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
            if "wait=" in path:
                polling.set()
            return super()._request(method, path, *args, **kwargs)

    with Watched(gateway_url) as client:
        held = client.submit("io.sleep", 30)
        waited: list[BaseException] = []

        def wait() -> None:
            try:
                client.wait(held.id, timeout_s=4)
            except BaseException as exc:  # the WaitTimeout it ends with
                waited.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        try:
            assert polling.wait(30)
            job = client.submit("io.echo", "meanwhile")
            # Answered while the other thread's poll is still held by the gateway.
            assert waiter.is_alive() and not waited
            assert client.wait(job.id, timeout_s=30).result == "meanwhile"
        finally:
            waiter.join(30)
            client.cancel(held.id)
        assert len(waited) == 1 and isinstance(waited[0], errors.WaitTimeout), waited


async def test_a_gateway_that_never_answers_fails_a_wait_soon_after_its_timeout() -> None:
    """A wait's long-polls are bounded by the wait's own deadline (plus a little), not by
    the deadline plus the client's whole timeout; and the error says what happened."""
    silent = socket.create_server(("127.0.0.1", 0))  # takes connections, never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with Client(url, timeout_s=60) as client, pytest.raises(errors.TransportError):
            await asyncio.to_thread(client.wait, "01ARZ3NDEKTSV4RRFFQ69G5FAV", 0.5)
        assert loop.time() - started < 10
        started = loop.time()
        async with AsyncClient(url, timeout_s=60) as aclient:
            with pytest.raises(errors.TransportError, match="TimeoutError") as caught:
                await aclient.wait("01ARZ3NDEKTSV4RRFFQ69G5FAV", timeout_s=0.5)
        assert loop.time() - started < 10
        assert not caught.value.message.endswith(": "), caught.value.message
    finally:
        silent.close()


def test_the_sync_client_resends_only_what_is_safe_to_send_twice() -> None:
    """A connection lost before the answer: a GET or DELETE is sent once more, a submit
    only with an Idempotency-Key (without one it may have been stored: a second send
    would make a second job)."""
    server = _Hangup()
    try:
        with Client(server.url) as client:
            with pytest.raises(errors.TransportError):
                client.submit("io.echo", 1)
            assert server.requests == [b"POST /v1/jobs HTTP/1.1"]
            with pytest.raises(errors.TransportError):
                client.submit("io.echo", 1, idempotency_key="k1")
            with pytest.raises(errors.TransportError):
                client.get("01ARZ3NDEKTSV4RRFFQ69G5FAV")
            assert (
                server.requests[1:]
                == [b"POST /v1/jobs HTTP/1.1"] * 2
                + [b"GET /v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV HTTP/1.1"] * 2
            )
    finally:
        server.close()


def test_an_answer_cut_off_is_a_transport_error_and_resent_only_when_safe() -> None:
    """The gateway stopping mid-answer (fewer bytes than its Content-Length) is a
    ``TransportError``, resent like a lost connection when that is safe; a reply that is
    not HTTP at all is a ``TransportError`` too, never sent twice."""
    cut = _Hangup(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"id": "0')
    garbled = _Hangup(b"SMTP ready\r\n\r\n")
    try:
        with Client(cut.url) as client:
            with pytest.raises(errors.TransportError, match="IncompleteRead"):
                client.get("01ARZ3NDEKTSV4RRFFQ69G5FAV")
            with pytest.raises(errors.TransportError, match="IncompleteRead"):
                client.submit("io.echo", 1)
        assert cut.requests == [b"GET /v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV HTTP/1.1"] * 2 + [
            b"POST /v1/jobs HTTP/1.1"
        ]
        with Client(garbled.url) as client, pytest.raises(errors.TransportError):
            client.get("01ARZ3NDEKTSV4RRFFQ69G5FAV")
        assert len(garbled.requests) == 1
    finally:
        cut.close()
        garbled.close()


@pytest.mark.parametrize("most", [0.0, 0.4005])
async def test_a_wait_goes_on_whatever_maximum_the_gateway_allows(
    settings: Settings, most: float
) -> None:
    """A gateway that allows no wait at all (COREFLEET_MAX_WAIT_S=0) is polled; one whose
    maximum has more than three decimals is asked for the maximum rounded down (rounded
    up, every step would be refused)."""
    gateway_settings = replace(settings, gateway=replace(settings.gateway, max_wait_s=most))
    server, session = await start_gateway(gateway_settings)
    try:
        url = str(server.make_url("")).rstrip("/")
        async with AsyncClient(url) as client:
            job = await client.submit("io.sleep", 0.6)
            assert (await client.wait(job.id, timeout_s=30)).state is JobState.SUCCEEDED

        def blocking() -> JobState:
            with Client(url) as client:
                return client.wait(client.submit("io.sleep", 0.6).id, timeout_s=30).state

        assert await asyncio.to_thread(blocking) is JobState.SUCCEEDED
    finally:
        await session.close()
        await server.close()


def test_the_sync_client_reconnects_when_the_gateway_closed_its_idle_socket(
    gateway_url: str,
) -> None:
    """A kept-alive socket the gateway closed while idle is not used for the next submit
    (which, without a key, is not sent twice): a new connection carries it."""
    with Client(gateway_url) as client:
        client.tasks()
        [conn] = client._idle
        assert conn.sock is not None
        # The gateway's end closing the socket looks, to the client, like its end reading
        # EOF: shut the client's read side down to get there without waiting for a timeout.
        conn.sock.shutdown(socket.SHUT_RD)
        mark = ids.new_id()  # this test's job among the module's
        job = client.submit("io.echo", mark)
        assert client.wait(job.id, timeout_s=30).result == mark
        assert conn not in client._idle
        # Sent once: a request into the closed socket, then again, would have made two.
        with urllib.request.urlopen(f"{gateway_url}/v1/jobs?task=io.echo&limit=100") as resp:
            listed = json.loads(resp.read())["jobs"]
        assert [j["id"] for j in listed if j["args"] == [mark]] == [job.id]
