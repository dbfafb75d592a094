"""Tasks that exist only for the tests (loaded with COREFLEET_TASK_MODULES)."""

from __future__ import annotations

import asyncio
import os

import redis.asyncio as aioredis

from tasks import TaskContext, task

_clients: dict[str, aioredis.Redis] = {}


def _redis() -> aioredis.Redis:
    url = os.environ["COREFLEET_REDIS_URL"]
    loop_key = f"{url}#{id(asyncio.get_running_loop())}"
    if loop_key not in _clients:
        _clients[loop_key] = aioredis.Redis.from_url(url, decode_responses=True)
    return _clients[loop_key]


@task("test.hold", kind="io")
async def hold(seconds: float, ctx: TaskContext) -> int:
    """Record that this attempt started, wait ``seconds``, return the attempt number."""
    await _redis().rpush(f"test:started:{ctx.job_id}", ctx.attempt)
    await asyncio.sleep(seconds)
    return ctx.attempt


@task("test.boom", kind="io")
async def boom(message: str) -> None:
    """Raise a ValueError carrying ``message``."""
    raise ValueError(message)


@task("test.slow", kind="io", timeout_s=0.2)
async def slow() -> None:
    """Outlive its 0.2 s time limit."""
    await asyncio.sleep(30)


@task("test.unserialisable", kind="io")
async def unserialisable() -> object:
    """Return something JSON cannot carry."""
    return {1, 2, 3}


@task("test.typed", kind="io")
async def typed(
    n: int,
    ratio: float,
    name: str,
    flag: bool,
    items: list[int],
    table: dict[str, int],
    maybe: int | None = None,
) -> str:
    """Accept one argument of each checked type."""
    return "ok"
