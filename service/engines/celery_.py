"""The Celery engine: cpu (and gpu) jobs run in Celery prefork worker processes.

The gateway does not call ``apply_async`` (about half a millisecond of CPU per call, on the
event loop): it writes the Celery protocol-2 message itself, into the queue's Redis list,
in the same MULTI that stores the job. The worker runs one generic Celery task,
``corefleet.run(job_id)``, which calls the job runner; Celery's result backend is not used,
the job record is the truth. Celery is imported only by code that needs its app.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import math
import os
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from service import presence
from service.errors import InvalidBody
from service.jobs import Job
from service.settings import Settings
from service.store import Dispatch
from tasks import TaskSpec

if TYPE_CHECKING:
    from celery import Celery

#: The one Celery task every corefleet cpu/gpu job travels as.
CELERY_TASK = "corefleet.run"
#: The queues every deployment has: cpu jobs' and gpu jobs'.
DEFAULT_QUEUES = frozenset({"cpu", "gpu"})
#: Margin kept between the longest time limit and the broker's visibility timeout.
VISIBILITY_MARGIN_S = 60
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = f"corefleet-gateway@{os.uname().nodename}"
#: kombu's Redis transport keeps a queue's messages of each priority step in a list of its
#: own (step 0 is the queue's own list; the others add this separator and the step), and
#: its workers take from those lists in step order: 0 first.
_PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
#: The kombu priority of each corefleet priority level. ``normal`` is not 0, so that
#: ``high`` can come before it; a message sent with Celery's default (0) counts as high.
CELERY_PRIORITY = {"high": 0, "normal": 3, "low": 6}


def celery_list(queue: str, step: int) -> str:
    """The Redis list holding ``queue``'s messages of one kombu priority step."""
    return queue if step == 0 else f"{queue}{_PRIORITY_SEP}{step}"


@functools.lru_cache(maxsize=1024)  # asked at every submit, for a handful of queues
def celery_lists(queue: str) -> tuple[str, ...]:
    """Every list of a Celery queue, in the order its workers take them."""
    return tuple(celery_list(queue, step) for step in PRIORITY_STEPS)


def visibility_timeout(settings: Settings) -> int:
    """Above the longest time limit, so Redis never redelivers a job that is still running."""
    return max(
        settings.celery.visibility_timeout_s,
        int(settings.celery.default_time_limit_s) + VISIBILITY_MARGIN_S,
    )


def time_limit_ceiling(settings: Settings) -> int:
    """The longest time limit a cpu/gpu job may have: under the visibility timeout, so that
    Redis never hands a job that still runs to another worker."""
    return visibility_timeout(settings) - VISIBILITY_MARGIN_S


def over_ceiling(registry: Iterable[TaskSpec], settings: Settings) -> list[TaskSpec]:
    """The Celery tasks whose declared time limit is above the ceiling: their jobs are
    refused until ``COREFLEET_VISIBILITY_TIMEOUT_S`` is raised."""
    ceiling = time_limit_ceiling(settings)
    return [
        spec
        for spec in registry
        if spec.engine == "celery" and spec.timeout_s is not None and spec.timeout_s > ceiling
    ]


def time_limit(job: Job, settings: Settings) -> float:
    return job.timeout_s or settings.celery.default_time_limit_s


