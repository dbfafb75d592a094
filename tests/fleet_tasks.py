"""Tasks that exist only for the tests (loaded with COREFLEET_TASK_MODULES)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis

from tasks import Retry, TaskContext, task

_clients: dict[str, aioredis.Redis] = {}


def _redis() -> aioredis.Redis:
    url = os.environ["COREFLEET_REDIS_URL"]
    loop_key = f"{url}#{id(asyncio.get_running_loop())}"
    if loop_key not in _clients:
        _clients[loop_key] = aioredis.Redis.from_url(url, decode_responses=True)
    return _clients[loop_key]


@task("test.hold", kind="io")
async def hold(seconds: float, ctx: TaskContext) -> int:
    """Record that this attempt started, wait ``seconds``, return the attempt number."""
    await _redis().rpush(f"test:started:{ctx.job_id}", ctx.attempt)
    await asyncio.sleep(seconds)  # sleep-ok: the point of the task: an attempt that takes time
    return ctx.attempt


@task("test.boom", kind="io")
async def boom(message: str) -> None:
    """Raise a ValueError carrying ``message``."""
    raise ValueError(message)


@task("test.slow", kind="io", timeout_s=0.2)
async def slow() -> None:
    """Outlive its 0.2 s time limit."""
    await asyncio.sleep(30)  # sleep-ok: the point of the task: outlive its time limit


@task("test.unserialisable", kind="io")
async def unserialisable() -> object:
    """Return something JSON cannot carry."""
    return {1, 2, 3}


@task("test.too_deep", kind="io")
async def too_deep() -> list[Any]:
    """Return lists in lists, deeper than a listing of records could encode."""
    value: list[Any] = []
    for _ in range(990):
        value = [value]
    return value


@task("test.raises_cancelled", kind="io")
async def raises_cancelled() -> None:
    """Raise CancelledError itself, as a library's own cancel leaking out would."""
    raise asyncio.CancelledError("the task's own")


@task("test.not_a_number", kind="io")
async def not_a_number() -> float:
    """Return what Python's json writes as NaN, which is not JSON."""
    return float("nan")


@task("test.typed", kind="io")
async def typed(
    n: int,
    ratio: float,
    name: str,
    flag: bool,
    items: list[int],
    table: dict[str, int],
    maybe: int | None = None,
) -> str:
    """Accept one argument of each checked type."""
    return "ok"


def _sync_redis() -> Any:
    import redis

    return redis.Redis.from_url(os.environ["COREFLEET_REDIS_URL"], decode_responses=True)


@task("test.cpu_hold", kind="cpu")
def cpu_hold(seconds: float, ctx: TaskContext) -> int:
    """Record this attempt and the child's pid, block ``seconds``, return the attempt."""
    client = _sync_redis()
    client.rpush(f"test:started:{ctx.job_id}", f"{ctx.attempt}:{os.getpid()}")
    time.sleep(seconds)  # sleep-ok: the point of the task: keep a worker child busy
    return ctx.attempt


@task("test.cpu_die", kind="cpu", max_retries=2)
def cpu_die(ctx: TaskContext) -> None:
    """Kill the process running it, on every attempt."""
    _sync_redis().rpush(f"test:started:{ctx.job_id}", f"{ctx.attempt}:{os.getpid()}")
    os.kill(os.getpid(), signal.SIGKILL)


@task("test.cpu_boom", kind="cpu")
def cpu_boom(message: str) -> None:
    """Raise a KeyError in a worker process."""
    raise KeyError(message)


# --- heavy (Ray and Dask) ----------------------------------------------------------------


@task("test.ray_hold", kind="heavy")
def ray_hold(seconds: float, ctx: TaskContext) -> int:
    """Record this attempt, the Ray worker's pid and the actor it runs in (a warm runner's;
    None in a Ray task), block ``seconds``, return the attempt."""
    import ray

    actor = ray.get_runtime_context().get_actor_id()
    _sync_redis().rpush(f"test:started:{ctx.job_id}", f"{ctx.attempt}:{os.getpid()}:{actor}")
    time.sleep(seconds)  # sleep-ok: the point of the task: a running Ray task that ignores ctx
    return ctx.attempt


