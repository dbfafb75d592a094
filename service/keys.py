"""Every Redis key and channel corefleet uses, in one place."""

import functools
import hashlib

from tasks import DEFAULT_PRIORITY, PRIORITIES

PREFIX = "cf:"

#: Pub/sub channel that carries every job state change as ``{"id", "state", "from"}``, and
#: each progress report as ``{"id", "state": "running", "progress": {...}}``.
EVENTS = PREFIX + "events"
#: Pub/sub channel that announces new jobs, one message per submit call:
#: ``{"state": "queued", "ids": [...]}``. Gateways listen only while a live view (the
#: dashboard, ``GET /v1/events``) is open, so a submit costs nobody a wake-up.
SUBMITTED = PREFIX + "submitted"
#: Pub/sub channel that carries each cancel: ``{"id": job id, "from": its state before}``.
CANCEL = PREFIX + "cancel"
#: Sorted set of every job's id (all scored 0: ids sort by creation time), for listing.
JOBS = PREFIX + "jobs"
#: Hash of job counters for /metrics: "event<TAB>engine<TAB>task" -> count, where event is
#: "submitted", "begun" (an attempt started) or the terminal state a job reached.
STATS = PREFIX + "stats"
#: Sorted set of the ids of jobs waiting for their time (a ``delay_s``, or the backoff
#: before a retry), scored by when each is due (Unix milliseconds). Gateways put each on
#: its queue when it is due.
DELAYED = PREFIX + "delayed"
#: Stream of webhook deliveries owed: ``{"id": job id}``, added as a job that named a webhook
#: ends (see ``webhooks.py``).
WEBHOOKS = PREFIX + "webhooks"
#: Hash of webhook counters for /metrics: "delivered", "failed" (a try that failed) and
#: "dropped" (given up) -> count, over every gateway.
WEBHOOK_STATS = PREFIX + "webhook-stats"
#: Consumer group that io workers read job streams with.
IO_GROUP = "corefleet-io"


def webhook_try(try_id: str) -> str:
    """The marker that one failed webhook try was counted (kept an hour)."""
    return f"{PREFIX}webhook-try:{try_id}"


def job(job_id: str) -> str:
    """The hash that holds one job's record."""
    return f"{PREFIX}job:{job_id}"


def idempotency(key: str) -> str:
    """The job id (and request fingerprint) an ``Idempotency-Key`` stands for; hashed, so
    that any key a client sends makes a tidy Redis key."""
    return f"{PREFIX}idem:{hashlib.sha256(key.encode()).hexdigest()}"


def stream(queue: str, priority: str = DEFAULT_PRIORITY) -> str:
    """The Redis Stream that carries the ids of a stream queue's jobs of one priority level.

    ``normal`` jobs travel on ``cf:stream:{queue}``, the others on a stream of their own
    (queue names cannot hold ``#``).
    """
    base = f"{PREFIX}stream:{queue}"
    return base if priority == DEFAULT_PRIORITY else f"{base}#{priority}"


@functools.lru_cache(maxsize=1024)  # asked at every submit, for a handful of queues
def streams(queue: str) -> tuple[str, ...]:
    """Every stream of a stream queue, in the order its consumers take them."""
    return tuple(stream(queue, priority) for priority in PRIORITIES)


def consumers(queue: str) -> str:
    """Sorted set of the consumers of stream ``queue``, scored by when each last checked in."""
    return f"{PREFIX}consumers:{queue}"


#: Hash: worker name -> JSON of what the worker says about itself (queues, GPUs, ...).
WORKER_INFO = PREFIX + "worker-info"


def known_queues(kind: str) -> str:
    """Set of the queues workers of ``kind`` (``io``, ``celery``) ever said they consume:
    listed until nothing waits on them and nobody consumes them."""
    return f"{PREFIX}known-queues:{kind}"
