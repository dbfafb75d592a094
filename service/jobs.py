"""The job: its states, the transitions between them, and its record.

A job is the same thing whatever engine runs it: one id, one record (a Redis hash, see
``store.py``), one life. Engines only carry jobs to the runner and interrupt them.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from tasks import DEFAULT_PRIORITY


class JobState(str, Enum):
    #: Stored and waiting for a worker.
    QUEUED = "queued"
    #: A worker's runner is executing the task.
    RUNNING = "running"
    #: The task returned; ``result`` holds its value.
    SUCCEEDED = "succeeded"
    #: The task raised or ran out of time; ``error`` says how.
    FAILED = "failed"
    #: Cancelled before or while running; it will never run again.
    CANCELLED = "cancelled"
    #: Failed an attempt and waits for the next one.
    RETRYING = "retrying"
    #: Gave up after its last attempt (the dead letter); ``error`` gives the reason.
    DEAD = "dead"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.DEAD})

#: How deep a job's args, kwargs or result may nest (arrays and objects). Far below
#: Python's recursion limit, which JSON encoding is bound by: a value accepted at one depth
#: must still encode inside a listing, which wraps each record in three more levels.
MAX_NESTING = 100


def nests_too_deep(value: Any) -> bool:
    """Whether ``value`` holds arrays and objects more than ``MAX_NESTING`` deep (counted
    without recursion, so that any depth can be measured)."""
    stack = [(value, 1)] if isinstance(value, dict | list | tuple) else []
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > MAX_NESTING:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list | tuple))
    return False


#: For each target state, the states a job may move to it from. Everything else is refused
#: (atomically, in Redis): a terminal job never changes again, a cancelled job never starts.
#: ``running -> running`` is a redelivery after the worker holding the job was lost.
ALLOWED_FROM: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset(),
    JobState.RUNNING: frozenset({JobState.QUEUED, JobState.RETRYING, JobState.RUNNING}),
    JobState.SUCCEEDED: frozenset({JobState.RUNNING}),
    # queued (or retrying) -> failed: the engine could not start the runner at all (say,
    # the cluster's workers cannot import the task's module), so no attempt began.
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.RUNNING, JobState.RETRYING}),
    JobState.RETRYING: frozenset({JobState.RUNNING}),
    JobState.DEAD: frozenset({JobState.RUNNING, JobState.RETRYING}),
    JobState.CANCELLED: frozenset({JobState.QUEUED, JobState.RUNNING, JobState.RETRYING}),
}


def can_move(src: JobState, dst: JobState) -> bool:
    return src in ALLOWED_FROM[dst]


def now_iso() -> str:
    """The current UTC time as the API writes it: ISO 8601, milliseconds, ``Z``."""
    return iso(datetime.now(UTC))


def iso(moment: datetime) -> str:
    """``moment`` (aware) as the API writes times."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class JobError:
    type: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message}


# Fields stored as JSON text in the hash; the rest are plain strings or integers.
_JSON_FIELDS = ("args", "kwargs", "options", "result", "error", "progress")


