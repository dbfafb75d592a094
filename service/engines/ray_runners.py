"""Warm runners: Ray actors kept between heavy jobs, so that a job need not wait for a lease.

Every Ray task waits for a worker lease from the raylet before it starts: on a small
machine that is about half of a bare no-op task's round trip. An actor call goes straight
to the actor's process. So where jobs asking for the same Ray resources (their shape)
follow each other, Ray's dispatcher keeps an actor of that shape, a warm runner, and calls
it with the next job instead of launching a task. The job runs the same runner either way,
in a process of its own, with the resources its task or the job asked for.

A warm runner holds its resources while it waits for the next job, as an actor does, and a
job in it keeps its CPU while it waits on ``ray.get`` (a task gives its CPU back). These
rules keep that cheap:

- Only a shape launched twice within ``IDLE_S`` gets a runner, so a lone job starts none;
  and a shape has one runner starting at a time, so a burst does not start one per job.
- A runner idle for ``IDLE_S`` ends, and its resources go back to the cluster.
- Runners together never hold more than half of any resource of the cluster, so Ray tasks
  (a fan-out's children, jobs of other shapes) always find the other half.
- ``COREFLEET_RAY_WARM_RUNNERS`` bounds how many there are (each is a process); 0 turns
  them off.

A job whose shape's runners are all busy waits ``HANDOVER_S`` for one of them, then goes
as a task: a runner writes its job's outcome before it answers the dispatcher, so a client
waiting on that job often sends the next one before the runner is seen to be free.

Cancel and time limits kill a busy runner's actor (``ray.cancel(force=True)`` refuses actor
tasks); its child tasks die with it, as a task's do. A runner that dies with its job (an
OOM kill, a lost node) leaves the job to be delivered again, as a lost task's worker does;
one found dead as a job is handed to it (it died while idle) has that job go as a Ray task
at once (``RayEngine``), since the job never began.

The limit and the cluster's resources come with every serve of the dispatcher
(``resize``): idle runners beyond them end then, busy ones as their job ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service.engines.cluster import RAY_RESOURCES
from service.worker_runtime import WorkerConfig, run_job_here

log = logging.getLogger("corefleet.ray")

#: How long a runner waits for its next job before it ends; also how close two launches
#: of a shape must be for the shape to get a runner.
IDLE_S = 2.0
#: How long a job waits for a busy runner of its shape to finish before it goes as a Ray
#: task: about what Ray's worker lease would cost it.
HANDOVER_S = 0.002
#: The part of each of the cluster's resources that runners may hold together.
HOLD_AT_MOST = 0.5
#: How long a runner may take to start before it is given up (a shape no node can hold
#: on a cluster at an address would wait for good, holding its place).
START_S = 60.0
#: Shapes whose last launch is remembered (per-job resources can make one per job).
MAX_SHAPES = 256

#: A job's Ray resources (``ray_options``), sorted: the runners that can run it.
Shape = tuple[tuple[str, Any], ...]


class RunnerActor:
    """The actor's body (made a Ray actor class by ``WarmRunners``): one job at a time."""

    def __init__(self, config: WorkerConfig) -> None:
        self._config = config

    def ready(self) -> bool:
        return True

    def run(self, job_id: str, entry: str) -> str | None:
        return run_job_here(self._config, job_id, "ray", entry)


@dataclass(eq=False)
class Runner:
    actor: Any
    shape: Shape
    config: WorkerConfig
    #: When it last finished a job; None while it starts or runs one.
    idle_since: float | None = None
    #: Whether its actor has started (before that, nothing waits for it).
    ready: bool = False
    ended: bool = False
    #: The job it runs now, if any.
    current: RunnerCall | None = None
    #: Its ``run`` method with each task's call options, made once (``.options()`` costs
    #: about as much as the call).
    methods: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class RunnerCall:
    """A job handed to a runner: the handle ``RayEngine`` waits on and interrupts."""

    runner: Runner
    done: asyncio.Future[Any] = field(repr=False)


def shape_of(options: Mapping[str, Any]) -> Shape:
    """The shape of a job with these Ray ``.options()`` resources, Ray's defaults filled in:
    a task asks for one CPU unless told, where an actor would hold none."""
    return tuple(sorted({"num_cpus": 1, **options}.items()))


