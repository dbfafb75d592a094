"""The gateway: ``create_app(settings)`` builds the aiohttp application; routes live here.

Resources (Redis, the event hub, engines, the embedded io worker) are opened and closed in
``cleanup_ctx`` generators; state lives under typed ``web.AppKey``s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from service import ids, middleware, presence
from service.auth import token_auth
from service.dashboard import Dashboard
from service.engines import build_engines
from service.engines.asyncio_ import StreamConsumer, consumer_name, ensure_group, io_worker
from service.engines.base import Engine
from service.engines.celery_ import over_ceiling, time_limit_ceiling
from service.engines.cluster import HeavyDispatcher, queues_of
from service.engines.dask_ import DaskEngine
from service.engines.ray_ import RayEngine
from service.errors import (
    InvalidBody,
    InvalidJobId,
    InvalidJSON,
    InvalidParameter,
    JobFinished,
    JobNotFound,
    MethodNotAllowed,
    StoreUnavailable,
)
from service.events import EventHub, Feed, Watch
from service.jobs import Job, JobState
from service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from service.metrics import HttpMetrics, exposition, stored_families
from service.middleware import OPEN_STREAM, Deadlines, json_errors
from service.openapi import openapi_document
from service.runner import JobRunner
from service.scheduler import Scheduler
from service.settings import Settings
from service.store import JobQuery, JobStore, connect
from service.submit import Submitter
from service.webhooks import WebhookSender
from tasks import Registry

log = logging.getLogger("corefleet.gateway")

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", Registry)
REDIS = web.AppKey("redis", aioredis.Redis)
STORE = web.AppKey("store", JobStore)
HUB = web.AppKey("hub", EventHub)
ENGINES = web.AppKey("engines", dict[str, Engine])
SUBMITTER = web.AppKey("submitter", Submitter)
IO_WORKER = web.AppKey("io_worker", StreamConsumer)
HEAVY = web.AppKey("heavy", HeavyDispatcher)
HTTP_METRICS = web.AppKey("http_metrics", HttpMetrics)

MAX_BATCH = 1000


def create_app(settings: Settings, registry: Registry | None = None) -> web.Application:
    http_metrics = HttpMetrics()
    deadlines = Deadlines()
    app = web.Application(
        # Measured outermost, so that error answers count with the status they went out with.
        middlewares=[
            http_metrics.middleware(),
            json_errors(settings.gateway.max_body_bytes),
            *_auth(settings),
            deadlines.middleware(),
        ],
        client_max_size=settings.gateway.max_body_bytes,
    )

    async def stop_deadlines(_app: web.Application) -> None:
        await deadlines.close()

    app.on_cleanup.append(stop_deadlines)
    app[HTTP_METRICS] = http_metrics
    app[SETTINGS] = settings
    app[REGISTRY] = registry or Registry.load(settings.task_modules)
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_engines_ctx)
    # Before the io worker, so that it stops (told at shutdown) while the io worker does.
    app.cleanup_ctx.append(_heavy_ctx)
    app.cleanup_ctx.append(_scheduler_ctx)
    app.cleanup_ctx.append(_webhooks_ctx)
    app.on_shutdown.append(_stop_heavy)
    if settings.gateway.embedded_io_worker:
        app.cleanup_ctx.append(_io_worker_ctx)
    app.router.add_post("/v1/jobs", submit_job)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_post("/v1/jobs/batch", submit_batch)
    app.router.add_get("/v1/jobs/{id}", get_job)
    # No HEAD: a stream has no end to answer a HEAD with, and would write its events into
    # a response that must not have a body.
    app.router.add_get("/v1/jobs/{id}/events", job_events, allow_head=False)
    app.router.add_get("/v1/events", all_events, allow_head=False)
    app.router.add_delete("/v1/jobs/{id}", cancel_job)
    app.router.add_get("/v1/tasks", list_tasks)
    app.router.add_get("/v1/queues", list_queues)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    Dashboard().add_routes(app.router)
    return app


# --- resources ---------------------------------------------------------------------------


def _auth(settings: Settings) -> list[Any]:
    """The token check, inside the error middleware (its 401 and 403 are JSON), when the
    deployment has tokens."""
    gateway = settings.gateway
    return [token_auth(gateway)] if gateway.api_tokens or gateway.read_tokens else []


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = connect(settings.redis)
    app[REDIS] = redis
    app[STORE] = JobStore.for_submits(redis, settings)
    app[HUB] = EventHub(redis)
    await app[HUB].start()
    yield
    await app[HUB].close()
    await redis.aclose()


async def _engines_ctx(app: web.Application) -> AsyncIterator[None]:
    engines = build_engines(app[REDIS], app[SETTINGS])
    registry: Registry = app[REGISTRY]
    for spec in over_ceiling(registry, app[SETTINGS]):
        log.warning(
            "task %s declares timeout_s %g, above the %d s a cpu/gpu job may run here: its "
            "jobs that set no lower timeout_s are refused until COREFLEET_VISIBILITY_TIMEOUT_S "
            "is raised on every process",
            spec.name,
            spec.timeout_s,
            time_limit_ceiling(app[SETTINGS]),
        )
    for engine in engines.values():
        await engine.start()
    app[ENGINES] = engines
    app[SUBMITTER] = Submitter(
        app[STORE], app[REGISTRY], engines, webhook_hosts=app[SETTINGS].webhooks.hosts
    )
    yield
    for engine in engines.values():
        await engine.close()


async def _io_worker_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    name = consumer_name()
    # The runners' own client waits for Redis however long it is away: a job that ran
    # and could not store its outcome would otherwise run again once its lease ended.
    runner_redis = connect(settings.redis, until_answered=True)
    runner = JobRunner(JobStore(runner_redis, settings.job_ttl_s), app[REGISTRY], worker_id=name)
    worker = io_worker(app[REDIS], runner, settings.io, name=name)
    app[IO_WORKER] = worker
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, grace_s=5.0))
    yield
    stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await runner_redis.aclose()


async def _heavy_ctx(app: web.Application) -> AsyncIterator[None]:
    # The gateway is the Dask client and dispatches Dask jobs itself. Ray jobs are
    # dispatched inside Ray by a detached actor (so a gateway restart leaves them running);
    # the gateway starts Ray and that actor once a Ray job waits, and keeps it serving.
    engines: dict[str, Engine] = app[ENGINES]
    dask, ray = engines["dask"], engines["ray"]
    assert isinstance(dask, DaskEngine) and isinstance(ray, RayEngine)
    dispatcher = HeavyDispatcher(
        app[REDIS], app[STORE], app[REGISTRY], {"dask": dask}, app[SETTINGS]
    )
    app[HEAVY] = dispatcher
    ray.queues = queues_of(app[REGISTRY], "ray")
    await dispatcher.prepare()
    for queue in ray.queues:  # so that /v1/queues counts Ray jobs before Ray starts
        await ensure_group(app[REDIS], queue)
    dispatching = asyncio.create_task(dispatcher.run(dispatcher.stop, grace_s=5.0))
    keeping = asyncio.create_task(ray.keep_dispatching(dispatcher.stop))
    yield
    dispatcher.stop.set()
    # The keeper's watch holds no job, and its look at the Ray streams blocks for up to a
    # second: it is cut short (the Ray engine's close stops what it started).
    keeping.cancel()
    await asyncio.gather(dispatching, keeping, return_exceptions=True)


async def _scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
    # Every gateway queues delayed jobs as they come due (release is once per job).
    engines: dict[str, Engine] = app[ENGINES]
    stop = asyncio.Event()
    task = asyncio.create_task(Scheduler(app[STORE], engines).run(stop))
    yield
    stop.set()
    await task


async def _webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    # Every gateway with webhooks on posts the deliveries owed (each is taken by one).
    if not app[SETTINGS].webhooks.hosts:
        yield  # webhooks are off here: deliveries owed wait for a gateway that posts them
        return
    stop = asyncio.Event()
    sender = WebhookSender(app[REDIS], app[STORE], app[SETTINGS].webhooks)
    await sender.prepare()
    task = asyncio.create_task(sender.run(stop))
    yield
    stop.set()
    await task


async def _stop_heavy(app: web.Application) -> None:
    if HEAVY in app:
        app[HEAVY].stop.set()


# --- helpers -----------------------------------------------------------------------------


class _NotJSON(ValueError):
    """A number JSON has no place for, which Python's parser would take."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: JSON allows the digits, no float holds them
        raise _NotJSON(f"{text} is too large for a number")
    return value


