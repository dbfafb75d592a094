"""corefleet's side of the io benchmark: submit N io.echo jobs over HTTP, time until all
have succeeded, and print one JSON line.

It subscribes to ``cf:events`` before the first submit and counts ``succeeded`` events, so
"done" is the moment the last result is stored and published; nothing is polled.
Submission modes:

* ``batch``: ``POST /v1/jobs/batch`` with ``--batch-size`` jobs a request,
  ``--concurrency`` requests in flight;
* ``single``: one ``POST /v1/jobs`` a job, ``--concurrency`` requests in flight.

Runs in the project venv; started as a process of its own by ``bench.io_e2e``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis

EVENTS = "cf:events"
JOB = {"task": "io.echo", "args": [1]}


#: States a job is not finished in: a retrying job runs again.
_NOT_ENDED = ("queued", "running", "retrying")


class Counter:
    def __init__(self) -> None:
        self.succeeded = 0
        self.other_terminal = 0
        self.target = 0
        self.done = asyncio.Event()
        self.done_at = 0.0

    def reset(self, target: int) -> None:
        self.succeeded = self.other_terminal = 0
        self.target = target
        self.done.clear()

    def on_message(self, data: str) -> None:
        # Cheap test instead of a JSON parse: the producer shares the CPUs it measures.
        if '"state":"succeeded"' in data:
            self.succeeded += 1
        elif any(f'"state":"{state}"' in data for state in _NOT_ENDED):
            return
        else:
            self.other_terminal += 1
        if self.succeeded + self.other_terminal >= self.target:
            self.done_at = time.perf_counter()
            self.done.set()


async def listen(redis: aioredis.Redis, counter: Counter, ready: asyncio.Event) -> None:
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(EVENTS)
    ready.set()
    while True:
        message = await pubsub.get_message(timeout=None)
        if message is not None and message["type"] == "message":
            counter.on_message(message["data"])


async def submit_all(
    session: aiohttp.ClientSession, url: str, n: int, mode: str, batch_size: int, concurrency: int
) -> list[str]:
    ids: list[str] = []
    gate = asyncio.Semaphore(concurrency)

    async def post(path: str, body: Any) -> Any:
        async with gate, session.post(url + path, json=body) as resp:
            payload = await resp.json()
            if resp.status != 202:
                raise RuntimeError(f"POST {path} answered {resp.status}: {payload}")
            return payload

    if mode == "batch":
        sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
        replies = await asyncio.gather(
            *(post("/v1/jobs/batch", {"jobs": [JOB] * size}) for size in sizes)
        )
        for reply in replies:
            ids.extend(job["id"] for job in reply["jobs"])
    else:
        replies = await asyncio.gather(*(post("/v1/jobs", JOB) for _ in range(n)))
        ids.extend(job["id"] for job in replies)
    return ids


async def check_results(redis: aioredis.Redis, ids: list[str]) -> int:
    """How many of ``ids`` are stored as succeeded with result 1."""
    good = 0
    for start in range(0, len(ids), 1000):
        pipe = redis.pipeline(transaction=False)
        for job_id in ids[start : start + 1000]:
            pipe.hmget(f"cf:job:{job_id}", ["state", "result"])
        for state, result in await pipe.execute():
            good += state == "succeeded" and result == "1"
    return good


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    cpu0 = time.process_time()
    redis = aioredis.Redis.from_url(args.redis_url, decode_responses=True)
    counter = Counter()
    ready = asyncio.Event()
    listener = asyncio.create_task(listen(redis, counter, ready))
    await ready.wait()
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        if args.warmup:
            counter.reset(args.warmup)
            await submit_all(
                session, args.url, args.warmup, args.mode, args.batch_size, args.concurrency
            )
            await asyncio.wait_for(counter.done.wait(), args.timeout)
        counter.reset(args.n)
        started = time.perf_counter()
        ids = await submit_all(
            session, args.url, args.n, args.mode, args.batch_size, args.concurrency
        )
        submitted = time.perf_counter()
        await asyncio.wait_for(counter.done.wait(), args.timeout)
    wall = counter.done_at - started
    listener.cancel()
    good = await check_results(redis, ids)
    await redis.aclose()
    return {
        "system": "corefleet",
        "n": args.n,
        "mode": args.mode,
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "wall_s": wall,
        "submit_s": submitted - started,
        "jobs_per_s": args.n / wall,
        "producer_cpu_s": time.process_time() - cpu0,
        "submit_jobs_per_s": args.n / (submitted - started),
        "succeeded_events": counter.succeeded,
        "other_terminal_events": counter.other_terminal,
        "verified_results": good,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--mode", choices=("batch", "single"), default="batch")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args))), flush=True)


if __name__ == "__main__":
    main()
