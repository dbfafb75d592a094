"""The ops dashboard: one static page served by the gateway, built on the public API.

The page lists jobs (``GET /v1/jobs``), engines and queues (``GET /v1/queues``) and the
registry (``GET /v1/tasks``); ``GET /v1/events`` pushes every new job, state change and
progress report to it, so it never polls. It submits and cancels through the same API as
any client. The files are read once, when the gateway starts; the page's script renders
every value as text, never as markup.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from service.errors import NotFound

STATIC = Path(__file__).with_name("static")
#: What the page may load: its own script and style, and calls to its own origin.
_POLICY = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
_TYPES = {
    "dashboard.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


class Dashboard:
    def __init__(self) -> None:
        self.files = {name: (STATIC / name).read_bytes() for name in _TYPES}

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/dashboard", self.page)
        router.add_get("/dashboard/{asset}", self.asset)

    async def page(self, request: web.Request) -> web.Response:
        """The dashboard."""
        return self._file("dashboard.html")

    async def asset(self, request: web.Request) -> web.Response:
        """The page's script or style."""
        name = request.match_info["asset"]
        if name == "dashboard.html" or name not in self.files:
            raise NotFound(f"the dashboard has no file {name!r}", {"asset": name})
        return self._file(name)

    def _file(self, name: str) -> web.Response:
        return web.Response(
            body=self.files[name],
            headers={
                "Content-Type": _TYPES[name],
                "Content-Security-Policy": _POLICY,
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )
