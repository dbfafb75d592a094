"""Turn every error into the JSON shape the API promises; never a traceback to a client."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import (
    CorefleetError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
)

log = logging.getLogger("corefleet.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: CorefleetError) -> web.Response:
    return web.json_response(error.to_json(), status=error.status, headers=error.headers())


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
        return await handler(request)
    except CorefleetError as exc:
        return error_response(exc)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        # Only after the client's own retries (a restart is ridden out): Redis is away.
        log.warning("%s %s: Redis does not answer (%s)", request.method, request.path, exc)
        return error_response(
            StoreUnavailable(
                "the job store (Redis) does not answer; try again shortly",
                {"retry_after_s": StoreUnavailable.retry_after_s},
            )
        )
    except web.HTTPRequestEntityTooLarge:
        limit = max_body_bytes
        return error_response(
            PayloadTooLarge(
                f"the body is larger than the {limit} bytes this gateway accepts",
                {"max_bytes": limit},
            )
        )
    except web.HTTPMethodNotAllowed as exc:
        return error_response(
            MethodNotAllowed(
                f"{request.method} is not allowed on {request.path}",
                {"allowed": sorted(exc.allowed_methods)},
            )
        )
    except web.HTTPNotFound:
        return error_response(NotFound(f"no route matches {request.path}"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = {"code": exc.reason.lower().replace(" ", "_"), "message": exc.reason, "detail": {}}
        return web.json_response({"error": body}, status=exc.status)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(CorefleetError("internal error; the gateway log has the details"))
