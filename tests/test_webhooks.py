"""Webhooks: a finished job's record is POSTed to the URL it named, durably, with retries.

A real receiver (an aiohttp server on a free port) records every request it gets.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from clients import verify_webhook
from service import keys
from service.errors import InvalidBody
from service.settings import Settings, WebhookSettings, webhook_addresses
from service.webhooks import check_webhook, signature
from tests.conftest import Gateway, scrape_metrics, start_gateway, wait_state

SECRET = "a-secret-the-receiver-shares"
#: The secret being rotated out: signed with too, until receivers have the new one.
OLD_SECRET = "the-secret-before-it"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    @property
    def record(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    url: str
    got: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)
    #: Statuses to answer with, in turn; 200 once they are used up.
    answers: list[int] = field(default_factory=list)

    async def next(self, within: float = 30) -> Delivery:
        return await asyncio.wait_for(self.got.get(), within)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver("")

    async def handle(request: web.Request) -> web.Response:
        await hook.got.put(Delivery(dict(request.headers), await request.read()))
        status = hook.answers.pop(0) if hook.answers else 200
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # aiohttp
    hook.url = f"http://127.0.0.1:{port}/hook"
    yield hook
    await runner.cleanup()


def _hooked(settings: Settings, receiver: Receiver, worker: bool = True) -> Settings:
    """Settings that allow webhooks to the receiver, signed, retried quickly; without an
    embedded io worker unless ``worker``."""
    host = urlsplit(receiver.url).netloc
    webhooks = WebhookSettings(
        hosts=(host,), secrets=(SECRET, OLD_SECRET), timeout_s=1.0, first_retry_s=0.2
    )
    gateway = replace(settings.gateway, embedded_io_worker=worker)
    return replace(settings, webhooks=webhooks, gateway=gateway)


@pytest.fixture
async def hooked(
    settings: Settings, redis: aioredis.Redis, receiver: Receiver
) -> AsyncIterator[Gateway]:
    server, session = await start_gateway(_hooked(settings, receiver))
    yield Gateway(server, session)
    await session.close()
    await server.close()


async def test_a_finished_job_is_posted_to_its_webhook_signed(
    hooked: Gateway, receiver: Receiver, redis: aioredis.Redis
) -> None:
    secret_url = receiver.url + "?token=receivers-own-secret"
    job = await hooked.submit("io.echo", {"hello": "hook"}, webhook=secret_url)
    # The URL's path and query are the receiver's secret: records show its host only.
    assert job["options"]["webhook"] == receiver.url.removesuffix("/hook") + "/..."
    delivery = await receiver.next()
    record = delivery.record
    assert (record["id"], record["state"]) == (job["id"], "succeeded")
    assert record["result"] == {"hello": "hook"}
    assert record == (await hooked.call("GET", f"/v1/jobs/{job['id']}"))[1]
    assert delivery.headers["Content-Type"] == "application/json"
    assert delivery.headers["Corefleet-Job-Id"] == job["id"]
    # Signed with the time it was sent, by each secret of the rotation.
    header = delivery.headers["Corefleet-Signature"]
    sent = int(header.split(",")[0].removeprefix("t="))
    assert header == signature((SECRET, OLD_SECRET), delivery.body, sent)
    assert verify_webhook(SECRET, header, delivery.body)
    assert verify_webhook(OLD_SECRET, header, delivery.body)
    assert not verify_webhook("another secret", header, delivery.body)


def test_verify_webhook_refuses_what_was_not_signed_so_or_then() -> None:
    body = b'{"id": "x", "state": "succeeded"}'
    header = signature((SECRET,), body, 1_800_000_000)
    mac = hmac.new(SECRET.encode(), b"1800000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1800000000,sha256={mac}"
    assert verify_webhook(SECRET, header, body, now=1_800_000_100)
    assert not verify_webhook(SECRET, header, body, now=1_800_000_301)  # replayed later
    assert not verify_webhook(SECRET, header, body, now=1_799_999_699)  # from the future
    assert verify_webhook(SECRET, header, body, now=1_800_000_500, tolerance_s=600)
    assert not verify_webhook(SECRET, header, body + b" ", now=1_800_000_000)  # tampered
    # Another time with the same MAC: the time is signed too.
    forged = header.replace("t=1800000000", "t=1800000200")
    assert not verify_webhook(SECRET, forged, body, now=1_800_000_200)
    for bad in ("", f"sha256={mac}", f"t=,sha256={mac}", f"t=1,t=1800000000,sha256={mac}"):
        assert not verify_webhook(SECRET, bad, body, now=1_800_000_000)
    # Headers decode as latin-1: a forged one with non-ASCII is refused, not an exception.
    assert not verify_webhook(SECRET, "t=1800000000,sha256=\xe9" + mac[1:], body, now=1_800_000_000)


async def test_a_failed_delivery_is_tried_again_until_answered(
    hooked: Gateway, receiver: Receiver
) -> None:
    receiver.answers = [500, 503]
    job = await hooked.submit("test.boom", "nope", webhook=receiver.url)
    tries = [await receiver.next() for _ in range(3)]
    assert {d.record["state"] for d in tries} == {"failed"}
    assert tries[0].record["error"] == {"type": "ValueError", "message": "nope"}
    # One delivery, tried three times: the same delivery id on each try.
    assert len({d.headers["Corefleet-Delivery"] for d in tries}) == 1
    assert {d.headers["Corefleet-Job-Id"] for d in tries} == {job["id"]}
    # /metrics counts the tries once the last answer is recorded.
    want = {
        'corefleet_webhook_tries_total{outcome="delivered"}': 1.0,
        'corefleet_webhook_tries_total{outcome="failed"}': 2.0,
        'corefleet_webhook_tries_total{outcome="dropped"}': 0.0,
        "corefleet_webhooks_owed": 0.0,
    }

    async def counted() -> dict[str, float | None]:
        got = await scrape_metrics(hooked)
        return {name: got.get(name) for name in want}

    async with asyncio.timeout(30):
        while await counted() != want:  # noqa: ASYNC110  # no event for a counter
            await asyncio.sleep(0.05)  # sleep-ok: the answer is recorded just after it


async def test_a_cancelled_job_is_posted_too(
    settings: Settings, redis: aioredis.Redis, receiver: Receiver
) -> None:
    server, session = await start_gateway(_hooked(settings, receiver, worker=False))
    gateway = Gateway(server, session)
    try:
        job = await gateway.submit("io.echo", 1, webhook=receiver.url)
        status, _ = await gateway.call("DELETE", f"/v1/jobs/{job['id']}")
        assert status == 200
        assert (await receiver.next()).record["state"] == "cancelled"
    finally:
        await session.close()
        await server.close()


async def test_a_delivery_is_left_by_gateways_with_webhooks_off_for_one_with_them_on(
    settings: Settings, redis: aioredis.Redis, receiver: Receiver
) -> None:
    """The job ends on a gateway with webhooks off: it neither posts nor drops what is
    owed. The next gateway with them on posts it."""
    hooked = _hooked(settings, receiver, worker=False)
    server, session = await start_gateway(hooked)
    job = await Gateway(server, session).submit("io.echo", "later", webhook=receiver.url)
    await session.close()
    await server.close()

    server, session = await start_gateway(settings)  # webhooks off, with an io worker
    try:
        assert await wait_state(redis, job["id"], "succeeded") == "succeeded"
        assert await redis.xlen(keys.WEBHOOKS) == 1
        assert (await redis.xpending(keys.WEBHOOKS, "corefleet-webhooks"))["pending"] == 0
    finally:
        await session.close()
        await server.close()
    assert receiver.got.empty()

    server, session = await start_gateway(hooked)
    try:
        delivery = await receiver.next()
        assert (delivery.record["id"], delivery.record["result"]) == (job["id"], "later")
    finally:
        await session.close()
        await server.close()


@pytest.mark.parametrize(
    ("webhook", "says"),
    [
        ("http://10.0.0.1/hook", "may only call the hosts"),
        ("http://127.0.0.1/hook", "may only call the hosts"),  # port 80: not allowed
        ("http://127.0.0.1.example.com/hook", "may only call the hosts"),
        ("file:///etc/passwd", "http or https"),
        ("http://user:pw@127.0.0.1/hook", "user or password"),
        ("http://127.0.0.1:notaport/hook", "http or https"),
        (42, "must be a URL"),
        ("http://127.0.0.1/" + "x" * 3000, "must be a URL"),
    ],
)
async def test_a_webhook_to_a_host_not_allowed_is_refused(
    hooked: Gateway, redis: aioredis.Redis, webhook: Any, says: str
) -> None:
    body = {"task": "io.echo", "args": [1], "options": {"webhook": webhook}}
    status, reply = await hooked.call("POST", "/v1/jobs", json=body)
    assert status == 400 and reply["error"]["code"] == "invalid_body"
    assert says in reply["error"]["message"]
    assert await redis.zcard("cf:jobs") == 0


async def test_a_webhook_url_holding_a_lone_surrogate_is_refused(
    hooked: Gateway, redis: aioredis.Redis, receiver: Receiver
) -> None:
    """JSON can carry "\\ud800", which is no Unicode character: stored as it came, the URL
    could not be sent to Redis, and the pipeline it shared failed every caller in it."""
    body = {"task": "io.echo", "args": [1], "options": {"webhook": receiver.url + "/\ud800"}}
    status, reply = await hooked.call("POST", "/v1/jobs", json=body)
    assert status == 400 and reply["error"]["code"] == "invalid_json", reply
    assert "surrogate" in reply["error"]["message"]
    assert await redis.zcard("cf:jobs") == 0


async def test_webhooks_are_off_unless_hosts_are_allowed(
    gateway: Gateway, redis: aioredis.Redis, receiver: Receiver
) -> None:
    body = {"task": "io.echo", "args": [1], "options": {"webhook": receiver.url}}
    status, reply = await gateway.call("POST", "/v1/jobs", json=body)
    assert status == 400 and "COREFLEET_WEBHOOK_HOSTS" in reply["error"]["message"]
    assert await redis.zcard("cf:jobs") == 0


def test_hosts_allow_a_name_on_the_default_ports_or_a_name_and_port() -> None:
    hosts = ("hooks.example", "[fd00::1]:8443", "other.example:8080")
    for allowed in (
        "https://hooks.example/x",
        "http://HOOKS.example:80/x",
        "https://[fd00::1]:8443/x",
        "http://other.example:8080/",
    ):
        assert check_webhook(allowed, hosts) == allowed
    for refused in (
        "http://hooks.example:6379/",
        "https://[fd00::1]/x",
        "http://other.example/",
        "http://fd00::1:8443/",
    ):
        with pytest.raises(InvalidBody):
            check_webhook(refused, hosts)
    for entry in ("hooks.example/path", "hooks.example?x", "hooks.example#y", "u@hooks.example"):
        with pytest.raises(ValueError, match="not a host"):
            webhook_addresses((entry,))


def test_the_secret_setting_takes_a_rotation() -> None:
    rotating = Settings.from_env({"COREFLEET_WEBHOOK_SECRET": " new-secret , old-secret "})
    assert rotating.webhooks.secrets == ("new-secret", "old-secret")
    assert Settings.from_env({}).webhooks.secrets == ()
    assert "new-secret" not in repr(rotating)  # never in a log line


async def test_a_webhook_outcome_sent_twice_is_counted_once(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """The client sends a call again when its answer is lost with the connection, though
    Redis ran it: a try's outcome, sent twice, counts once."""
    from service.store import JobStore
    from service.webhooks import GROUP, WebhookSender

    sender = WebhookSender(redis, JobStore(redis, 60), WebhookSettings())
    await sender.prepare()
    entry = await redis.xadd(keys.WEBHOOKS, {"id": "01ARZ3NDEKTSV4RRFFQ69G5FAV"})
    await redis.xreadgroup(GROUP, "tester", {keys.WEBHOOKS: ">"})
    before = await redis.hgetall(keys.WEBHOOK_STATS)
    marker = keys.webhook_try("01ARZ3NDEKTSV4RRFFQ69G5FAW")
    for outcome, marker_key in (("failed", marker), ("delivered", marker + "-unused")):
        for _ in range(2):  # the call, and the same call sent again
            await sender._outcome(
                keys=[keys.WEBHOOKS, keys.WEBHOOK_STATS, marker_key],
                args=[GROUP, entry, outcome],
            )
    after = await redis.hgetall(keys.WEBHOOK_STATS)
    for outcome in ("failed", "delivered"):
        assert int(after.get(outcome, 0)) - int(before.get(outcome, 0)) == 1
    assert await redis.xrange(keys.WEBHOOKS, entry, entry) == []  # acknowledged and deleted


async def test_a_failed_try_is_logged_without_the_urls_secret(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver that answers with something that is not HTTP makes aiohttp raise an
    error whose text holds the whole URL: the log line keeps the host only."""
    answered = asyncio.Event()

    async def garble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()
        answered.set()

    server = await asyncio.start_server(garble, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    receiver = Receiver(f"http://127.0.0.1:{port}/hook")
    gateway_server, session = await start_gateway(_hooked(settings, receiver))
    gateway = Gateway(gateway_server, session)
    try:
        with caplog.at_level(logging.WARNING, logger="corefleet.webhooks"):
            await gateway.submit("io.echo", 1, webhook=receiver.url + "?token=its-secret")
            await asyncio.wait_for(answered.wait(), 30)
            async with asyncio.timeout(30):
                while "failed" not in caplog.text:  # noqa: ASYNC110  # the sender's log line
                    await asyncio.sleep(0.05)  # sleep-ok: the try's end has no event
        assert f"127.0.0.1:{port}/..." in caplog.text
        assert "its-secret" not in caplog.text and "/hook" not in caplog.text, caplog.text
    finally:
        await session.close()
        await gateway_server.close()
        server.close()