def _no_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON value")


async def _json_body(request: web.Request) -> Any:
    """The body as JSON; strictly: no NaN or infinite numbers, which Python would parse and
    no client could read back in a record."""
    raw = await request.read()  # aiohttp enforces client_max_size here (413)
    try:
        value = json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidJSON("the body is not valid JSON: it nests too deep") from None
    except ValueError as exc:  # a syntax error, bad UTF-8, a number past Python's limits
        raise InvalidJSON(f"the body is not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(raw) and _holds_lone_surrogate(value):
        # JSON lets "\ud800" through, but it is no Unicode character: Redis could not be
        # sent it (UTF-8 has no encoding for it), nor could a client read it back.
        raise InvalidJSON("the body is not valid JSON: a \\u escape is a lone surrogate")
    return value


#: A JSON escape of a UTF-16 surrogate; a body without one cannot hold a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _holds_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


def _job_id(request: web.Request) -> str:
    job_id = request.match_info["id"]
    if request.path == "/v1/jobs/batch":  # a route of its own, for POST only
        raise MethodNotAllowed(
            f"{request.method} is not allowed on {request.path}", {"allowed": ["POST"]}
        )
    if not ids.is_valid(job_id):
        raise InvalidJobId(f"{job_id!r} is not a job id (26 characters of Crockford base32)")
    return job_id


def _job_json(job: Job, status: int = 200) -> web.Response:
    return web.json_response(job.to_api(), status=status)


#: The header that makes a submit safe to send again, and the one that marks the answer to
#: a submit sent again.
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
_IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not _IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise InvalidParameter(
            f"{IDEMPOTENCY_HEADER} must be 1 to 255 visible ASCII characters",
            {"header": IDEMPOTENCY_HEADER},
        )
    return key


#: The most jobs one page of ``GET /v1/jobs`` holds.
MAX_PAGE = 500
_LIST_FILTERS = ("state", "task", "engine", "queue")
_LIST_PARAMETERS = (*_LIST_FILTERS, "limit", "cursor")
_STATES = tuple(state.value for state in JobState)


def _job_query(request: web.Request) -> JobQuery:
    query = request.query
    unknown = sorted(set(query) - set(_LIST_PARAMETERS))
    if unknown:
        raise InvalidParameter(
            f"unknown parameter(s): {', '.join(unknown)}", {"allowed": list(_LIST_PARAMETERS)}
        )
    filters: dict[str, str] = {}
    for name in _LIST_FILTERS:
        value = query.get(name)
        if value is not None and not 1 <= len(value) <= 200:
            raise InvalidParameter(f"{name} must be 1 to 200 characters", {"parameter": name})
        if value is not None:
            filters[name] = value
    state = filters.get("state")
    if state is not None and state not in _STATES:
        raise InvalidParameter(f"state must be one of {', '.join(_STATES)}", {"parameter": "state"})
    raw_limit = query.get("limit", "50")
    if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 3) or not (
        1 <= int(raw_limit) <= MAX_PAGE
    ):
        raise InvalidParameter(
            f"limit must be a whole number from 1 to {MAX_PAGE}", {"parameter": "limit"}
        )
    cursor = query.get("cursor")
    if cursor is not None and not ids.is_valid(cursor):
        raise InvalidParameter(
            "cursor must be the next_cursor of an earlier page", {"parameter": "cursor"}
        )
    return JobQuery(limit=int(raw_limit), cursor=cursor, **filters)


