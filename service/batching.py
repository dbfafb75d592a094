"""Group commit for Redis: the calls made during one event-loop turn go as one pipeline.

An io worker that reads 500 jobs starts 500 runners in the same turn, and each asks
Redis to begin its job; finishing jobs likewise arrive together. Sending those calls one
round trip each costs far more CPU (in redis-py) and time than sending them as one
non-transactional pipeline. Each call keeps its own atomicity (a Lua script or a single
command), and its caller still gets its own result or error.

A process that runs one job at a time (a Celery child, a Ray or Dask worker) has nothing
to group: with ``group=False`` each call goes at once, saving the extra loop turn.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

_Call = tuple[tuple[Any, ...], "asyncio.Future[Any]"]


class Batcher:
    def __init__(self, redis: aioredis.Redis, scripts: dict[str, str], group: bool = True) -> None:
        self.redis = redis
        self.group = group
        self._sources = scripts
        self._shas = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in scripts.items()}
        self._pending: list[_Call] = []
        self._flushing: set[asyncio.Task[None]] = set()

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run the Lua script ``name`` (loaded on demand) in the next pipeline."""
        return await self.command("EVALSHA", self._shas[name], len(keys), *keys, *args)

    async def command(self, *command: Any) -> Any:
        if not self.group:
            result = (await self._execute_loading([command]))[0]
            if isinstance(result, Exception):
                raise result
            return result
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._pending:
            # Flush after every callback already due this turn has had its chance to add.
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append((command, future))
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._send(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            results = await self._execute_loading([command for command, _ in batch])
        except (TypeError, ValueError) as exc:
            if len(batch) == 1:
                self._fail(batch, exc)
                return
            # One call's arguments could not be packed (nothing was sent): it alone fails,
            # not every call that happened to share its turn.
            for call in batch:
                await self._send([call])
            return
        except Exception as exc:
            self._fail(batch, exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller was cancelled; the command ran all the same
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    @staticmethod
    def _fail(batch: list[_Call], exc: Exception) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)

    async def _execute_loading(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        results = await self._execute(commands)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:  # a restarted Redis forgot the scripts: load them, resend those
            for source in self._sources.values():
                await self.redis.script_load(source)
            again = await self._execute([commands[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        # A pipeline even for one call: unlike a bare command, it reconnects and retries
        # over a pooled connection that a Redis restart closed.
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))
