"""Tasks of the heavy benchmarks, loaded with ``COREFLEET_TASK_MODULES=bench.heavy_tasks``.

``bench.heavy_noop`` returns 1 at once from a Ray task, so a run measures only the
machinery around a heavy job: HTTP, Redis, the stream, the dispatcher and Ray.
``bench.io_noop`` does the same on the gateway's embedded io worker: the machinery without
Ray, for comparison.
"""

from __future__ import annotations

from tasks import task


@task("bench.heavy_noop", kind="heavy", max_retries=0)
def heavy_noop() -> int:
    """Do nothing on Ray; the result is 1."""
    return 1


@task("bench.io_noop", kind="io", max_retries=0)
async def io_noop() -> int:
    """Do nothing on the io worker; the result is 1."""
    return 1