_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")


def _wait_seconds(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    limit = request.app[SETTINGS].gateway.max_wait_s
    # Plain decimal digits only: float() also takes "1_0", full-width digits and spaces.
    value = float(raw) if _SECONDS.fullmatch(raw) else -1.0
    if not 0 <= value <= limit:
        raise InvalidParameter(
            f"wait must be a number of seconds from 0 to {limit:g}",
            {"parameter": "wait", "value": raw, "max": limit},
        )
    return value


# --- routes ------------------------------------------------------------------------------


async def submit_job(request: web.Request) -> web.Response:
    """Submit one job; 202 once it is stored.

    With ``?wait=S`` the request is held until the job is terminal (200 with the finished
    record) or S pass (202 with the record as it is then): submit and result in one trip.

    With an ``Idempotency-Key`` header, the same request sent again (say, after a lost
    answer) stores nothing and is answered with the job the key already stands for, marked
    ``Idempotent-Replayed: true``; the key with a different request is a 409.
    """
    wait = _wait_seconds(request)
    key = _idempotency_key(request)
    submitter = request.app[SUBMITTER]
    job = submitter.prepare(await _json_body(request))
    if wait > 0:
        with request.app[HUB].watch(job.id) as changed:  # watch before it can finish
            earlier = await submitter.enqueue([job], key)
            if earlier is None:
                job = await _wait_watched(request.app, job.id, changed, wait, known=job) or job
    else:
        earlier = await submitter.enqueue([job], key)
    if earlier is not None:
        job = earlier
        if wait > 0 and not job.state.terminal:
            job = await _wait_terminal(request.app, job.id, wait) or job
    response = _job_json(job, status=200 if job.state.terminal else 202)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if earlier is not None:
        response.headers[REPLAYED_HEADER] = "true"
    return response


async def submit_batch(request: web.Request) -> web.Response:
    """Submit many jobs in one request; all are accepted or none is."""
    if IDEMPOTENCY_HEADER in request.headers:
        raise InvalidParameter(
            f"{IDEMPOTENCY_HEADER} is taken by POST /v1/jobs (one job), not by a batch",
            {"header": IDEMPOTENCY_HEADER},
        )
    body = await _json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("jobs"), list):
        raise InvalidBody('the body must be {"jobs": [job, ...]}')
    if set(body) != {"jobs"}:  # options for the whole batch, say: refused, not dropped
        unknown = sorted(set(body) - {"jobs"})
        raise InvalidBody(f"unknown field(s): {', '.join(unknown)}", {"allowed": ["jobs"]})
    jobs = body["jobs"]
    if not 1 <= len(jobs) <= MAX_BATCH:
        raise InvalidBody(f"a batch holds 1 to {MAX_BATCH} jobs, not {len(jobs)}")
    accepted = await request.app[SUBMITTER].submit_many(jobs)
    return web.json_response({"jobs": [job.to_api() for job in accepted]}, status=202)