def _gate(ctx: TaskContext) -> int:
    """Record this attempt (``test:started:{job id}``, "attempt:pid"), hold until the test
    pushes ``test:release:{job id}``; the attempt number."""
    client = _sync_redis()
    client.rpush(f"test:started:{ctx.job_id}", f"{ctx.attempt}:{os.getpid()}")
    client.blpop([f"test:release:{ctx.job_id}"], timeout=120)
    return ctx.attempt


@task("test.ray_gate", kind="heavy", max_retries=0)
def ray_gate(ctx: TaskContext) -> int:
    """``_gate`` in a Ray task."""
    return _gate(ctx)


@task("test.ray_where", kind="heavy", max_retries=0)
def ray_where() -> dict[str, Any]:
    """Where this job runs: the Ray actor (a warm runner; None in a Ray task) and the pid."""
    import ray

    return {"actor": ray.get_runtime_context().get_actor_id(), "pid": os.getpid()}


@task("test.ray_note", kind="heavy")
def ray_note(label: str) -> None:
    """Append ``label`` to ``test:ray-order``: the order Ray jobs ran in."""
    _sync_redis().rpush("test:ray-order", label)


@task("test.ray_boom", kind="heavy")
def ray_boom(message: str) -> None:
    """Raise an OverflowError inside a Ray task."""
    raise OverflowError(message)


@task("test.dask_gate", kind="heavy", engine="dask")
def dask_gate(ctx: TaskContext) -> int:
    """``_gate`` in a Dask task."""
    return _gate(ctx)


@task("test.dask_stubborn", kind="heavy", engine="dask")
def dask_stubborn(seconds: float, ctx: TaskContext) -> int:
    """Record "attempt:pid" and block ``seconds``, never looking at ``ctx.cancelled()``."""
    _sync_redis().rpush(f"test:started:{ctx.job_id}", f"{ctx.attempt}:{os.getpid()}")
    time.sleep(seconds)  # sleep-ok: the point of the task: a Dask task that ignores ctx
    return ctx.attempt


@task("test.dask_boom", kind="heavy", engine="dask")
def dask_boom(message: str) -> None:
    """Raise a LookupError inside a Dask task."""
    raise LookupError(message)


@task("test.dask_until_cancelled", kind="heavy", engine="dask")
def dask_until_cancelled(ctx: TaskContext) -> str:
    """Poll ``ctx.cancelled()`` on a Dask worker; record when it turns true."""
    client = _sync_redis()
    client.rpush(f"test:started:{ctx.job_id}", str(os.getpid()))
    deadline = time.monotonic() + 60
    while not ctx.cancelled() and time.monotonic() < deadline:
        time.sleep(0.02)  # sleep-ok: the cooperative-cancel loop a Dask task is expected to run
    client.rpush(f"test:saw_cancel:{ctx.job_id}", str(ctx.cancelled()))
    return "stopped"


@task("test.gpu_env", kind="gpu")
def gpu_env() -> dict[str, Any]:
    """Which device this gpu worker child was pinned to, and which child it is."""
    return {
        "device": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "order": os.environ.get("CUDA_DEVICE_ORDER"),
        "pid": os.getpid(),
    }


# --- progress reports --------------------------------------------------------------------


@task("test.io_progress", kind="io")
async def io_progress(message: str, ctx: TaskContext) -> bool:
    """Once the test says go, report half done with ``message``, say so, and wait for
    release; returns whether the report was recorded."""
    await _redis().blpop([f"test:go:{ctx.job_id}"], timeout=120)
    recorded = await ctx.progress(0.5, message)
    await _redis().rpush(f"test:started:{ctx.job_id}", ctx.attempt)
    await _redis().blpop([f"test:release:{ctx.job_id}"], timeout=120)
    return recorded