def task_message(job: Job, limit: float) -> str:
    """The Celery protocol-2 message for ``job``, as kombu's Redis transport stores it."""
    body = json.dumps([[job.id], {}, _EMBED]).encode()
    headers: dict[str, Any] = {
        "lang": "py",
        "task": CELERY_TASK,
        "id": job.id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        # A hard limit only: a job over it has its worker child replaced.
        "timelimit": [limit, None],
        "root_id": job.id,
        "parent_id": None,
        # What Flower shows as the task's arguments: the corefleet call it carries.
        "argsrepr": f"{job.task}(*{json.dumps(job.args)}, **{json.dumps(job.kwargs)})"[:1024],
        "kwargsrepr": "{}",
        "origin": _ORIGIN,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "correlation_id": job.id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": job.queue},
                "priority": CELERY_PRIORITY[job.priority],
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def make_celery_app(settings: Settings) -> Celery:
    """The Celery app every corefleet process shares: JSON only, late acks, events on."""
    from celery import Celery

    app = Celery("corefleet", broker=settings.redis, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # corefleet declares no rate limits; skipping their bookkeeping saves per-job work.
        worker_disable_rate_limits=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_default_queue="cpu",
        # What a job sent through this app without a priority gets: corefleet's normal.
        task_default_priority=CELERY_PRIORITY["normal"],
        broker_transport_options={
            "visibility_timeout": visibility_timeout(settings),
            "priority_steps": list(PRIORITY_STEPS),
        },
        broker_connection_retry_on_startup=True,
        # A message sent without corefleet's ``timelimit`` header (``send_task`` from a
        # bare Celery producer) still ends within the visibility timeout.
        task_time_limit=settings.celery.default_time_limit_s,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app


class CeleryEngine:
    """The gateway's side: queue cpu/gpu jobs, cancel running ones, report queues."""

    name = "celery"

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._app: Celery | None = None

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = make_celery_app(self.settings)
        return self._app

    async def start(self) -> None:
        return None

    def dispatch(self, job: Job) -> Dispatch:
        limit = time_limit(job, self.settings)
        ceiling = time_limit_ceiling(self.settings)
        if limit > ceiling:
            raise InvalidBody(
                f"timeout_s {limit:g} is above the {ceiling} s a cpu/gpu job may run here "
                "(raise COREFLEET_VISIBILITY_TIMEOUT_S to at least "
                f"{math.ceil(limit) + VISIBILITY_MARGIN_S} on every process)",
                {"max_timeout_s": ceiling},
            )
        key = celery_list(job.queue, CELERY_PRIORITY[job.priority])
        return Dispatch("lpush", key, task_message(job, limit), celery_lists(job.queue))

    async def cancel(self, job: Job) -> None:
        # Kill the child running it; should the message come back, the runner sees the job
        # is cancelled and skips it. SIGKILL: a worker's children ignore SIGTERM (it is the
        # worker's own stop; see _stop_by_putting_back in celery_worker.py), and SIGQUIT
        # reaches Python only between bytecodes, so native code (a Numba loop, a long NumPy
        # or CuPy call) ran on to its end. The worker replaces the child.
        await asyncio.to_thread(self.app.control.revoke, job.id, terminate=True, signal="SIGKILL")

    async def workers(self, queue: str) -> list[dict[str, Any]]:
        """The live workers of ``queue``, with their devices."""
        return await presence.live(self.redis, queue)

    async def status(self) -> dict[str, Any]:
        """cpu and gpu, and every queue a live worker consumes (``--queues``): the waiting
        jobs of each by priority, and its workers."""
        queues: dict[str, Any] = {}
        for queue in sorted(DEFAULT_QUEUES | await presence.known_queues(self.redis, "celery")):
            pipe = self.redis.pipeline(transaction=False)
            for key in celery_lists(queue):
                pipe.llen(key)
            lengths = dict(zip(PRIORITY_STEPS, await pipe.execute(), strict=True))
            by_priority = {level: lengths[step] for level, step in CELERY_PRIORITY.items()}
            # Messages of the step no corefleet level uses (Celery's lowest) count as low.
            by_priority["low"] += lengths[PRIORITY_STEPS[-1]]
            workers = await self.workers(queue)
            if queue not in DEFAULT_QUEUES and not workers and not any(lengths.values()):
                await presence.forget_queue(self.redis, "celery", queue)  # empty, unconsumed
                continue
            queues[queue] = {
                "waiting": sum(lengths.values()),
                "waiting_by_priority": by_priority,
                "workers": len(workers),
            }
            if queue == "gpu":
                queues[queue]["devices"] = [
                    {"worker": w["name"], **gpu} for w in workers for gpu in w.get("gpus", [])
                ]
                queues[queue]["cpu_fallback"] = any(w.get("gpu_fallback") for w in workers)
        return {"engine": self.name, "state": "connected", "queues": queues}

    async def close(self) -> None:
        if self._app is not None:
            self._app.close()