async def list_jobs(request: web.Request) -> web.Response:
    """Jobs, newest first, a page at a time; only those with the given state, task, engine
    and queue. ``next_cursor`` continues the listing (null at its end); a page may hold
    fewer jobs than ``limit`` before the end when the filters match few jobs."""
    jobs, next_cursor = await request.app[STORE].list_jobs(_job_query(request))
    return web.json_response({"jobs": [job.to_api() for job in jobs], "next_cursor": next_cursor})


async def get_job(request: web.Request) -> web.Response:
    """A job's record; with ``?wait=S``, held until the job is terminal or S pass."""
    job_id = _job_id(request)
    wait = _wait_seconds(request)
    store = request.app[STORE]
    if wait <= 0:
        job = await store.get(job_id)
    else:
        job = await _wait_terminal(request.app, job_id, wait)
    if job is None:
        raise JobNotFound(f"no job has id {job_id}", {"id": job_id})
    return _job_json(job)


async def _wait_terminal(app: web.Application, job_id: str, wait: float) -> Job | None:
    with app[HUB].watch(job_id) as changed:  # watch first, then read: no change is missed
        return await _wait_watched(app, job_id, changed, wait)


async def _wait_watched(
    app: web.Application,
    job_id: str,
    changed: Watch,
    wait: float,
    known: Job | None = None,
) -> Job | None:
    """The job once terminal or after ``wait`` seconds; ``changed`` is its watch.

    ``known``: the record as the caller already has it (saves the first read).
    """
    deadline = time.monotonic() + wait
    job, stale = known, False
    while True:
        if job is None or changed.is_set():
            changed.clear()
            # Only the end matters while waiting: a change to running is read only if the
            # wait ends first.
            if changed.record is not None:  # the terminal event carried the record
                job, stale = Job.from_hash(changed.record), False
            elif job is None or changed.state is None or JobState(changed.state).terminal:
                job, stale = await app[STORE].get(job_id), False
            else:
                stale = True
        remaining = deadline - time.monotonic()
        if job is None or job.state.terminal:
            return job
        if remaining <= 0:
            return await app[STORE].get(job_id) if stale else job
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), remaining)