def _sync_progress(ctx: TaskContext) -> bool:
    recorded = bool(ctx.progress(0.25, f"a quarter, pid {os.getpid()}"))
    client = _sync_redis()
    client.rpush(f"test:started:{ctx.job_id}", f"{ctx.attempt}:{os.getpid()}")
    client.blpop([f"test:release:{ctx.job_id}"], timeout=120)
    return recorded


@task("test.cpu_progress", kind="cpu")
def cpu_progress(ctx: TaskContext) -> bool:
    """``_sync_progress`` in a Celery worker child."""
    return _sync_progress(ctx)


@task("test.ray_progress", kind="heavy")
def ray_progress(ctx: TaskContext) -> bool:
    """``_sync_progress`` in a Ray task."""
    return _sync_progress(ctx)


@task("test.bad_progress", kind="io")
async def bad_progress(fraction: float, ctx: TaskContext) -> None:
    """Report a progress ``fraction`` that may be out of range."""
    await ctx.progress(fraction)


# --- retries -----------------------------------------------------------------------------


@task("test.flaky", kind="io", max_retries=3, retry_on=(ConnectionError,), retry_backoff_s=0.05)
async def flaky(fail_times: int, ctx: TaskContext) -> int:
    """Raise ConnectionError on the first ``fail_times`` attempts; then return the attempt."""
    if ctx.attempt <= fail_times:
        raise ConnectionError(f"attempt {ctx.attempt} failed")
    return ctx.attempt


@task("test.not_retryable", kind="io", retry_on=(ConnectionError,), retry_backoff_s=0.05)
async def not_retryable() -> None:
    """Raise an error its declaration does not retry."""
    raise KeyError("not a connection problem")


@task("test.retry_later", kind="io", max_retries=1)
async def retry_later(delay_s: float, ctx: TaskContext) -> int:
    """Ask to be run again ``delay_s`` later, once; then return the attempt."""
    if ctx.attempt == 1:
        raise Retry("not yet", delay_s=delay_s)
    return ctx.attempt


@task("test.cpu_flaky", kind="cpu", retry_on=(ConnectionError,), retry_backoff_s=0.05)
def cpu_flaky(fail_times: int, ctx: TaskContext) -> int:
    """``test.flaky`` in a Celery worker child."""
    if ctx.attempt <= fail_times:
        raise ConnectionError(f"attempt {ctx.attempt} failed")
    return ctx.attempt


@task("test.ray_flaky", kind="heavy", retry_on=(ConnectionError,), retry_backoff_s=0.05)
def ray_flaky(fail_times: int, ctx: TaskContext) -> int:
    """``test.flaky`` in a Ray task."""
    if ctx.attempt <= fail_times:
        raise ConnectionError(f"attempt {ctx.attempt} failed")
    return ctx.attempt


@task("test.dask_retry_now", kind="heavy", engine="dask")
def dask_retry_now(ctx: TaskContext) -> int:
    """Ask to be run again at once, once; then return the attempt."""
    if ctx.attempt == 1:
        raise Retry("again", delay_s=0)
    return ctx.attempt


@task("test.io_gate", kind="io")
async def io_gate(ctx: TaskContext) -> None:
    """Hold its io worker's slot until the test pushes ``test:release:{job id}``."""
    await _redis().blpop([f"test:release:{ctx.job_id}"], timeout=120)


class LocalGate:
    """For an io worker in the test's own process: opened without Redis."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()  # set by the test to let the task end
        self.cancelled = asyncio.Event()


#: Per job id, for ``test.local_gate``.
LOCAL_GATES: dict[str, LocalGate] = {}


@task("test.local_gate", kind="io")
async def local_gate(ctx: TaskContext) -> int:
    """Hold until the test opens this job's ``LOCAL_GATES`` entry; the attempt number."""
    gate = LOCAL_GATES.setdefault(ctx.job_id, LocalGate())
    gate.started.set()
    try:
        await gate.release.wait()
    except asyncio.CancelledError:
        gate.cancelled.set()
        raise
    return ctx.attempt


@task("test.note", kind="io")
async def note(label: str) -> None:
    """Append ``label`` to ``test:order``: the order jobs ran in."""
    await _redis().rpush("test:order", label)


