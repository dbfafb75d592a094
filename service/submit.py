"""The one submit path: validate a job, store it and queue it, in one Redis round trip.

The gateway and the direct producer (``clients.producer``) both call ``Submitter``, so a
job enqueued without HTTP is checked and stored exactly like one posted to the gateway.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from service import ids, keys, presence
from service.engines.base import Engine
from service.engines.cluster import DEFAULT_QUEUES, queues_of
from service.errors import (
    CorefleetError,
    EngineUnavailable,
    IdempotencyKeyReused,
    InvalidArguments,
    InvalidBody,
    UnknownTask,
)
from service.jobs import MAX_NESTING, Job, iso, nests_too_deep
from service.store import Dispatch, JobStore, Once
from service.webhooks import check_webhook
from tasks import (
    DEFAULT_PRIORITY,
    PRIORITIES,
    QUEUE_NAME,
    Registry,
    TaskSpec,
    bind_arguments,
)
from tasks.context import MAX_DELAY_S, MAX_TIMEOUT_S

_BODY_KEYS = frozenset({"task", "args", "kwargs", "options"})


#: The job options a submit may carry.
OPTIONS = (
    "delay_s",
    "max_attempts",
    "priority",
    "queue",
    "require_worker",
    "resources",
    "timeout_s",
    "webhook",
)


#: The keys Celery's Redis transport (kombu) keeps its own state in.
KOMBU_KEYS = frozenset({"unacked", "unacked_index", "unacked_mutex"})


def _check_options(options: dict[str, Any], webhook_hosts: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidBody(f"unknown option(s): {', '.join(unknown)}", {"allowed": list(OPTIONS)})
    timeout = options.get("timeout_s")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0 < timeout <= MAX_TIMEOUT_S  # NaN, and numbers no clock can add, fail this
    ):
        raise InvalidBody(f"options.timeout_s must be a number above 0, at most {MAX_TIMEOUT_S}")
    attempts = options.get("max_attempts")
    if attempts is not None and (
        isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100
    ):
        raise InvalidBody("options.max_attempts must be a whole number from 1 to 100")
    queue = options.get("queue")
    if queue is not None and (not isinstance(queue, str) or not QUEUE_NAME.fullmatch(queue)):
        raise InvalidBody("options.queue must be 1 to 64 letters, digits or _.:-")
    if queue is not None and queue.startswith(keys.PREFIX):
        # A Celery queue is a Redis list of that very name: it must not be one of ours.
        raise InvalidBody(f"options.queue must not start with {keys.PREFIX!r} (corefleet's own)")
    if queue is not None and (queue in KOMBU_KEYS or queue.startswith("_kombu.")):
        # Nor one of Celery's transport: a list there would stop its redeliveries.
        raise InvalidBody(f"options.queue must not be {queue!r}: Celery's transport uses it")
    if options.get("priority", DEFAULT_PRIORITY) not in PRIORITIES:
        raise InvalidBody(
            f"options.priority must be one of {', '.join(PRIORITIES)}",
            {"allowed": list(PRIORITIES)},
        )
    if not isinstance(options.get("require_worker", False), bool):
        raise InvalidBody("options.require_worker must be true or false")
    delay = options.get("delay_s")
    if delay is not None and (
        isinstance(delay, bool)
        or not isinstance(delay, (int, float))
        or not 0 <= delay <= MAX_DELAY_S  # NaN fails this too
    ):
        raise InvalidBody(f"options.delay_s must be a number of seconds from 0 to {MAX_DELAY_S}")
    if "webhook" in options:
        check_webhook(options["webhook"], webhook_hosts)
    return options


class Submitter:
    def __init__(
        self,
        store: JobStore,
        registry: Registry,
        engines: Mapping[str, Engine],
        webhook_hosts: tuple[str, ...] = (),
    ) -> None:
        """``webhook_hosts``: the hosts a job's webhook may call (none: webhooks are off)."""
        self.webhook_hosts = webhook_hosts
        self.store = store
        self.registry = registry
        self.engines = engines

    def prepare(self, body: Any) -> Job:
        """The job a request body describes; raises a ``BadRequest`` or ``UnknownTask``."""
        if not isinstance(body, dict):
            raise InvalidBody("the body must be a JSON object")
        unknown = sorted(set(body) - _BODY_KEYS)
        if unknown:
            raise InvalidBody(
                f"unknown field(s): {', '.join(unknown)}", {"allowed": sorted(_BODY_KEYS)}
            )
        name = body.get("task")
        if not isinstance(name, str) or not name:
            raise InvalidBody("'task' must be a task name (a non-empty string)")
        args = body.get("args", [])
        kwargs = body.get("kwargs", {})
        options = body.get("options", {})
        if not isinstance(args, list):
            raise InvalidBody("'args' must be a JSON array")
        if not isinstance(kwargs, dict):
            raise InvalidBody("'kwargs' must be a JSON object")
        if not isinstance(options, dict):
            raise InvalidBody("'options' must be a JSON object")
        spec = self.registry.get(name)
        if spec is None:
            raise UnknownTask(f"no task is named {name!r}", {"task": name})
        if nests_too_deep(args) or nests_too_deep(kwargs):
            raise InvalidArguments(
                f"{name}: args and kwargs may nest arrays and objects {MAX_NESTING} deep at most",
                {"task": name, "max_nesting": MAX_NESTING},
            )
        if "ctx" in kwargs and spec.takes_ctx:
            raise InvalidArguments(f"{name}: 'ctx' is supplied by corefleet, not the caller")
        problem = bind_arguments(spec, args, kwargs)
        if problem is not None:
            raise InvalidArguments(problem, {"task": name, "signature": str(spec.signature())})
        _check_options(options, self.webhook_hosts)
        if "resources" in options and spec.engine != "ray":
            raise InvalidBody(
                f"options.resources apply to Ray jobs only; {name} runs on {spec.engine}",
                {"engine": spec.engine},
            )
        queue = options.get("queue", spec.queue)
        _check_queue(self.registry, spec, queue)
        fingerprint = _fingerprint(name, args, kwargs, options)
        engine = spec.engine
        if engine not in self.engines:
            raise EngineUnavailable(
                f"the {engine} engine is not enabled on this gateway", {"engine": engine}
            )
        if spec.priority != DEFAULT_PRIORITY and "priority" not in options:
            options = {**options, "priority": spec.priority}  # the record shows it
        timeout = options.get("timeout_s", spec.timeout_s)
        now = datetime.now(UTC)
        delay = options.get("delay_s", 0)
        return Job(
            id=ids.new_id(),
            task=name,
            kind=spec.kind,
            engine=engine,
            queue=queue,
            args=args,
            kwargs=kwargs,
            options=options,
            max_attempts=options.get("max_attempts", spec.max_attempts),
            timeout_s=float(timeout) if timeout is not None else None,
            created_at=iso(now),
            run_at=iso(now + timedelta(seconds=delay)) if delay > 0 else None,
            fingerprint=fingerprint,
        )

    async def _require_worker(self, job: Job) -> None:
        """Refuse a job that asked for a live worker when its queue has none."""
        if not await presence.live(self.store.redis, job.queue):
            raise EngineUnavailable(
                f"no worker is consuming queue {job.queue!r} now, and the job asked for one "
                "(require_worker)",
                {"queue": job.queue, "engine": job.engine},
            )

    async def submit(self, body: Any, idempotency_key: str | None = None) -> Job:
        """Validate, store and queue one job; with ``idempotency_key``, the job that key
        already stands for, if it does (see ``enqueue``)."""
        job = self.prepare(body)
        return await self.enqueue([job], idempotency_key) or job

    async def submit_many(self, bodies: list[Any]) -> list[Job]:
        """Validate every job first, then store and queue them all in one script call. A
        job refused says which it was: ``jobs[i]`` in its message, ``index`` in its detail."""
        jobs = []
        for index, body in enumerate(bodies):
            try:
                jobs.append(self.prepare(body))
            except CorefleetError as exc:
                raise _refused_at(exc, index) from None
        await self.enqueue(jobs, batch=True)
        return jobs

    async def enqueue(
        self, jobs: list[Job], idempotency_key: str | None = None, *, batch: bool = False
    ) -> Job | None:
        """Store and queue prepared jobs, all or none. In a ``batch``, a job refused here
        (its engine away, no worker for it) says which it was, as ``submit_many`` does.

        With ``idempotency_key`` (one job): if the key already stands for a job submitted
        with the same request, nothing is stored and that job (as it is now) is returned;
        a different request under the same key is refused with ``IdempotencyKeyReused``.
        """
        once = None if idempotency_key is None else Once(idempotency_key, jobs[0].fingerprint)
        index = {job.id: i for i, job in enumerate(jobs)} if batch else {}

        def refused(job: Job, exc: CorefleetError) -> CorefleetError:
            return _refused_at(exc, index[job.id]) if batch else exc

        def dispatch(job: Job) -> Dispatch:
            try:
                return self.engines[job.engine].dispatch(job)
            except CorefleetError as exc:
                raise refused(job, exc) from None

        # A resend is answered with its job even when the job could not be queued now (no
        # worker, an engine away): it was queued then. ``create`` checks again, atomically.
        earlier = await self.store.earlier(once) if once is not None else None
        if earlier is None:
            for job in jobs:
                if job.options.get("require_worker"):
                    try:
                        await self._require_worker(job)
                    except CorefleetError as exc:
                        raise refused(job, exc) from None
            earlier = await self.store.create(jobs, dispatch, once)
        if earlier is None:
            return None
        assert once is not None
        if earlier.fingerprint != once.fingerprint:
            raise IdempotencyKeyReused(
                f"Idempotency-Key {idempotency_key!r} already stands for job {earlier.job.id}, "
                "submitted with a different request",
                {"id": earlier.job.id},
            )
        return earlier.job