#: Seconds between keep-alive comments on an idle event stream.
SSE_KEEPALIVE_S = 15.0


def _sse(event: str, payload: Any) -> bytes:
    """One Server-Sent Event carrying ``payload`` as JSON."""
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()


async def _open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    request[OPEN_STREAM] = response  # an error from now on ends it (see middleware)
    return response


async def job_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the record at each change of state or attempt (``state``) and
    each progress report while it runs (``progress``), ending when the job is terminal.
    Changes closer together than the stream reads the record arrive as one, the newest."""
    job_id = _job_id(request)
    store = request.app[STORE]
    with request.app[HUB].watch(job_id) as changed:  # watch first: no change is missed
        job = await store.get(job_id)
        if job is None:
            raise JobNotFound(f"no job has id {job_id}", {"id": job_id})
        response = await _open_stream(request)
        with contextlib.suppress(ConnectionResetError):  # the client left: nothing to say
            await _stream_job(response, job, changed, store)
        return response


async def _stream_job(
    response: web.StreamResponse, job: Job | None, changed: Watch, store: JobStore
) -> None:
    # A new attempt is news even in the same state (running again after a lost worker).
    sent: tuple[JobState, int] | None = None
    sent_progress: dict[str, Any] | None = None
    while job is not None:
        changed.clear()
        if (job.state, job.attempts) != sent:
            await response.write(_sse("state", job.to_api()))
            sent, sent_progress = (job.state, job.attempts), job.progress
        elif job.progress is not None and job.progress != sent_progress:
            await response.write(_sse("progress", {"id": job.id, **job.progress}))
            sent_progress = job.progress
        if job.state.terminal:
            break
        try:
            await asyncio.wait_for(changed.wait(), SSE_KEEPALIVE_S)
        except TimeoutError:
            await response.write(b": keep-alive\n\n")
        job = await store.get(job.id)
    await response.write_eof()


#: How long ``GET /v1/events`` waits for its subscription to new jobs to be made.
FEED_READY_S = 5.0


async def all_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events for every job, from the moment the stream opens: ``job`` with
    ``{"id", "state", "from", "progress"}`` at each new job, state change and progress
    report; ``resync`` when changes may have been missed (re-read what you show). Open
    this before reading the jobs, and no change falls between the two."""
    async with request.app[HUB].feed() as feed:
        try:
            await asyncio.wait_for(feed.ready.wait(), FEED_READY_S)
        except TimeoutError:
            raise StoreUnavailable("cannot subscribe to job events now; try again") from None
        response = await _open_stream(request)
        with contextlib.suppress(ConnectionResetError):  # the client left: nothing to say
            await _stream_feed(response, feed)
        return response


async def _stream_feed(response: web.StreamResponse, feed: Feed) -> None:
    while True:
        try:
            await asyncio.wait_for(feed.wake.wait(), SSE_KEEPALIVE_S)
        except TimeoutError:
            await response.write(b": keep-alive\n\n")
            continue
        feed.wake.clear()
        if feed.missed:
            feed.missed = False
            await response.write(_sse("resync", {}))
        news = [_sse("job", feed.pending.popleft()) for _ in range(len(feed.pending))]
        if news:
            await response.write(b"".join(news))