@task("test.cpu_gate", kind="cpu")
def cpu_gate(ctx: TaskContext) -> None:
    """Hold its Celery child until the test pushes ``test:release:{job id}``."""
    _sync_redis().blpop([f"test:release:{ctx.job_id}"], timeout=120)


@task("test.cpu_note", kind="cpu")
def cpu_note(label: str) -> None:
    """Append ``label`` to ``test:order`` from a Celery child."""
    _sync_redis().rpush("test:order", label)


@task("test.dask_hold", kind="heavy", engine="dask")
def dask_hold(seconds: float) -> float:
    """Block a Dask worker ``seconds``; return them."""
    time.sleep(seconds)  # sleep-ok: the point of the task: a Dask task that takes time
    return seconds


@task("test.urgent_note", kind="io", priority="high")
async def urgent_note(label: str) -> None:
    """``test.note`` whose jobs are high priority unless they say otherwise."""
    await _redis().rpush("test:order", label)


@task("test.ctx_first", kind="io")
async def ctx_first(ctx: TaskContext, n: int, label: str = "-") -> list[Any]:
    """``ctx`` first, as arq's tasks and Celery's bound tasks take it."""
    return [ctx.attempt, n, label]


@task("test.progress_from_a_thread", kind="io")
async def progress_from_a_thread(ctx: TaskContext) -> list[Any]:
    """Report progress from a thread this async task hands work to; what the report
    returned there, and the progress the record holds the moment the thread is done."""
    recorded = await asyncio.to_thread(lambda: bool(ctx.progress(0.5, "from a thread")))
    stored = await _redis().hget(f"cf:job:{ctx.job_id}", "progress")
    return [recorded, stored]


@task("test.odd_defaults", kind="io")
async def odd_defaults(every: float = float("inf"), when: object = timedelta(seconds=5)) -> None:
    """Defaults that JSON has no form for."""


@task("test.cpu_native_loop", kind="cpu")
def cpu_native_loop(ctx: TaskContext) -> int:
    """Record this attempt, then run minutes in C (sum over an iterator never returns to
    the bytecode loop, where Python-level signal handlers run)."""
    _sync_redis().rpush(f"test:started:{ctx.job_id}", f"{ctx.attempt}:{os.getpid()}")
    return sum(itertools.repeat(1, 10**12))


@task("test.cpu_retry_then_hold", kind="cpu", max_retries=2)
def cpu_retry_then_hold(ctx: TaskContext) -> int:
    """Ask for a retry at once on the first attempt; then ``_gate``."""
    if ctx.attempt == 1:
        raise Retry("once more", delay_s=0)
    return _gate(ctx)


@task("test.cpu_slow_first", kind="cpu")
def cpu_slow_first(ctx: TaskContext) -> int:
    """Record this attempt; the first then blocks for a minute (past any short time limit),
    later ones return the attempt at once."""
    _sync_redis().rpush(f"test:started:{ctx.job_id}", f"{ctx.attempt}:{os.getpid()}")
    if ctx.attempt == 1:
        time.sleep(60)  # sleep-ok: the point of the task: a first attempt past its limit
    return ctx.attempt


@task("test.cpu_held_until_released", kind="cpu")
def cpu_held_until_released(ctx: TaskContext) -> int:
    """``_gate`` in a Celery child."""
    return _gate(ctx)


@task("test.sync_io_until_cancelled", kind="io")
def sync_io_until_cancelled(ctx: TaskContext) -> None:
    """A plain-def io task (a thread of the io worker) that polls ``ctx.cancelled()``; it
    pushes ``test:saw-cancel:{job id}`` once it sees the cancel."""
    client = _sync_redis()
    client.rpush(f"test:started:{ctx.job_id}", ctx.attempt)
    deadline = time.monotonic() + 30
    while not ctx.cancelled() and time.monotonic() < deadline:
        time.sleep(0.05)  # sleep-ok: the point of the task: a loop that polls for its cancel
    if ctx.cancelled():
        client.rpush(f"test:saw-cancel:{ctx.job_id}", 1)
