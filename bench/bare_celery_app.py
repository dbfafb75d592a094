"""The bare-Celery baseline of the ``cpu`` benchmark: a plain Celery app and its producer.

The app uses the benchmark's Redis (``BENCH_REDIS_URL``) as broker and as result backend,
JSON only, queue ``bare``, one no-op task. By default it matches what corefleet's Celery
app sets for a fair comparison (``task_acks_late``, ``worker_prefetch_multiplier=1``);
``BENCH_BARE_CONFIG=default`` leaves Celery's defaults (early acks, prefetch 4). Worker
events are off, as in any Celery app that does not ask for them.

Worker (started by ``bench.cpu``)::

    BENCH_REDIS_URL=redis://127.0.0.1:6379/0 python -m celery -A bench.bare_celery_app \
        worker -P prefork -c 2 -Q bare --without-mingle --without-gossip -l WARNING

Producer: ``python bench/bare_celery_app.py produce --n 3000`` calls ``apply_async`` N times,
then waits for every result with a ``ResultSet`` (Redis pub/sub, no polling), and prints
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from celery import Celery
from celery.result import ResultSet

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
MATCHED = os.environ.get("BENCH_BARE_CONFIG", "matched") != "default"

app = Celery("bare", broker=REDIS_URL, backend=REDIS_URL, set_as_current=True)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue="bare",
    broker_connection_retry_on_startup=True,
    enable_utc=True,
)
if MATCHED:
    app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1)


@app.task(name="bench.bare_noop")  # type: ignore[untyped-decorator]  # celery
def bare_noop() -> int:
    return 1


def run_batch(n: int, timeout: float) -> tuple[float, float, list[Any]]:
    started = time.perf_counter()
    results = [bare_noop.apply_async() for _ in range(n)]
    submitted = time.perf_counter()
    values = ResultSet(results).get(timeout=timeout)
    return submitted - started, time.perf_counter() - started, list(values)


def produce(args: argparse.Namespace) -> dict[str, Any]:
    cpu0 = time.process_time()
    if args.warmup:
        run_batch(args.warmup, args.timeout)
    submit_s, wall_s, values = run_batch(args.n, args.timeout)
    return {
        "system": "bare-celery",
        "n": args.n,
        "config": "matched" if MATCHED else "default",
        "wall_s": wall_s,
        "submit_s": submit_s,
        "jobs_per_s": args.n / wall_s,
        "submit_jobs_per_s": args.n / submit_s,
        "verified_results": sum(1 for v in values if v == 1),
        "producer_cpu_s": time.process_time() - cpu0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prod = sub.add_parser("produce", help="submit N no-op tasks and wait for all results")
    prod.add_argument("--n", type=int, default=3000)
    prod.add_argument("--warmup", type=int, default=200)
    prod.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    print(json.dumps(produce(args)), flush=True)


if __name__ == "__main__":
    main()
