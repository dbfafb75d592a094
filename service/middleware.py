"""Turn every error into the JSON shape the API promises; never a traceback to a client.
And answer every request in bounded time, whatever Redis does."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import (
    CorefleetError,
    InvalidParameter,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    StoreUnavailable,
)
from service.settings import MAX_WAIT_LIMIT_S

log = logging.getLogger("corefleet.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: How long a request may take beyond the wait it asked for (``?wait=``) before it is
#: answered 503. A Redis that refuses connections is given up on by the client's own
#: retries first (about 5 s); this bounds a Redis that takes the connection and never
#: answers (a stopped process, a host cut off without a reset), which would otherwise hold
#: the request for ever.
STORE_DEADLINE_S = 6.0
#: How long a request's body may take to arrive. It is read before the store deadline
#: starts: a slow upload is the client's time, not a sign that Redis is away.
BODY_READ_S = 60.0
#: The request key under which an event stream's response is kept once its headers are
#: sent: an error after that cannot be answered with a JSON error any more.
OPEN_STREAM = web.RequestKey("open_stream", web.StreamResponse)


#: The routes that take ``?wait=``; on any other, a ``wait`` does not stretch the deadline.
WAIT_ROUTES = frozenset({("POST", "/v1/jobs"), ("GET", "/v1/jobs/{id}")})


def _deadline_s(request: web.Request) -> float | None:
    """How long ``request`` may take: None for event streams, which stay open by design."""
    if request.path.endswith("/events"):
        return None
    resource = request.match_info.route.resource
    route = (request.method, resource.canonical if resource is not None else "")
    if route not in WAIT_ROUTES:
        return STORE_DEADLINE_S
    try:
        wait = float(request.query.get("wait", "0"))
    except ValueError:
        wait = 0.0  # the handler refuses it with a 400
    if not math.isfinite(wait) or wait < 0:
        wait = 0.0
    return min(wait, MAX_WAIT_LIMIT_S) + STORE_DEADLINE_S  # a longer wait is refused anyway


def _store_unavailable() -> StoreUnavailable:
    return StoreUnavailable(
        "the job store (Redis) does not answer; try again shortly",
        {"retry_after_s": StoreUnavailable.retry_after_s},
    )


def error_response(error: CorefleetError) -> web.Response:
    return web.json_response(error.to_json(), status=error.status, headers=error.headers())


class Deadlines:
    """Ends each request that runs past its deadline (``_deadline_s``) with a 503.

    Its middleware goes inside the token check: a body is read only for a client let in.

    One ticker checks every request in flight each ``TICK_S``, rather than a timer per
    request (``asyncio.timeout``), whose arming and cancelling cost about 3% of a busy
    gateway's submits. A deadline is met within ``TICK_S``.
    """

    TICK_S = 0.25

    def __init__(self) -> None:
        self._due: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None

    async def run(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        limit = _deadline_s(request)
        task = asyncio.current_task()
        if limit is None or task is None:
            return await handler(request)
        loop = asyncio.get_running_loop()
        if self._ticker is None or self._ticker.done():
            self._ticker = loop.create_task(self._tick())
        cancelling = task.cancelling()  # another's cancel, pending already, stays theirs
        reading = request.body_exists
        try:
            if reading:
                self._due[task] = loop.time() + BODY_READ_S
                await request.read()  # kept by aiohttp for the handler
                reading = False
            self._due[task] = loop.time() + limit
            response = await handler(request)
        except asyncio.CancelledError:
            if not self._took_back(task, cancelling):
                raise
            if reading:
                raise RequestTimeout(
                    f"the body did not arrive within {BODY_READ_S:g} s",
                    {"timeout_s": BODY_READ_S},
                ) from None
            # A Redis call cut off here may have run all the same (a submit's job stored):
            # the answer says to try again, and a resend with its Idempotency-Key is safe.
            log.warning(
                "%s %s: no answer from Redis within %g s", request.method, request.path, limit
            )
            raise _store_unavailable() from None
        finally:
            self._due.pop(task, None)
        self._took_back(task, cancelling)  # a handler that swallowed the cancel
        return response

    def _took_back(self, task: asyncio.Task[Any], cancelling: int) -> bool:
        """Whether this ended ``task`` (and nobody else is cancelling it): the cancel is
        taken back, so the connection's task goes on to its next request."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() <= cancelling

    def middleware(self) -> Any:
        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await self.run(request, handler)

        return middleware

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)

    async def _tick(self) -> None:
        # Runs while requests are in flight; the next request starts it again.
        loop = asyncio.get_running_loop()
        while self._due:
            await asyncio.sleep(self.TICK_S)
            now = loop.time()
            for task, due in list(self._due.items()):
                if due <= now and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()


def json_errors(max_body_bytes: int) -> Any:
    """The middleware; ``max_body_bytes`` is quoted in 413 answers."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await _guarded(request, handler, max_body_bytes)

    return middleware


async def _guarded(
    request: web.Request, handler: Handler, max_body_bytes: int
) -> web.StreamResponse:
    try:
        _refuse_repeated_parameters(request)
        return await handler(request)
    except Exception as exc:
        stream: web.StreamResponse | None = request.get(OPEN_STREAM)
        if stream is None or not stream.prepared:
            return _error_answer(request, exc, max_body_bytes)
        # Its headers are sent: an error answer now would be written into its body. End
        # the stream instead; a client that reconnects is answered as things are then.
        if isinstance(exc, RedisConnectionError | RedisTimeoutError):
            log.warning("%s: Redis does not answer (%s); stream ended", request.path, exc)
        else:
            log.exception("unhandled error on %s; stream ended", request.path)
        return stream


def _refuse_repeated_parameters(request: web.Request) -> None:
    """A query parameter given twice is a 400: which of its values counts would be a guess."""
    query = request.query
    if len(query) != len(set(query)):
        repeated = sorted({name for name in query if len(query.getall(name)) > 1})
        raise InvalidParameter(
            f"query parameter(s) given more than once: {', '.join(repeated)}",
            {"parameters": repeated},
        )


def _error_answer(request: web.Request, exc: Exception, max_body_bytes: int) -> web.Response:
    """The JSON answer for what a handler raised (called while handling ``exc``)."""
    if isinstance(exc, CorefleetError):
        return error_response(exc)
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        # Only after the client's own retries (a restart is ridden out): Redis is away.
        log.warning("%s %s: Redis does not answer (%s)", request.method, request.path, exc)
        return error_response(_store_unavailable())
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response(
            PayloadTooLarge(
                f"the body is larger than the {max_body_bytes} bytes this gateway accepts",
                {"max_bytes": max_body_bytes},
            )
        )
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return error_response(
            MethodNotAllowed(
                f"{request.method} is not allowed on {request.path}",
                {"allowed": sorted(exc.allowed_methods)},
            )
        )
    if isinstance(exc, web.HTTPNotFound):
        return error_response(NotFound(f"no route matches {request.path}"))
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc  # a redirect, say: aiohttp answers it
        body = {"code": exc.reason.lower().replace(" ", "_"), "message": exc.reason, "detail": {}}
        return web.json_response({"error": body}, status=exc.status)
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(CorefleetError("internal error; the gateway log has the details"))