@dataclass
class Job:
    id: str
    task: str
    kind: str
    engine: str
    queue: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    state: JobState = JobState.QUEUED
    attempts: int = 0
    max_attempts: int = 1
    timeout_s: float | None = None
    result: Any = None
    error: dict[str, str] | None = None
    created_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    #: When a delayed job (option ``delay_s``) or a job waiting to be retried is due: it
    #: is put on its queue then. None for a job queued at once.
    run_at: str | None = None
    #: What the running attempt last reported through ``ctx.progress``: ``{"fraction",
    #: "message"}``, or None. A new attempt starts without it.
    progress: dict[str, Any] | None = None
    #: The running attempt's own id (set by ``begin``); progress reports carry it, so an
    #: attempt that was replaced cannot write over its successor's.
    attempt_id: str = ""
    #: The stream entry that delivered the job to a cluster dispatcher (not stored).
    entry: str = ""
    #: What makes two submits the same request (``Idempotency-Key``): the task and what
    #: it was called with, as sent, before the task's declared defaults (not stored).
    fingerprint: str = ""

    @property
    def priority(self) -> str:
        """The job's priority level (option ``priority``)."""
        return str(self.options.get("priority", DEFAULT_PRIORITY))

    def to_hash(self) -> dict[str, str]:
        """The fields written to Redis when the job is created."""
        out = {
            "id": self.id,
            "task": self.task,
            "kind": self.kind,
            "engine": self.engine,
            "queue": self.queue,
            "args": json.dumps(self.args),
            "kwargs": json.dumps(self.kwargs),
            "options": json.dumps(self.options),
            "state": self.state.value,
            "attempts": str(self.attempts),
            "max_attempts": str(self.max_attempts),
            "created_at": self.created_at,
        }
        if self.timeout_s is not None:
            out["timeout_s"] = repr(self.timeout_s)
        if self.run_at is not None:
            out["run_at"] = self.run_at
        if "webhook" in self.options:
            # Its own field, so that the scripts that end a job see a webhook is owed.
            out["webhook"] = str(self.options["webhook"])
        return out

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> Job:
        data: dict[str, Any] = dict(raw)
        for name in _JSON_FIELDS:
            if name in data:
                data[name] = json.loads(data[name])
        timeout = data.get("timeout_s")
        return cls(
            id=data["id"],
            task=data["task"],
            kind=data["kind"],
            engine=data["engine"],
            queue=data["queue"],
            args=data.get("args", []),
            kwargs=data.get("kwargs", {}),
            options=data.get("options", {}),
            state=JobState(data["state"]),
            attempts=int(data.get("attempts", 0)),
            max_attempts=int(data.get("max_attempts", 1)),
            timeout_s=float(timeout) if timeout else None,
            result=data.get("result"),
            error=data.get("error"),
            created_at=data.get("created_at", ""),
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
            run_at=data.get("run_at"),
            progress=data.get("progress"),
            attempt_id=data.get("attempt_id", ""),
        )

    @classmethod
    def from_api(cls, payload: dict[str, Any]) -> Job:
        """A record as the HTTP API showed it (the clients' view of a job)."""
        return cls(
            id=payload["id"],
            task=payload["task"],
            kind=payload["kind"],
            engine=payload["engine"],
            queue=payload["queue"],
            args=payload.get("args", []),
            kwargs=payload.get("kwargs", {}),
            options=payload.get("options", {}),
            state=JobState(payload["state"]),
            attempts=payload.get("attempts", 0),
            max_attempts=payload.get("max_attempts", 1),
            timeout_s=payload.get("timeout_s"),
            result=payload.get("result"),
            error=payload.get("error"),
            created_at=payload.get("created_at", ""),
            started_at=payload.get("started_at"),
            finished_at=payload.get("finished_at"),
            run_at=payload.get("run_at"),
            progress=payload.get("progress"),
        )

    def to_api(self) -> dict[str, Any]:
        """The record as the HTTP API shows it, with links."""
        return {
            "id": self.id,
            "task": self.task,
            "kind": self.kind,
            "engine": self.engine,
            "queue": self.queue,
            "args": self.args,
            "kwargs": self.kwargs,
            "options": _shown_options(self.options),
            "state": self.state.value,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "timeout_s": self.timeout_s,
            "result": self.result,
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "run_at": self.run_at,
            "progress": self.progress,
            "links": {"self": f"/v1/jobs/{self.id}", "events": f"/v1/jobs/{self.id}/events"},
        }


def shown_url(url: str) -> str:
    """A webhook URL as it may be shown (records, logs): its scheme and host only. Its path
    and query often carry the receiver's secret (a chat service's hook, ``?token=``)."""
    parts = urllib.parse.urlsplit(url)
    rest = "/..." if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{parts.netloc}{rest}"


def _shown_options(options: dict[str, Any]) -> dict[str, Any]:
    url = options.get("webhook")
    return {**options, "webhook": shown_url(url)} if isinstance(url, str) else options
