"""Built-in io tasks: they wait on timers and sockets, so they run on asyncio workers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tasks import task

_HEADERS = ("content-type", "content-length", "server", "etag", "last-modified")


@task("io.sleep", kind="io")
async def sleep(seconds: float) -> float:
    """Wait ``seconds`` and return them."""
    if seconds < 0:
        raise ValueError("seconds must not be negative")
    await asyncio.sleep(seconds)
    return seconds


@task("io.echo", kind="io")
async def echo(value: Any) -> Any:
    """Return ``value`` as given."""
    return value


@task("io.http_get", kind="io")
async def http_get(url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """GET ``url``; return the status, selected headers, body length and elapsed seconds."""
    import aiohttp

    if not url.startswith(("http://", "https://")):
        raise ValueError("url must start with http:// or https://")
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
        length = 0
        async for chunk in resp.content.iter_chunked(65536):
            length += len(chunk)
        headers = {h: resp.headers[h] for h in _HEADERS if h in resp.headers}
        return {
            "status": resp.status,
            "headers": headers,
            "body_length": length,
            "elapsed_s": round(time.perf_counter() - started, 6),
        }
