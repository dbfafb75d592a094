"""The one protocol every engine implements."""

from __future__ import annotations

from typing import Any, Protocol

from service.jobs import Job
from service.store import Dispatch


class Engine(Protocol):
    """Carries jobs to a runner and interrupts them; never writes job records itself."""

    name: str

    async def start(self) -> None:
        """Connect (or start the local engine); called once before the first submit."""

    def dispatch(self, job: Job) -> Dispatch:
        """Where ``job``'s queue entry goes; written with its record, both or neither.

        Raise a ``CorefleetError`` to refuse the job (nothing is written then)."""

    async def cancel(self, job: Job) -> None:
        """Interrupt ``job`` if it is running; the store already records it as cancelled."""

    async def status(self) -> dict[str, Any]:
        """State, depth and workers, for ``GET /v1/queues`` and ``/readyz``."""

    async def close(self) -> None:
        """Release what ``start`` took."""
