"""Bench-only corefleet tasks, loaded with ``COREFLEET_TASK_MODULES=bench.bench_tasks``.

* ``bench.noop``: returns 1 at once, so a run measures only the machinery around a job.
* ``bench.burn``: a pure-Python loop that keeps one core busy for a set number of
  iterations (the ``cpu`` benchmark calibrates ``loops`` so that one call takes ~0.2 s).

``burn_loop`` is the plain function behind ``bench.burn``; the process-pool baseline and
the calibration call it directly, so every system runs exactly the same code.
"""

from __future__ import annotations

from tasks import task


def burn_loop(loops: int) -> int:
    """Spin for ``loops`` iterations of integer arithmetic; a small checksum comes back."""
    acc = 0
    for i in range(loops):
        acc = (acc + i * i) % 1_000_003
    return acc


@task("bench.noop", kind="cpu", max_retries=0)
def noop() -> int:
    """Do nothing; the result is 1."""
    return 1


@task("bench.burn", kind="cpu", timeout_s=600, max_retries=0)
def burn(loops: int) -> int:
    """Keep one core busy for ``loops`` iterations (see ``burn_loop``)."""
    return burn_loop(loops)
