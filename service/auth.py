"""API tokens: who may use the gateway.

With ``COREFLEET_API_TOKENS`` (or ``COREFLEET_READ_TOKENS``) set, every request but the
open ones below needs ``Authorization: Bearer <token>``. An API token may do anything; a
read token may only read (GET and HEAD): a dashboard for ops, a metrics scraper. Without
tokens the gateway is open to whoever can reach it, as a local ``corefleet up`` is.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from service.errors import Forbidden, Unauthorized
from service.settings import GatewaySettings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Paths anyone may reach: probes, the API's description, and the dashboard's static
#: files (the page holds no data; it asks for a token when the API wants one).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/dashboard"})
_OPEN_PREFIX = "/dashboard/"
_READ_METHODS = frozenset({"GET", "HEAD"})


def _matches(token: str, tokens: tuple[str, ...]) -> bool:
    # Compared in constant time, against every token: timing tells nothing.
    found = False
    for candidate in tokens:
        found |= hmac.compare_digest(token.encode(), candidate.encode())
    return found


def token_auth(settings: GatewaySettings) -> Any:
    """The middleware; with no tokens configured it lets everything through."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or request.path.startswith(_OPEN_PREFIX):
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("this gateway needs an API token: Authorization: Bearer <token>")
        if _matches(token, settings.api_tokens):
            return await handler(request)
        if not _matches(token, settings.read_tokens):
            raise Unauthorized("the API token is not valid here")
        if request.method not in _READ_METHODS:
            raise Forbidden(f"this token may only read; {request.method} needs an API token")
        return await handler(request)

    return check
