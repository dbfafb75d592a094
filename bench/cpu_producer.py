"""corefleet's side of the cpu benchmark: submit N jobs of one task, time until all succeeded.

Like ``bench/cf_producer.py`` but for any task: it subscribes to ``cf:events`` before the
first submit, submits with ``POST /v1/jobs/batch`` (``--batch-size`` jobs a request,
``--concurrency`` requests in flight) and counts ``succeeded`` events, so "done" is the
moment the last result is stored and published. Afterwards it reads every job record back
(state, result, run time from ``started_at``/``finished_at``) and prints one JSON line.

Runs in the project venv; started as a process of its own by ``bench.cpu``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from datetime import datetime
from typing import Any

import aiohttp
import redis.asyncio as aioredis

# A sibling script (this file runs as ``python bench/cpu_producer.py``): the same counting
# of ``succeeded`` events as the io benchmark's producer.
from cf_producer import Counter, listen


async def submit_all(
    session: aiohttp.ClientSession,
    url: str,
    job: dict[str, Any],
    n: int,
    batch_size: int,
    concurrency: int,
) -> list[str]:
    gate = asyncio.Semaphore(concurrency)

    async def post(size: int) -> list[str]:
        async with gate, session.post(url + "/v1/jobs/batch", json={"jobs": [job] * size}) as resp:
            payload = await resp.json()
            if resp.status != 202:
                raise RuntimeError(f"POST /v1/jobs/batch answered {resp.status}: {payload}")
            return [item["id"] for item in payload["jobs"]]

    sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    replies = await asyncio.gather(*(post(size) for size in sizes))
    return [job_id for reply in replies for job_id in reply]


async def check_results(
    redis: aioredis.Redis, ids: list[str], expect: Any
) -> tuple[int, list[float], list[float], set[str]]:
    """Verified results, run times (s), idle gaps between consecutive jobs of one worker
    child (s), and the workers that ran the jobs."""
    good, run_times = 0, []
    spans: dict[str, list[tuple[datetime, datetime]]] = {}
    for start in range(0, len(ids), 1000):
        pipe = redis.pipeline(transaction=False)
        for job_id in ids[start : start + 1000]:
            pipe.hgetall(f"cf:job:{job_id}")
        for raw in await pipe.execute():
            if raw.get("state") == "succeeded" and json.loads(raw.get("result", "null")) == expect:
                good += 1
            try:
                began = datetime.fromisoformat(raw["started_at"])
                ended = datetime.fromisoformat(raw["finished_at"])
            except (KeyError, ValueError):
                continue
            run_times.append((ended - began).total_seconds())
            spans.setdefault(raw.get("worker", "?"), []).append((began, ended))
    gaps: list[float] = []
    for runs in spans.values():
        runs.sort()
        gaps.extend((b[0] - a[1]).total_seconds() for a, b in itertools.pairwise(runs))
    return good, run_times, gaps, set(spans)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    cpu0 = time.process_time()
    job = {"task": args.task, "args": json.loads(args.args)}
    expect = json.loads(args.expect)
    redis = aioredis.Redis.from_url(args.redis_url, decode_responses=True)
    counter = Counter()
    ready = asyncio.Event()
    listener = asyncio.create_task(listen(redis, counter, ready))
    await ready.wait()
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        if args.warmup:
            counter.reset(args.warmup)
            await submit_all(session, args.url, job, args.warmup, args.batch_size, args.concurrency)
            await asyncio.wait_for(counter.done.wait(), args.timeout)
        counter.reset(args.n)
        started = time.perf_counter()
        ids = await submit_all(session, args.url, job, args.n, args.batch_size, args.concurrency)
        submitted = time.perf_counter()
        await asyncio.wait_for(counter.done.wait(), args.timeout)
    wall = counter.done_at - started
    listener.cancel()
    good, run_times, gaps, workers = await check_results(redis, ids, expect)
    await redis.aclose()
    return {
        "system": "corefleet",
        "task": args.task,
        "n": args.n,
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "wall_s": wall,
        "submit_s": submitted - started,
        "jobs_per_s": args.n / wall,
        "submit_jobs_per_s": args.n / (submitted - started),
        "producer_cpu_s": time.process_time() - cpu0,
        "succeeded_events": counter.succeeded,
        "other_terminal_events": counter.other_terminal,
        "verified_results": good,
        "job_run_s_mean": statistics.fmean(run_times) if run_times else None,
        "job_run_s_max": max(run_times) if run_times else None,
        "workers_seen": len(workers),
        # Idle time of a worker child between two jobs (ms resolution): dispatch overhead.
        "gap_s_mean": statistics.fmean(gaps) if gaps else None,
        "gap_s_max": max(gaps) if gaps else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--task", default="bench.noop")
    parser.add_argument("--args", default="[]", help="the task's positional arguments, JSON")
    parser.add_argument("--expect", default="1", help="every job's expected result, JSON")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args))), flush=True)


if __name__ == "__main__":
    main()
