"""Bench-only heavy task, loaded with ``COREFLEET_TASK_MODULES=bench.heavy_tasks``.

``bench.heavy_noop`` returns 1 at once from a Ray task, so a run measures only the
machinery around a heavy job: HTTP, Redis, the stream, the dispatcher and Ray.
"""

from __future__ import annotations

from tasks import task


@task("bench.heavy_noop", kind="heavy", max_retries=0)
def heavy_noop() -> int:
    """Do nothing on Ray; the result is 1."""
    return 1
