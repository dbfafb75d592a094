"""The one protocol every engine implements."""

from __future__ import annotations

from typing import Any, Protocol

from redis.asyncio.client import Pipeline

from service.jobs import Job


class Engine(Protocol):
    """Carries jobs to a runner and interrupts them; never writes job records itself."""

    name: str

    async def start(self) -> None:
        """Connect (or start the local engine); called once before the first submit."""

    def submit(self, pipe: Pipeline, job: Job) -> None:
        """Queue ``job`` in the same MULTI that stores its record, so both land or neither."""

    async def cancel(self, job: Job) -> None:
        """Interrupt ``job`` if it is running; the store already records it as cancelled."""

    async def status(self) -> dict[str, Any]:
        """State, depth and workers, for ``GET /v1/queues`` and ``/readyz``."""

    async def close(self) -> None:
        """Release what ``start`` took."""
