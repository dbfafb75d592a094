"""Which workers are alive: each checks in every few seconds; silence means gone.

One sorted set per queue (``keys.consumers``), scored by the last check-in time, plus one
hash of what each worker says about itself (queues, concurrency, GPUs). io workers check
in from their event loop, Celery workers from a thread of their main process.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from service import keys

#: A worker that has not checked in for this long no longer counts.
SILENCE_S = 15.0
#: How often a worker checks in.
PERIOD_S = SILENCE_S / 3


#: A worker silent this long is forgotten: its check-ins and what it said are removed.
FORGET_S = 4 * SILENCE_S


def _commands(name: str, queues: tuple[str, ...], info: dict[str, Any]) -> list[tuple[Any, ...]]:
    now = time.time()
    said = json.dumps({**info, "seen": now})
    commands: list[tuple[Any, ...]] = [("HSET", keys.WORKER_INFO, name, said)]
    if queues and isinstance(info.get("kind"), str):
        commands.append(("SADD", keys.known_queues(info["kind"]), *queues))
    for queue in queues:
        commands.append(("ZADD", keys.consumers(queue), now, name))
        commands.append(("ZREMRANGEBYSCORE", keys.consumers(queue), 0, now - FORGET_S))
    return commands


async def check_in(
    client: aioredis.Redis, name: str, queues: tuple[str, ...], info: dict[str, Any]
) -> None:
    pipe = client.pipeline(transaction=False)
    for command in _commands(name, queues, info):
        pipe.execute_command(*command)
    await pipe.execute()


def check_in_sync(
    client: redis.Redis, name: str, queues: tuple[str, ...], info: dict[str, Any]
) -> None:
    pipe = client.pipeline(transaction=False)
    for command in _commands(name, queues, info):
        pipe.execute_command(*command)  # type: ignore[no-untyped-call]  # untyped in redis-py
    pipe.execute()


def leave_sync(client: redis.Redis, name: str, queues: tuple[str, ...]) -> None:
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.zrem(keys.consumers(queue), name)
    pipe.hdel(keys.WORKER_INFO, name)
    pipe.execute()


async def leave(client: aioredis.Redis, name: str, queues: tuple[str, ...]) -> None:
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.zrem(keys.consumers(queue), name)
    pipe.hdel(keys.WORKER_INFO, name)
    await pipe.execute()


async def live(client: aioredis.Redis, queue: str) -> list[dict[str, Any]]:
    """The live workers of ``queue``, each with what it said about itself."""
    names = await client.zrangebyscore(keys.consumers(queue), time.time() - SILENCE_S, "+inf")
    if not names:
        return []
    infos = await client.hmget(keys.WORKER_INFO, names)  # type: ignore[misc]  # sync/async union
    return [{"name": n, **(json.loads(i) if i else {})} for n, i in zip(names, infos, strict=True)]


async def known_queues(client: aioredis.Redis, kind: str) -> set[str]:
    """The queues workers of ``kind`` (``io``, ``celery``) said they consume, live or not:
    a queue whose workers all crashed keeps its backlog in view (``forget_queue`` once
    it is empty and unconsumed)."""
    return set(await client.smembers(keys.known_queues(kind)))  # type: ignore[misc]  # sync/async union


async def forget_queue(client: aioredis.Redis, kind: str, queue: str) -> None:
    """Stop listing ``queue`` (nothing waits on it and nobody consumes it)."""
    await client.srem(keys.known_queues(kind), queue)  # type: ignore[misc]  # sync/async union


async def forget_the_silent(client: aioredis.Redis) -> None:
    """Remove what workers silent for ``FORGET_S`` said (one that stopped cleanly removed
    it itself; one killed outright never does). An entry without its check-in time (an
    older corefleet's) goes only once its worker is live on none of its queues."""
    now = time.time()
    said: dict[str, str] = await client.hgetall(keys.WORKER_INFO)  # type: ignore[misc]  # sync/async union
    forgotten: list[str] = []
    for name, raw in said.items():
        try:
            info = json.loads(raw)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            forgotten.append(name)
            continue
        seen = info.get("seen")
        if isinstance(seen, (int, float)):
            if now - seen > FORGET_S:
                forgotten.append(name)
            continue
        queues = [str(queue) for queue in info.get("queues", ())]
        scores = [await client.zscore(keys.consumers(queue), name) for queue in queues]
        if not any(score is not None and now - score <= FORGET_S for score in scores):
            forgotten.append(name)
    if forgotten:
        await client.hdel(keys.WORKER_INFO, *forgotten)  # type: ignore[misc]  # sync/async union
