"""The baseline for the submit benchmark: a bare aiohttp handler doing one LPUSH.

It reads the request body, pushes it unchanged onto one Redis list and answers 202 with a
small JSON body: the least an HTTP-to-Redis enqueue can do with the same libraries
(aiohttp, redis-py's asyncio client) that corefleet's gateway uses. No validation, no
record, no id.

    python bench/bare_lpush.py --port 8100 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web

REDIS = web.AppKey("redis", aioredis.Redis)
LIST_KEY = "bench:bare:jobs"


async def submit(request: web.Request) -> web.Response:
    body = await request.read()
    await request.app[REDIS].lpush(LIST_KEY, body)  # type: ignore[misc]
    return web.json_response({"queued": True}, status=202)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(redis_url: str) -> web.Application:
    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        app[REDIS] = aioredis.Redis.from_url(redis_url, decode_responses=True)
        yield
        await app[REDIS].aclose()

    app = web.Application()
    app.cleanup_ctx.append(redis_ctx)
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    web.run_app(
        create_app(args.redis_url),
        host=args.host,
        port=args.port,
        print=lambda *_: None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
