"""The scheduler: puts delayed jobs on their queues when their time comes.

A job submitted with ``delay_s`` and a job waiting out the backoff before a retry sit in
one sorted set in Redis (``keys.DELAYED``), scored by when each is due: durable, and the
same for every engine. Every gateway runs a scheduler. The release script queues each job
once however many run side by side, and only if it still waits (a cancelled job leaves
the set and nothing more). The queue entry is made as the job is released, by the job's
engine, as a submit makes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

from redis.exceptions import RedisError

from service.engines.base import Engine
from service.errors import CorefleetError
from service.jobs import JobState
from service.store import JobStore

log = logging.getLogger("corefleet.scheduler")

#: Jobs released per Redis read.
BATCH = 200
#: The longest a scheduler waits before it looks again: a job delayed through another
#: gateway (or a producer) is queued at most this late.
MAX_WAIT_S = 0.5
#: How long a due job this gateway could not queue (its engine unreachable or not enabled
#: here) is left before this gateway tries again.
HOLD_S = 30.0


class Scheduler:
    def __init__(self, store: JobStore, engines: Mapping[str, Engine]) -> None:
        self.store = store
        self.engines = engines
        self._held: dict[str, float] = {}  # due jobs it could not queue: until when left

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                wait = await self.release_due()
            except (RedisError, OSError) as exc:  # Redis away: look again later
                log.warning("cannot release delayed jobs now (%s)", exc)
                wait = MAX_WAIT_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def release_due(self) -> float:
        """Queue every job that is due; the seconds to wait before looking again."""
        now = time.monotonic()
        self._held = {job_id: until for job_id, until in self._held.items() if until > now}
        while True:
            ready, next_in = await self.store.due(BATCH + len(self._held))
            fresh = [(job_id, due) for job_id, due in ready if job_id not in self._held]
            for job_id, due in fresh:
                try:
                    await self._release(job_id, due)
                except (RedisError, OSError):
                    raise  # Redis away: the loop waits and looks again
                except Exception:
                    # One job this gateway cannot handle (a record it cannot read) must
                    # not stop every other job from being queued.
                    log.exception("cannot release job %s; leaving it for now", job_id)
                    self._held[job_id] = time.monotonic() + HOLD_S
            if len(fresh) < BATCH:
                break
        return MAX_WAIT_S if next_in is None else min(MAX_WAIT_S, next_in)

    async def _release(self, job_id: str, due_ms: int) -> None:
        job = await self.store.get(job_id)
        if job is None or job.state not in (JobState.QUEUED, JobState.RETRYING):
            await self.store.release(job_id, due_ms, None)  # gone, cancelled or begun
            return
        engine = self.engines.get(job.engine)
        try:
            if engine is None:
                raise CorefleetError(f"the {job.engine} engine is not enabled on this gateway")
            where = engine.dispatch(job)
        except CorefleetError as exc:
            # Another gateway may queue it; this one tries again in a while.
            self._held[job_id] = time.monotonic() + HOLD_S
            log.warning("job %s is due but cannot be queued here now: %s", job_id, exc)
            return
        await self.store.release(job_id, due_ms, where)
