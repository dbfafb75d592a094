"""``GET /metrics``: what ops scrape, in Prometheus' text format (version 0.0.4).

Job counters live in Redis (``keys.STATS``), counted by the scripts that make each change,
so they cover every job whoever submitted or ran it, and every gateway reports the same
numbers. Queue gauges come from the engines, as ``GET /v1/queues`` shows them. HTTP request
counts and durations are this gateway process's own, as is usual for a scraped process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from service import keys

#: Upper bounds (seconds) of the request duration histogram's buckets.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The job counters, by the event the scripts count under.
_JOB_EVENTS = {
    "submitted": ("corefleet_jobs_submitted_total", "Jobs stored and queued."),
    "begun": ("corefleet_job_attempts_total", "Attempts begun (a job run again counts again)."),
    "retried": (
        "corefleet_job_retries_total",
        "Attempts that raised a retryable error: the job runs again after a backoff.",
    ),
}
_FINISHED = (
    "corefleet_jobs_finished_total",
    "Jobs that reached a terminal state (succeeded, failed, cancelled, dead).",
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Methods counted by name; any other a client sends counts as "other" (no unbounded
#: series from made-up methods).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The status counted for a request whose client went away before the answer (nginx's).
CLIENT_GONE = 499


#: The outcomes of a webhook post that ``corefleet_webhook_tries_total`` counts.
WEBHOOK_OUTCOMES = ("delivered", "failed", "dropped")


class HttpMetrics:
    """Request counts and durations of one gateway process, by method, route and status."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        #: (method, route) -> per-bucket counts (the last one is +Inf), sum of seconds.
        self.durations: dict[tuple[str, str], tuple[list[int], float]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        if route.endswith("/events"):
            return  # an event stream lasts as long as its client: no request duration
        counts, total = self.durations.get((method, route), ([0] * (len(BUCKETS) + 1), 0.0))
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                counts[i] += 1
        counts[-1] += 1
        self.durations[(method, route)] = (counts, total + seconds)

    def middleware(self) -> Any:
        @web.middleware
        async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = time.perf_counter()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            except asyncio.CancelledError:
                status = CLIENT_GONE
                raise
            finally:
                method = request.method if request.method in _METHODS else "other"
                self.observe(method, _route(request), status, time.perf_counter() - started)

        return measure


def _route(request: web.Request) -> str:
    """The route's pattern, so that ids do not make a series each."""
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


def exposition(stored: list[str] | None, http: HttpMetrics) -> str:
    """The whole exposition: what is read from Redis (``stored_families``; None while
    Redis does not answer), whether it answered, and this gateway's HTTP metrics, which
    are served either way (a scrape that failed whole would lose them when they matter)."""
    lines = list(stored or [])
    lines += _family(
        "corefleet_redis_up",
        "gauge",
        "1 when Redis answered this scrape; 0 when it did not (only HTTP metrics follow).",
        [({}, 0.0 if stored is None else 1.0)],
    )
    lines += _http(http)
    return "\n".join(lines) + "\n"


async def stored_families(redis: aioredis.Redis, queues: Mapping[str, Any]) -> list[str]:
    """Job counters, queue gauges (``queues`` as /v1/queues shows them) and webhook
    counts: what every gateway reads alike from Redis."""
    raw: dict[str, str] = await redis.hgetall(keys.STATS)  # type: ignore[misc]  # redis-py
    lines: list[str] = []
    by_metric: dict[str, list[tuple[dict[str, str], float]]] = {}
    for field, count in raw.items():
        event, _, rest = field.partition("\t")
        engine, _, task = rest.partition("\t")
        labels = {"engine": engine, "task": task}
        name = _JOB_EVENTS.get(event, _FINISHED)[0]
        if name == _FINISHED[0]:
            labels = {"state": event, **labels}
        by_metric.setdefault(name, []).append((labels, float(count)))
    for name, help_text in (*_JOB_EVENTS.values(), _FINISHED):
        lines += _family(name, "counter", help_text, by_metric.get(name, []))
    lines += _queue_gauges(queues["engines"])
    lines += _family(
        "corefleet_jobs_delayed",
        "gauge",
        "Jobs waiting for their time (delay_s, or the backoff before a retry).",
        [({}, float(queues["delayed"]))],
    )
    lines += await _webhooks(redis)
    return lines


async def _webhooks(redis: aioredis.Redis) -> list[str]:
    counts: dict[str, str] = await redis.hgetall(keys.WEBHOOK_STATS)  # type: ignore[misc]
    lines = _family(
        "corefleet_webhook_tries_total",
        "counter",
        "Webhook posts, by outcome: delivered, failed (tried again later) or dropped.",
        [({"outcome": outcome}, float(counts.get(outcome, 0))) for outcome in WEBHOOK_OUTCOMES],
    )
    lines += _family(
        "corefleet_webhooks_owed",
        "gauge",
        "Webhook deliveries not yet answered (waiting, being posted or to be tried again).",
        [({}, float(await redis.xlen(keys.WEBHOOKS)))],
    )
    return lines


def _queue_gauges(engines: Mapping[str, dict[str, Any]]) -> list[str]:
    Samples = list[tuple[dict[str, str], float]]
    states: Samples = []
    gauges: dict[str, Samples] = {"waiting": [], "running": [], "workers": []}
    for engine, status in sorted(engines.items()):
        states.append(({"engine": engine, "state": str(status.get("state", ""))}, 1.0))
        for queue, numbers in sorted(status.get("queues", {}).items()):
            for what, samples in gauges.items():
                if isinstance(numbers.get(what), int):
                    samples.append(({"engine": engine, "queue": queue}, float(numbers[what])))
    lines = _family(
        "corefleet_engine_state",
        "gauge",
        "Each engine's state as a label (not started, local, connected to ..., unreachable).",
        states,
    )
    words = {
        "waiting": "Jobs waiting in the queue.",
        "running": "Jobs taken from the queue and not yet acknowledged.",
        "workers": "Workers consuming the queue now.",
    }
    for what, samples in gauges.items():
        lines += _family(f"corefleet_queue_{what}", "gauge", words[what], samples)
    return lines


def _http(http: HttpMetrics) -> list[str]:
    lines = _family(
        "corefleet_http_requests_total",
        "counter",
        "HTTP requests this gateway answered, by method, route and status.",
        [
            ({"method": m, "route": r, "status": s}, float(n))
            for (m, r, s), n in sorted(http.requests.items())
        ],
    )
    name = "corefleet_http_request_duration_seconds"
    lines += [
        f"# HELP {name} Time to answer HTTP requests (a ?wait request includes its wait).",
        f"# TYPE {name} histogram",
    ]
    for (method, route), (counts, total) in sorted(http.durations.items()):
        labels = {"method": method, "route": route}
        for bound, count in zip((*BUCKETS, "+Inf"), counts, strict=True):
            le = bound if isinstance(bound, str) else repr(bound)
            lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {count}")
        lines.append(f"{name}_sum{_labels(labels)} {total!r}")
        lines.append(f"{name}_count{_labels(labels)} {counts[-1]}")
    return lines


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples]
    return lines


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)