async def cancel_job(request: web.Request) -> web.Response:
    """Cancel a job: a queued one never starts, a running one is interrupted."""
    job_id = _job_id(request)
    store = request.app[STORE]
    moved, previous = await store.cancel(job_id)
    if previous is None:
        raise JobNotFound(f"no job has id {job_id}", {"id": job_id})
    job = await store.get(job_id)
    if job is None:
        raise JobNotFound(f"no job has id {job_id}", {"id": job_id})
    if not moved and previous is not JobState.CANCELLED:
        raise JobFinished(
            f"job {job_id} already {previous.value}; it cannot be cancelled",
            {"state": previous.value},
        )
    if moved and previous is JobState.RUNNING:
        engine = request.app[ENGINES].get(job.engine)
        if engine is not None:
            await engine.cancel(job)
    return _job_json(job)


async def list_tasks(request: web.Request) -> web.Response:
    """Every registered task with its kind, engine, queue and parameters."""
    return web.json_response({"tasks": [spec.describe() for spec in request.app[REGISTRY]]})


async def list_queues(request: web.Request) -> web.Response:
    """Each engine's state, and depth, running jobs and workers per queue; and how many
    jobs wait for their time (``delay_s``, or the backoff before a retry)."""
    return web.json_response(await _queues(request.app))


async def _queues(app: web.Application) -> dict[str, Any]:
    """Each engine's state and queues, and the delayed jobs: what /v1/queues shows and
    /metrics turns into gauges."""
    # Once per look, not per engine: what workers killed outright said goes first.
    await presence.forget_the_silent(app[REDIS])
    engines = {name: await engine.status() for name, engine in app[ENGINES].items()}
    return {"engines": engines, "delayed": await app[STORE].delayed()}


async def metrics(request: web.Request) -> web.Response:
    """Job counters, queue gauges and HTTP metrics in Prometheus' text format; while Redis
    does not answer, ``corefleet_redis_up 0`` and the HTTP metrics only."""
    stored: list[str] | None
    try:
        # Two thirds of the request's deadline (4 s): a slow Redis still gets its many
        # round trips, and a hung one leaves time to answer without it.
        async with asyncio.timeout(middleware.STORE_DEADLINE_S * 2 / 3):
            stored = await stored_families(request.app[REDIS], await _queues(request.app))
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("metrics without Redis's part: %s", str(exc) or type(exc).__name__)
        stored = None
    text = exposition(stored, request.app[HTTP_METRICS])
    return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    """The process is up (liveness)."""
    return web.json_response({"status": "ok"})


#: How long /readyz waits for each of its checks.
READY_CHECK_S = 2.0


async def readyz(request: web.Request) -> web.Response:
    """Ready while Redis answers: without it nothing is stored or read. Each engine's state
    is reported beside it but does not count: a Ray or Dask that does not answer refuses its
    own jobs, and the gateway must stay in service for everything else (every gateway sees
    the same cluster, so counting it would take them all out together). Each is asked at
    once and given ``READY_CHECK_S``: the answer comes well within the request deadline."""

    async def check(name: str, probe: Awaitable[Any]) -> tuple[str, str]:
        try:
            answer = await asyncio.wait_for(probe, READY_CHECK_S)
        except Exception as exc:
            return name, f"unreachable: {type(exc).__name__}"
        unreachable = isinstance(answer, dict) and answer.get("state") == "unreachable"
        return name, "unreachable" if unreachable else "ok"

    probes: dict[str, Awaitable[Any]] = {"redis": _ping(request.app[REDIS])}
    probes |= {name: engine.status() for name, engine in request.app[ENGINES].items()}
    checks = dict(await asyncio.gather(*(check(name, p) for name, p in probes.items())))
    ready = checks["redis"] == "ok"
    return web.json_response(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )


async def _ping(redis: aioredis.Redis) -> None:
    await redis.ping()  # type: ignore[misc]  # redis-py's sync/async union return type


async def openapi(request: web.Request) -> web.Response:
    """This API's OpenAPI 3.1 document."""
    return web.json_response(openapi_document())
