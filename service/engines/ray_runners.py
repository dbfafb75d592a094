"""Warm runners: Ray actors kept between heavy jobs, so that a job need not wait for a lease.

Every Ray task waits for a worker lease from the raylet before it starts: on a small
machine that is about half of a bare no-op task's round trip. An actor call goes straight
to the actor's process. So where jobs asking for the same Ray resources (their shape)
follow each other, Ray's dispatcher keeps an actor of that shape, a warm runner, and calls
it with the next job instead of launching a task. The job runs the same runner either way,
in a process of its own, with the resources its task or the job asked for.

A warm runner holds its resources while it waits for the next job, as an actor does, and a
job in it keeps its CPU while it waits on ``ray.get`` (a task gives its CPU back). Four
rules keep that cheap:

- Only a shape launched twice within ``IDLE_S`` gets a runner, so a lone job starts none.
- A runner idle for ``IDLE_S`` ends, and its resources go back to the cluster.
- Runners together never hold more than half of any resource of the cluster, so Ray tasks
  (a fan-out's children, jobs of other shapes) always find the other half.
- ``COREFLEET_RAY_WARM_RUNNERS`` bounds how many there are (each is a process); 0 turns
  them off.

Cancel and time limits kill a busy runner's actor (``ray.cancel(force=True)`` refuses actor
tasks); its child tasks die with it, as a task's do. A runner that dies with its job (an
OOM kill, a lost node) leaves the job to be delivered again, as a lost task's worker does.
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

from service.worker_runtime import WorkerConfig, run_job_here

log = logging.getLogger("corefleet.ray")

#: How long a runner waits for its next job before it ends; also how close two launches
#: of a shape must be for the shape to get a runner.
IDLE_S = 2.0
#: The part of each of the cluster's resources that runners may hold together.
HOLD_AT_MOST = 0.5
#: Ray's name of each resource a job may ask for.
RAY_RESOURCES = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}

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
    ended: bool = False


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
        self._calls: dict[tuple[Runner, str], Any] = {}

    @property
    def count(self) -> int:
        return len(self._runners)

    def use(self, config: WorkerConfig) -> None:
        """Run jobs with ``config`` from now on: runners built with another one end (idle
        ones now, busy ones after their job)."""
        self.config = config
        for runner in [r for r in self._runners if r.config != config and r.idle_since is not None]:
            self._end(runner)

    def call(self, shape: Shape, job_id: str, task: str, entry: str) -> RunnerCall | None:
        """Hand the job to an idle runner of its shape; None where there is none (then it
        goes as a Ray task, and the shape may get a runner for its next job)."""
        now = time.monotonic()
        recent = now - self._last_launch.get(shape, -math.inf) < IDLE_S
        self._last_launch[shape] = now
        idle = self._idle.get(shape)
        if not idle:
            if recent and self._room_for(shape):
                self._start(shape)
            return None
        runner = idle.pop()
        runner.idle_since = None
        method = self._calls.get((runner, task))
        if method is None:
            # Named after the task, so Ray's dashboard and logs say what runs. Ray's own
            # record of each call (task events) is off unless asked for, as for tasks.
            method = runner.actor.run.options(name=task, enable_task_events=self.task_events)
            self._calls[(runner, task)] = method
        done = asyncio.wrap_future(method.remote(job_id, entry).future())
        done.add_done_callback(lambda finished: self._returned(runner, finished))
        return RunnerCall(runner, done)

    def kill(self, call: RunnerCall) -> None:
        """Stop the job the runner runs, child tasks included, by ending the runner."""
        self._end(call.runner)

    def close(self) -> None:
        for runner in list(self._runners):
            self._end(runner)

    # the pool ------------------------------------------------------------------------------

    def _room_for(self, shape: Shape) -> bool:
        if self.config is None or len(self._runners) >= self.limit:
            return False
        held: dict[str, float] = {}
        for runner in self._runners:
            for name, amount in runner.shape:
                held[name] = held.get(name, 0) + amount
        for name, amount in shape:
            if amount <= 0:
                continue
            have = self.capacity.get(RAY_RESOURCES[name], 0.0)
            if held.get(name, 0) + amount > have * HOLD_AT_MOST:
                return False
        return True

    def _start(self, shape: Shape) -> None:
        import ray

        assert self.config is not None
        if self._actor_class is None:
            self._actor_class = ray.remote(RunnerActor)
        # Owned by the dispatcher: it ends with the dispatcher, as the tasks it launched do.
        actor = self._actor_class.options(max_restarts=0, **dict(shape)).remote(self.config)
        runner = Runner(actor, shape, self.config)
        self._runners.add(runner)
        ready = asyncio.wrap_future(actor.ready.remote().future())
        ready.add_done_callback(lambda finished: self._returned(runner, finished))

    def _returned(self, runner: Runner, finished: asyncio.Future[Any]) -> None:
        """The runner finished starting or a job: it waits for the next one, or ends."""
        from ray.exceptions import RayTaskError

        if runner.ended:
            return
        error = None if finished.cancelled() else finished.exception()
        # A RayTaskError is the runner's own call raising (a task module that does not
        # import): the actor is fine. Any other error means it is gone or going.
        if (error is not None and not isinstance(error, RayTaskError)) or (
            runner.config != self.config
        ):
            self._end(runner)
            return
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
        for key in [key for key in self._calls if key[0] is runner]:
            del self._calls[key]
        with contextlib.suppress(Exception):  # already dead is fine
            ray.kill(runner.actor, no_restart=True)
