"""API tokens: 401 without one, 403 for a read token that tries to change something."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import redis.asyncio as aioredis
from playwright.async_api import expect

from clients import AsyncClient, Client
from service.errors import Forbidden, Unauthorized
from service.settings import Settings, SettingsError
from tests.conftest import Gateway, start_gateway
from tests.test_dashboard import browser_page

API_TOKEN = "api-token-0123456789abcdef"
READ_TOKEN = "read-token-0123456789abcdef"


@pytest.fixture
async def guarded(settings: Settings, redis: aioredis.Redis) -> AsyncIterator[Gateway]:
    tokens = replace(settings.gateway, api_tokens=(API_TOKEN,), read_tokens=(READ_TOKEN,))
    server, session = await start_gateway(replace(settings, gateway=tokens))
    yield Gateway(server, session)
    await session.close()
    await server.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_without_a_valid_token_the_api_answers_401_and_stores_nothing(
    guarded: Gateway, redis: aioredis.Redis
) -> None:
    body = {"task": "io.echo", "args": [1]}
    for headers in ({}, bearer("not-the-token-at-all"), {"Authorization": API_TOKEN}):
        async with guarded.session.post(
            f"{guarded.url}/v1/jobs", json=body, headers=headers
        ) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="corefleet"'
            assert (await response.json())["error"]["code"] == "unauthorized"
    for path in ("/v1/jobs", "/v1/queues", "/v1/tasks", "/metrics", "/v1/events"):
        status, error = await guarded.call("GET", path)
        assert status == 401 and error["error"]["code"] == "unauthorized", path
    assert await redis.zcard("cf:jobs") == 0


async def test_a_body_is_not_read_before_the_token_is_checked(guarded: Gateway) -> None:
    """A client without a token gets its 401 without making the gateway hold its body
    (an oversized one is a 401 too, not a 413 that only a token holder should learn of)."""
    big = b'{"task": "io.echo", "args": ["' + b"x" * 2 * 1024 * 1024 + b'"]}'
    async with guarded.session.post(f"{guarded.url}/v1/jobs", data=io.BytesIO(big)) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "unauthorized"


async def test_an_api_token_may_do_everything(guarded: Gateway) -> None:
    status, job = await guarded.call(
        "POST", "/v1/jobs?wait=10", json={"task": "io.echo", "args": [1]}, headers=bearer(API_TOKEN)
    )
    assert status == 200 and job["result"] == 1
    status, _ = await guarded.call("GET", f"/v1/jobs/{job['id']}", headers=bearer(API_TOKEN))
    assert status == 200


async def test_a_read_token_may_only_read(guarded: Gateway, redis: aioredis.Redis) -> None:
    status, job = await guarded.call(
        "POST", "/v1/jobs", json={"task": "io.sleep", "args": [30]}, headers=bearer(API_TOKEN)
    )
    assert status == 202
    status, listing = await guarded.call("GET", "/v1/jobs", headers=bearer(READ_TOKEN))
    assert status == 200 and [j["id"] for j in listing["jobs"]] == [job["id"]]
    status, error = await guarded.call(
        "POST", "/v1/jobs", json={"task": "io.echo", "args": [1]}, headers=bearer(READ_TOKEN)
    )
    assert status == 403 and error["error"]["code"] == "forbidden"
    status, error = await guarded.call(
        "DELETE", f"/v1/jobs/{job['id']}", headers=bearer(READ_TOKEN)
    )
    assert status == 403
    assert await redis.zcard("cf:jobs") == 1
    assert await redis.hget(f"cf:job:{job['id']}", "state") != "cancelled"
    # Cancelled with the right token, so that the gateway's stop does not wait out the sleep.
    status, _ = await guarded.call("DELETE", f"/v1/jobs/{job['id']}", headers=bearer(API_TOKEN))
    assert status == 200


async def test_probes_the_api_description_and_the_dashboard_page_stay_open(
    guarded: Gateway,
) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json", "/dashboard", "/dashboard/app.js"):
        async with guarded.session.get(guarded.url + path) as response:
            assert response.status == 200, path


async def test_the_python_clients_send_their_token(guarded: Gateway) -> None:
    async with AsyncClient(guarded.url, token=API_TOKEN) as client:
        job = await client.submit("io.echo", "hi")
        assert (await client.wait(job.id, timeout_s=10)).result == "hi"
    async with AsyncClient(guarded.url) as anonymous:
        with pytest.raises(Unauthorized):
            await anonymous.submit("io.echo", "hi")
    async with AsyncClient(guarded.url, token=READ_TOKEN) as reader:
        with pytest.raises(Forbidden):
            await reader.submit("io.echo", "hi")

    def blocking() -> str:  # the blocking client, off the event loop
        with Client(guarded.url, token=API_TOKEN) as client:
            return str(client.get(job.id).state.value)

    assert await asyncio.to_thread(blocking) == "succeeded"


async def test_a_token_of_bytes_no_token_has_is_a_401_not_a_500(guarded: Gateway) -> None:
    host, port = guarded.server.host, guarded.server.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer \xff\xfe-not-utf8-0123456789\r\n\r\n"
    )
    status_line = await reader.readline()
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 401"), status_line


def test_weak_tokens_are_refused_at_start() -> None:
    for weak in ("short", "caf\u00e9-0123456789abcdef", "with space 0123456789"):
        with pytest.raises(SettingsError, match="at least 16"):
            Settings.from_env({"COREFLEET_API_TOKENS": weak})
    settings = Settings.from_env(
        {"COREFLEET_API_TOKENS": f"{API_TOKEN}, {API_TOKEN}x", "COREFLEET_READ_TOKENS": READ_TOKEN}
    )
    assert settings.gateway.api_tokens == (API_TOKEN, API_TOKEN + "x")
    assert settings.gateway.read_tokens == (READ_TOKEN,)
    assert API_TOKEN not in repr(settings)  # never in a log line that prints the settings


async def test_the_dashboard_asks_for_a_token_and_a_read_token_cannot_submit(
    guarded: Gateway,
) -> None:
    status, job = await guarded.call(
        "POST", "/v1/jobs", json={"task": "io.echo", "args": ["seen"]}, headers=bearer(API_TOKEN)
    )
    assert status == 202
    problems: list[str] = []
    async with browser_page(problems) as page:
        await page.goto(f"{guarded.url}/dashboard")
        await expect(page.locator("#login")).to_be_visible()
        await expect(page.locator("#live")).to_have_text("needs a token")
        await page.fill("#token", READ_TOKEN)
        await page.click("#login-submit")
        await expect(page.locator("#live")).to_have_text("live")
        await expect(page.locator(f'#jobs tbody tr[data-id="{job["id"]}"]')).to_have_count(1)
        await page.select_option("#task", "io.echo")
        await page.fill("#args", '["no"]')
        await page.click("#submit")
        await expect(page.locator("#submit-result")).to_contain_text("403 forbidden")
        # What the browser logged of the refusals this test caused on purpose:
        expected = ("status of 401 (Unauthorized)", "status of 403 (Forbidden)")
        problems[:] = [p for p in problems if not p.endswith(expected)]
