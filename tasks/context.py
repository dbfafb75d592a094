"""What a running task may know about its job: ``ctx``, passed when the task asks for it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TaskContext:
    job_id: str
    task: str
    #: 1 on the first attempt, 2 when the job is run again, and so on.
    attempt: int
    _cancelled: Callable[[], bool] = field(default=lambda: False, repr=False)

    def cancelled(self) -> bool:
        """Whether the job was cancelled; long loops that cannot be interrupted poll this."""
        return self._cancelled()
