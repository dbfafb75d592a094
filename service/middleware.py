"""Turn every error into the JSON shape the API promises; never a traceback to a client."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from service.errors import CorefleetError, MethodNotAllowed, NotFound, PayloadTooLarge

log = logging.getLogger("corefleet.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: CorefleetError) -> web.Response:
    return web.json_response(error.to_json(), status=error.status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except CorefleetError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(PayloadTooLarge(
            f"the body is larger than the {exc.max_size} bytes this gateway accepts",
            {"max_bytes": exc.max_size}))
    except web.HTTPMethodNotAllowed as exc:
        return error_response(MethodNotAllowed(
            f"{request.method} is not allowed on {request.path}",
            {"allowed": sorted(exc.allowed_methods)}))
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
