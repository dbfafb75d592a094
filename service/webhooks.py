"""Webhooks: a finished job's record is POSTed to the URL the job named (``webhook``).

Durable: the script that ends a job that named a webhook adds the job's id to
``cf:webhooks`` in the same step, so the delivery is owed as soon as the job ends, whatever
process ended it and whichever gateways are up. Every gateway with webhooks on reads that
stream in one consumer group and posts each delivery once it has it; a 2xx answer
acknowledges it. A delivery that fails (another status, a redirect, no answer within
``timeout_s``) stays pending and is tried again, by whichever gateway claims it, once
``timeout_s`` and a wait that doubles from ``first_retry_s`` (up to ``MAX_RETRY_S``) have
passed; after ``MAX_DELIVERIES`` tries it is dropped, and logged. Receivers may see a
delivery twice (a gateway that dies after posting and before acknowledging):
``Corefleet-Delivery`` names each delivery, the same on every try.

Only the hosts in ``COREFLEET_WEBHOOK_HOSTS`` may be named, and with none webhooks are off:
whoever may submit must not make a gateway call any address its network reaches. The list
is checked when a job is submitted; a gateway posts what was accepted (producers, which
reach Redis itself, are trusted), and one with webhooks off posts nothing.
With ``COREFLEET_WEBHOOK_SECRET`` every try is signed: ``Corefleet-Signature:
t=<Unix seconds>,sha256=<hex>``, the HMAC-SHA256 under the secret of the time, a dot and
the body. The time lets a receiver refuse a try replayed later (``verify_webhook``). With
several secrets (a rotation) each signs, one ``sha256=`` apiece, so that receivers can
move to the new one at their own pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from service import ids, keys
from service.engines.asyncio_ import consumer_name, create_group, leave_group
from service.errors import InvalidBody
from service.jobs import shown_url
from service.settings import DEFAULT_PORTS, WebhookSettings, webhook_addresses
from service.store import LUA_DIR, JobStore

log = logging.getLogger("corefleet.webhooks")

#: The consumer group every gateway's sender reads ``cf:webhooks`` in.
GROUP = "corefleet-webhooks"
#: The longest wait between two tries of one delivery.
MAX_RETRY_S = 300.0
#: Tries of one delivery before it is dropped (about 20 minutes of tries from 1 s).
MAX_DELIVERIES = 12
#: The longest URL a job may name.
MAX_URL_LENGTH = 2048
#: Deliveries one sender reads or claims per call.
BATCH = 50
#: Deliveries one sender posts at once; a slow receiver holds up only its own.
MAX_IN_FLIGHT = 200
#: Pages of failed deliveries (``BATCH`` each) looked through per round for those due.
MAX_PAGES = 20


def check_webhook(url: Any, allowed_hosts: tuple[str, ...]) -> str:
    """``url``, if a job may name it as its webhook; else a 400 that says why."""
    if not allowed_hosts:
        raise InvalidBody(
            "webhooks are off on this deployment (set COREFLEET_WEBHOOK_HOSTS to the hosts "
            "they may call)"
        )
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL_LENGTH:
        raise InvalidBody(f"options.webhook must be a URL of at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise InvalidBody("options.webhook must be an http or https URL")
    if parts.username is not None or parts.password is not None:
        raise InvalidBody("options.webhook must not carry a user or password")
    if (parts.hostname, port) not in webhook_addresses(allowed_hosts):
        # The allowed hosts are not shown: they may name what clients need not know.
        raise InvalidBody(
            f"options.webhook may only call the hosts in COREFLEET_WEBHOOK_HOSTS, not "
            f"{parts.hostname}:{port}"
        )
    return url


#: How old a signed try ``verify_webhook`` accepts by default, in seconds (clocks differ).
SIGNATURE_TOLERANCE_S = 300.0


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def signature(secrets: Sequence[str], body: bytes, timestamp: int) -> str:
    """The ``Corefleet-Signature`` of ``body`` sent at ``timestamp`` (Unix seconds)."""
    return ",".join([f"t={timestamp}", *(f"sha256={_mac(s, timestamp, body)}" for s in secrets)])


def verify_webhook(
    secret: str,
    header: str,
    body: bytes,
    *,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """For receivers: whether ``header`` (``Corefleet-Signature``) signs ``body`` with
    ``secret``, at most ``tolerance_s`` seconds from ``now`` (this machine's clock).

    A receiver should also drop a ``Corefleet-Delivery`` it has already handled: a try is
    sent again when its answer was lost.
    """
    parts = [part.strip().partition("=") for part in header.split(",")]
    stamps = [value for name, _, value in parts if name == "t"]
    if len(stamps) != 1 or not stamps[0].isascii() or not stamps[0].isdigit():
        return False
    timestamp = int(stamps[0])
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = _mac(secret, timestamp, body)
    # compare_digest refuses str with non-ASCII characters (a forged header may hold them).
    return any(
        value.isascii() and hmac.compare_digest(value, expected)
        for name, _, value in parts
        if name == "sha256"
    )


class WebhookSender:
    """Posts the deliveries on ``cf:webhooks``; one in every gateway."""

    def __init__(self, redis: aioredis.Redis, store: JobStore, settings: WebhookSettings) -> None:
        self.redis = redis
        self.store = store
        self.settings = settings
        self.name = consumer_name()
        self._session: aiohttp.ClientSession | None = None
        #: Deliveries being posted now, by entry id.
        self._sending: dict[str, asyncio.Task[None]] = {}
        #: Where the next look through the failed deliveries starts.
        self._cursor = "-"
        self._outcome = redis.register_script((LUA_DIR / "webhook_outcome.lua").read_text())

    async def prepare(self) -> None:
        """Create the deliveries' stream and group, before the first job can end."""
        await create_group(self.redis, keys.WEBHOOKS, GROUP)

    async def run(self, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._session = session
            try:
                await self._serve(stop)
            finally:
                # Deliveries cut short stay pending: another gateway posts them later.
                for sending in self._sending.values():
                    sending.cancel()
                await asyncio.gather(*self._sending.values(), return_exceptions=True)
                with contextlib.suppress(RedisError, OSError):
                    await leave_group(self.redis, [keys.WEBHOOKS], GROUP, self.name)

    async def _serve(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._send_new()
                await self._send_again()
                continue
            except ResponseError as exc:
                # NOGROUP: Redis lost its data (a restart without persistence).
                if "NOGROUP" not in str(exc):
                    log.error("reading the webhook deliveries failed (%s)", exc)
                with contextlib.suppress(RedisError, OSError):
                    await self.prepare()
            except (RedisError, OSError) as exc:
                log.warning("cannot read the webhook deliveries now (%s)", exc)
            except Exception:  # never stop sending for good: say why, and go on
                log.exception("the webhook sender failed; going on")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)  # back off from the trouble

    async def _send_new(self) -> None:
        # Waits at most a first retry's time: failed deliveries are looked at between reads.
        block_s = min(self.settings.first_retry_s, 1.0)
        room = MAX_IN_FLIGHT - len(self._sending)
        if room <= 0:
            await asyncio.wait(self._sending.values(), timeout=block_s)
            return
        reply = await self.redis.xreadgroup(
            GROUP,
            self.name,
            {keys.WEBHOOKS: ">"},
            count=min(room, BATCH),
            block=max(1, int(block_s * 1000)),
        )
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self._send(entry_id, fields)

    async def _send_again(self) -> None:
        """Claim and post the failed deliveries whose wait is over; drop the hopeless."""
        due: list[int | bytes | str | memoryview[int]] = []  # as redis-py types ids
        room = MAX_IN_FLIGHT - len(self._sending)
        for _page in range(MAX_PAGES):
            if room <= 0:
                break
            pending = await self.redis.xpending_range(
                keys.WEBHOOKS,
                GROUP,
                min=self._cursor,
                max="+",
                count=BATCH,
                idle=int(self._wait_ms(1)),
            )
            for item in pending:
                entry_id, tries = item["message_id"], int(item["times_delivered"])
                if entry_id in self._sending:
                    continue
                if tries >= MAX_DELIVERIES:
                    log.error("webhook delivery %s dropped after %d tries", entry_id, tries)
                    await self._record(entry_id, "dropped")
                elif item["time_since_delivered"] >= self._wait_ms(tries) and room > 0:
                    due.append(entry_id)
                    room -= 1
            # The next round goes on from here, so that many deliveries waiting out long
            # backoffs cannot hide those behind them; from the start once at the end.
            if len(pending) < BATCH:
                self._cursor = "-"
                break
            self._cursor = f"({pending[-1]['message_id']}"
        if not due:
            return
        # Claimed only if still idle that long: two gateways never both take one.
        claimed = await self.redis.xclaim(
            keys.WEBHOOKS, GROUP, self.name, int(self._wait_ms(1)), due
        )
        for entry_id, fields in claimed:
            if fields:
                self._send(entry_id, fields)
            else:  # the entry is gone (deleted by hand): nothing to post
                await self._record(entry_id)

    def _send(self, entry_id: str, fields: dict[str, str]) -> None:
        sending = asyncio.create_task(self._deliver(entry_id, fields))
        self._sending[entry_id] = sending
        sending.add_done_callback(lambda _done: self._sending.pop(entry_id, None))

    def _wait_ms(self, tries: int) -> float:
        """How long a delivery tried ``tries`` times waits before the next try: its last try
        may take ``timeout_s`` (and must not be doubled by a second one meanwhile), then
        the backoff."""
        backoff = min(self.settings.first_retry_s * 2.0 ** (tries - 1), MAX_RETRY_S)
        return (self.settings.timeout_s + backoff) * 1000

    async def _deliver(self, entry_id: str, fields: dict[str, str]) -> None:
        try:
            await self._post(entry_id, fields)
        except (RedisError, OSError) as exc:  # left pending: tried again later
            log.warning("webhook delivery %s not made now (%s)", entry_id, exc)
        except Exception:  # a task of its own: nobody else would hear of it
            log.exception("webhook delivery %s failed; it will be tried again", entry_id)

    async def _post(self, entry_id: str, fields: dict[str, str]) -> None:
        job = await self.store.get(fields.get("id", ""))
        url = job.options.get("webhook") if job is not None else None
        if job is None or not isinstance(url, str):
            await self._record(entry_id)  # the record expired, or names no webhook: nothing owed
            return
        body = json.dumps(job.to_api()).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "corefleet-webhook",
            "Corefleet-Job-Id": job.id,
            "Corefleet-Delivery": entry_id,
        }
        if self.settings.secrets:
            # Signed at each try: its time is when it was sent.
            headers["Corefleet-Signature"] = signature(
                self.settings.secrets, body, int(time.time())
            )
        assert self._session is not None
        try:
            # No redirects: they could lead anywhere, past the allowed hosts.
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                ok = 200 <= response.status < 300
                problem = f"answered {response.status}"
        except aiohttp.ClientResponseError as exc:  # its text holds the whole URL
            ok, problem = False, f"{type(exc).__name__}: {exc.status}, {exc.message}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, problem = False, f"{type(exc).__name__}: {exc}"
        if ok:
            await self._record(entry_id, "delivered")
        else:
            log.warning(
                "webhook of job %s to %s failed (%s); will try again",
                job.id,
                shown_url(url),
                problem,
            )
            await self._record(entry_id, "failed")

    async def _record(self, entry_id: str, outcome: str = "") -> None:
        """What became of a delivery's try: ``failed`` (it stays owed), or it is owed no
        more: ``delivered``, ``dropped`` after its last try, or (no outcome) nothing was
        owed after all (the job's record expired). One script, counting once even when
        the client sends it again."""
        marker = keys.webhook_try(ids.new_id())
        await self._outcome(
            keys=[keys.WEBHOOKS, keys.WEBHOOK_STATS, marker], args=[GROUP, entry_id, outcome]
        )
