"""What the gateway's middleware promises about time and streams: a slow upload is the
client's time (not a Redis outage), a body that never arrives is a 408, and an error once
an event stream is open ends that stream cleanly instead of writing an error into it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from redis.exceptions import ConnectionError as RedisConnectionError

from service import app as gateway_app
from service import middleware
from service.batching import Batcher
from service.settings import Settings
from tests.conftest import Gateway


async def _jobs(redis: aioredis.Redis) -> set[str]:
    return set(await redis.keys("cf:job:*"))


async def _post_slowly(
    gateway: Gateway, body: bytes, first: int, pause_s: float | None
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` over a raw socket: ``first`` bytes, then the rest after ``pause_s``
    (None: never). The gateway's answer, status and JSON."""
    host, port = gateway.server.host, gateway.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = (
            f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body[:first])
        await writer.drain()
        if pause_s is not None:
            await asyncio.sleep(pause_s)  # sleep-ok: the client's own slowness is the case
            writer.write(body[first:])
            await writer.drain()
        head_part = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head_part.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        payload = await asyncio.wait_for(reader.readexactly(length), 30)
    finally:
        writer.close()
    status = int(head_part.split()[1])
    return status, json.loads(payload)


async def test_a_slow_upload_is_not_taken_for_redis_being_away(
    bare_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store deadline (here 0.5 s) starts once the body is in: a body that takes
    longer than that to arrive is still stored, not answered 503 store_unavailable."""
    monkeypatch.setattr(middleware, "STORE_DEADLINE_S", 0.5)
    body = b'{"task": "io.echo", "args": ["slow"]}'
    status, reply = await _post_slowly(bare_gateway, body, 10, pause_s=1.5)
    assert status == 202, reply
    assert reply["state"] == "queued"


async def test_a_body_that_never_arrives_is_a_408_and_stores_nothing(
    bare_gateway: Gateway, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(middleware, "BODY_READ_S", 0.5)
    before = await _jobs(redis)
    status, reply = await _post_slowly(bare_gateway, b'{"task": "io.echo"}', 5, pause_s=None)
    assert status == 408 and reply["error"]["code"] == "request_timeout", reply
    assert "did not arrive within 0.5 s" in reply["error"]["message"]
    assert await _jobs(redis) == before


@pytest.mark.parametrize("error", [RedisConnectionError("gone"), KeyError("a bug")])
async def test_an_error_once_a_stream_is_open_ends_it_cleanly(error: Exception) -> None:
    """Once an event stream's headers are out, a JSON error answer would be written into
    its body (corrupting the chunked stream for every HTTP client). The stream ends, with
    what was sent so far, and the client reads a well-formed body."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = await gateway_app._open_stream(request)
        await response.write(b"event: state\ndata: {}\n\n")
        raise error

    deadlines = middleware.Deadlines()
    app = web.Application(middlewares=[middleware.json_errors(1024), deadlines.middleware()])
    app.router.add_get("/v1/jobs/{id}/events", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.make_url("/v1/jobs/x/events")) as resp,
        ):
            assert resp.status == 200
            assert await resp.read() == b"event: state\ndata: {}\n\n"
    finally:
        await server.close()


async def test_only_routes_that_take_wait_stretch_their_deadline() -> None:
    """``?wait=`` holds a GET of a job and a submit; on any other route it is ignored, and
    must not keep a request from its 503 for an hour while Redis does not answer."""
    app = gateway_app.create_app(Settings.from_env({}))
    cases = [
        ("GET", "/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV?wait=30", 30 + middleware.STORE_DEADLINE_S),
        ("POST", "/v1/jobs?wait=30", 30 + middleware.STORE_DEADLINE_S),
        ("DELETE", "/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV?wait=3600", middleware.STORE_DEADLINE_S),
        ("POST", "/v1/jobs/batch?wait=3600", middleware.STORE_DEADLINE_S),
        ("GET", "/v1/queues?wait=3600", middleware.STORE_DEADLINE_S),
    ]
    for method, path, deadline in cases:
        request = make_mocked_request(method, path, app=app)
        request._match_info = await app.router.resolve(request)
        assert middleware._deadline_s(request) == deadline, (method, path)


async def test_a_call_that_cannot_be_packed_fails_alone(redis: aioredis.Redis) -> None:
    """Calls made in one turn go as one pipeline; one whose arguments cannot be sent
    (a string UTF-8 cannot encode) fails its own caller, not the others in its turn."""
    batcher = Batcher(redis, {})
    good, bad = await asyncio.gather(
        batcher.command("SET", "test:packed", "yes"),
        batcher.command("SET", "test:unpacked", "\ud800"),
        return_exceptions=True,
    )
    assert good is True and isinstance(bad, UnicodeEncodeError)
    assert await redis.get("test:packed") == "yes"
    assert await redis.exists("test:unpacked") == 0
