"""What a running task may know about its job: ``ctx``, passed when the task asks for it."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

#: The longest a job may be put off: ``Retry(delay_s=...)``, and ``delay_s`` on a submit.
MAX_DELAY_S = 30 * 24 * 3600
#: The longest time limit a job may ask for (``options.timeout_s``).
MAX_TIMEOUT_S = 30 * 24 * 3600
#: Longer progress messages are cut to this many characters.
MAX_PROGRESS_MESSAGE = 200


class Reported:
    """A progress report already written (a sync task's): awaiting it gives at once whether
    Redis took it, and so does ``bool()``."""

    def __init__(self, recorded: bool) -> None:
        self.recorded = recorded

    def __bool__(self) -> bool:
        return self.recorded

    def __await__(self) -> Generator[Any, None, bool]:
        return self.recorded
        yield  # a generator, so that awaiting it never suspends


def _no_reports(_fraction: float, _message: str) -> Awaitable[bool]:
    return Reported(False)


@dataclass
class TaskContext:
    job_id: str
    task: str
    #: 1 on the first attempt, 2 when the job is run again, and so on.
    attempt: int
    _cancelled: Callable[[], bool] = field(default=lambda: False, repr=False)
    _report: Callable[[float, str], Awaitable[bool]] = field(default=_no_reports, repr=False)

    def cancelled(self) -> bool:
        """Whether the job was cancelled; long loops that cannot be interrupted poll this."""
        return self._cancelled()

    def progress(self, fraction: float, message: str = "") -> Awaitable[bool]:
        """Report how far the job has got: ``fraction`` from 0 to 1, and a short message.

        The job's record shows it as ``progress`` and its event streams push it. An async
        task awaits the call (``await ctx.progress(0.5, "halfway")``); in a sync task the
        call itself waits until Redis has the report. Either way the answer is whether
        it was recorded: False once the job no longer runs here (cancelled, say). Each
        report is one Redis write: report steps, not every loop turn.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise TypeError(f"progress fraction must be a number, not {type(fraction).__name__}")
        if not math.isfinite(fraction) or not 0 <= fraction <= 1:
            raise ValueError(f"progress fraction must be between 0 and 1, not {fraction!r}")
        if not isinstance(message, str):
            raise TypeError(f"progress message must be a str, not {type(message).__name__}")
        return self._report(float(fraction), message[:MAX_PROGRESS_MESSAGE])


class Retry(Exception):
    """Raise in a task to have the job run again later, while it has attempts left:
    after ``delay_s`` seconds, or the task's backoff when that is None. Once the attempts
    are spent the job is ``dead``, with this as its error.
    """

    def __init__(self, reason: str = "", *, delay_s: float | None = None) -> None:
        if delay_s is not None and (
            isinstance(delay_s, bool)
            or not isinstance(delay_s, int | float)
            or not 0 <= delay_s <= MAX_DELAY_S  # NaN fails this too
        ):
            raise ValueError(
                f"Retry delay_s must be a number of seconds from 0 to {MAX_DELAY_S}, "
                f"not {delay_s!r}"
            )
        super().__init__(reason or "the task asked to be run again")
        self.delay_s = delay_s