def _refused_at(exc: CorefleetError, index: int) -> CorefleetError:
    """``exc`` as the refusal of job ``index`` of a batch: ``jobs[i]`` in its message,
    ``index`` in its detail."""
    exc.message = f"jobs[{index}]: {exc.message}"
    exc.detail = {**exc.detail, "index": index}
    return exc


def _check_queue(registry: Registry, spec: TaskSpec, queue: str) -> None:
    """Refuse a queue nothing would run the job from: one of another engine (the job would
    run on the wrong one, or never), or a cluster queue no task declares (Ray's and Dask's
    dispatchers read only those). A Celery or io queue may be new: workers are started
    on whatever queues their operators name."""
    owner = registry.engine_of_queue(queue)
    if owner is not None and owner != spec.engine:
        raise InvalidBody(
            f"options.queue {queue!r} carries {owner} jobs; {spec.name} runs on {spec.engine}",
            {"queue": queue, "engine": spec.engine},
        )
    if owner is None and spec.engine in DEFAULT_QUEUES:  # a cluster queue no task declares
        known = queues_of(registry, spec.engine)
        raise InvalidBody(
            f"options.queue {queue!r} is read by no {spec.engine} dispatcher; its queues are "
            f"those its tasks declare: {', '.join(known)}",
            {"queue": queue, "engine": spec.engine, "allowed": list(known)},
        )


def _fingerprint(task: str, args: Any, kwargs: Any, options: Any) -> str:
    """What makes two submits the same request: the task and what it is called with, as
    sent. A default the task declares (its priority, say) is left out: a resend after a
    deploy changed it is still the same request."""
    request = [task, args, kwargs, options]
    try:
        # Strict, as the HTTP body parser is: a producer hands Python values, and a NaN
        # stored would make the record (and every listing of it) unreadable JSON.
        text = json.dumps(request, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArguments(
            f"{task}: args, kwargs and options must be JSON values (finite numbers): {exc}",
            {"task": task},
        ) from None
    return hashlib.sha256(text.encode()).hexdigest()
