"""API tokens: who may use the gateway.

With ``COREFLEET_API_TOKENS`` (or ``COREFLEET_READ_TOKENS``) set, every request but the
open ones below needs ``Authorization: Bearer <token>``. An API token may do anything; a
read token may only read (GET and HEAD): a dashboard for ops, a metrics scraper. Without
tokens the gateway is open to whoever can reach it, as a local ``corefleet up`` is.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
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


def _digest(token: str) -> bytes:
    # Any bytes a client sends (aiohttp hands undecodable ones over as surrogates).
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _matches(sent: bytes, digests: Iterable[bytes]) -> bool:
    # Digests of equal length, compared in constant time against every token: the
    # timing tells neither a token's length nor which one matched.
    found = False
    for digest in digests:
        found |= hmac.compare_digest(sent, digest)
    return found


def token_auth(settings: GatewaySettings) -> Any:
    """The middleware; with no tokens configured it lets everything through."""
    full = [_digest(token) for token in settings.api_tokens]
    reading = [_digest(token) for token in settings.read_tokens]

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or request.path.startswith(_OPEN_PREFIX):
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("this gateway needs an API token: Authorization: Bearer <token>")
        sent = _digest(token)
        may_write, may_read = _matches(sent, full), _matches(sent, reading)
        if may_write:
            return await handler(request)
        if not may_read:
            raise Unauthorized("the API token is not valid here")
        if request.method not in _READ_METHODS:
            raise Forbidden(f"this token may only read; {request.method} needs an API token")
        return await handler(request)

    return check