class WarmRunners:
    """The runners of one dispatcher's Ray engine, by shape (in the dispatcher actor)."""

    def __init__(self, limit: int, task_events: bool) -> None:
        #: The most runners at once (``COREFLEET_RAY_WARM_RUNNERS``); 0: none.
        self.limit = limit
        self.task_events = task_events
        #: What the cluster has of each Ray resource, as last seen by the dispatcher.
        self.capacity: dict[str, float] = {}
        self.config: WorkerConfig | None = None
        self._actor_class: Any = None
        self._runners: set[Runner] = set()
        self._idle: dict[Shape, list[Runner]] = {}
        self._last_launch: dict[Shape, float] = {}
        #: Per shape: launches waiting for one of its busy runners to finish.
        self._waiters: dict[Shape, list[asyncio.Future[Runner | None]]] = {}

    def use(self, config: WorkerConfig) -> None:
        """Run jobs with ``config`` from now on: runners built with another one end (idle
        ones now, busy ones after their job)."""
        self.config = config
        for runner in [r for r in self._runners if r.config != config and r.idle_since is not None]:
            self._end(runner)

    def resize(self, limit: int, capacity: Mapping[str, float]) -> None:
        """Take a new limit and what the cluster has now: idle runners beyond either end at
        once, the longest idle first (busy ones as their job ends)."""
        self.limit = limit
        self.capacity = dict(capacity)
        idle = sorted(
            (runner for runners in self._idle.values() for runner in runners),
            key=lambda runner: runner.idle_since or 0.0,
        )
        for runner in idle:
            if len(self._runners) <= self.limit and not self._over():
                break
            self._end(runner)

    async def call(self, shape: Shape, job_id: str, task: str, entry: str) -> RunnerCall | None:
        """Hand the job to a runner of its shape; None where there is none (then it goes
        as a Ray task, and the shape may get a runner for its next job)."""
        runner = await self._take(shape)
        if runner is None:
            return None
        if runner.config != self.config:  # the settings changed while it was handed over
            self._end(runner)
            return None
        try:
            method = runner.methods.get(task)
            if method is None:
                # Named after the task, so Ray's dashboard and logs say what runs. Ray's own
                # record of each call (task events) is off unless asked for, as for tasks.
                method = runner.actor.run.options(name=task, enable_task_events=self.task_events)
                runner.methods[task] = method
            ref = method.remote(job_id, entry)
        except Exception as exc:  # not sent: the job goes as a task, which says what is wrong
            log.warning("cannot call a warm runner: %s", exc)
            self._end(runner)
            return None
        try:
            done = asyncio.wrap_future(ref.future())
        except Exception as exc:
            # Sent, but it cannot be waited on: end the runner, and the call with it, so
            # that the job, going as a task, runs once.
            log.warning("cannot wait on a warm runner: %s", exc)
            self._end(runner)
            return None
        done.add_done_callback(lambda finished: self._returned(runner, finished))
        runner.current = RunnerCall(runner, done)
        return runner.current

    async def _take(self, shape: Shape) -> Runner | None:
        now = time.monotonic()
        recent = now - self._last_launch.pop(shape, -math.inf) < IDLE_S
        self._last_launch[shape] = now  # the newest last: the oldest go first
        if len(self._last_launch) > MAX_SHAPES:
            del self._last_launch[next(iter(self._last_launch))]
        idle = self._idle.get(shape)
        if idle:
            runner = idle.pop()
            if not idle:
                del self._idle[shape]
            runner.idle_since = None
            return runner
        if any(r.ready for r in self._runners if r.shape == shape):
            # Busy, but its job may have ended: the runner writes the outcome to Redis
            # before it answers the dispatcher, so the job's next one (a client waiting on
            # it) can come before the answer. A lease would cost as long as waiting.
            taken = await self._handed_over(shape)
            if taken is not None:
                return taken
        # One start at a time per shape (looked at after the wait, which a burst's other
        # jobs share): a burst would otherwise start one per job.
        starting = any(not r.ready for r in self._runners if r.shape == shape)
        if recent and not starting and self._room_for(shape):
            self._start(shape)
        return None

    async def _handed_over(self, shape: Shape) -> Runner | None:
        """The runner of ``shape`` that finishes its job within ``HANDOVER_S``, if one does."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Runner | None] = loop.create_future()
        waiters = self._waiters.setdefault(shape, [])
        waiters.append(waiter)

        def give_up() -> None:
            if not waiter.done():
                waiter.set_result(None)

        timer = loop.call_later(HANDOVER_S, give_up)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and (runner := waiter.result()):
                self._wait_idle(runner)  # handed over as this launch was cancelled
            raise
        finally:
            timer.cancel()
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(shape, None)

    def kill(self, call: RunnerCall) -> None:
        """Stop the job the runner runs, child tasks included, by ending the runner; not
        if that job has ended (the runner may run the next one already)."""
        if call.runner.current is call and not call.done.done():
            self._end(call.runner)

    # the pool ------------------------------------------------------------------------------

    def _room_for(self, shape: Shape) -> bool:
        if self.config is None or len(self._runners) >= self.limit:
            return False
        return not self._over(shape)

    def _over(self, extra: Shape = ()) -> bool:
        """Whether the runners (and one more of shape ``extra``) hold more than their part
        of any of the cluster's resources."""
        held: dict[str, float] = {}
        for shape in [extra, *(runner.shape for runner in self._runners)]:
            for name, amount in shape:
                held[name] = held.get(name, 0) + amount
        # With room for rounding: sums of the same amounts in another order may differ in
        # the last bit, and a runner let in must not count as one too many after.
        return any(
            amount > 0
            and amount > self.capacity.get(RAY_RESOURCES[name], 0.0) * HOLD_AT_MOST + 1e-9
            for name, amount in held.items()
        )

    def _start(self, shape: Shape) -> None:
        import ray

        assert self.config is not None
        if self._actor_class is None:
            self._actor_class = ray.remote(RunnerActor)
        actor = None
        try:
            # Owned by the dispatcher: it ends with it, as the tasks it launched do.
            actor = self._actor_class.options(max_restarts=0, **dict(shape)).remote(self.config)
            ready = asyncio.wrap_future(actor.ready.remote().future())
        except Exception as exc:  # the job goes as a task, which says what is wrong
            log.warning("cannot start a warm runner of %s: %s", dict(shape), exc)
            if actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            return
        runner = Runner(actor, shape, self.config)
        self._runners.add(runner)
        ready.add_done_callback(lambda finished: self._returned(runner, finished))
        asyncio.get_running_loop().call_later(START_S, self._end_unless_ready, runner)

    def _end_unless_ready(self, runner: Runner) -> None:
        if not runner.ready:
            log.warning("a warm runner of %s did not start; giving it up", dict(runner.shape))
            self._end(runner)

    def _returned(self, runner: Runner, finished: asyncio.Future[Any]) -> None:
        """The runner finished starting or a job: it goes on with the next, or ends."""
        from ray.exceptions import RayTaskError

        # Read in any case: a killed runner's error is expected, not one to report.
        error = None if finished.cancelled() else finished.exception()
        runner.current = None
        if runner.ended:
            return
        # A RayTaskError is the runner's own call raising (a task module that does not
        # import): the actor is fine. Any other error means it is gone or going. A runner
        # built with other settings, or one too many now that the limit or the cluster
        # shrank, ends too.
        if (
            (error is not None and not isinstance(error, RayTaskError))
            or runner.config != self.config
            or len(self._runners) > self.limit
            or self._over()
        ):
            self._end(runner)
            return
        runner.ready = True
        for waiter in self._waiters.get(runner.shape, []):
            if not waiter.done():
                waiter.set_result(runner)  # a job of its shape waits for it: it goes on
                return
        self._wait_idle(runner)

    def _wait_idle(self, runner: Runner) -> None:
        runner.idle_since = since = time.monotonic()
        self._idle.setdefault(runner.shape, []).append(runner)
        asyncio.get_running_loop().call_later(IDLE_S, self._end_if_idle, runner, since)

    def _end_if_idle(self, runner: Runner, since: float) -> None:
        if runner.idle_since == since:  # idle all along since then
            self._end(runner)

    def _end(self, runner: Runner) -> None:
        import ray

        if runner.ended:
            return
        runner.ended = True
        self._runners.discard(runner)
        idle = self._idle.get(runner.shape, [])
        if runner in idle:
            idle.remove(runner)
        if not idle:
            self._idle.pop(runner.shape, None)
        with contextlib.suppress(Exception):  # already dead is fine
            ray.kill(runner.actor, no_restart=True)
