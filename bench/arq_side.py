"""arq's side of the io benchmark; runs in ``bench/.venv-arq`` (arq 0.28 pins redis-py < 6).

    python bench/arq_side.py worker  --redis-port P [--max-jobs 1000 --poll-delay 0.01]
    python bench/arq_side.py produce --redis-port P --n 10000 [--concurrency 64]

``worker`` runs one arq worker with a no-op ``echo`` task. ``produce`` enqueues N jobs with
``ArqRedis.enqueue_job`` (``--concurrency`` calls in flight) and counts arq's result keys
as they are written, through Redis keyspace notifications for string ``set`` commands
(which the benchmark turns on for this run), so "done" is the moment the last result is
stored; nothing is polled. It prints one JSON line. This file imports only arq and the
standard library: it must not import corefleet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from arq.constants import result_key_prefix
from arq.worker import Worker

SET_EVENTS = "__keyevent@0__:set"


async def echo(ctx: dict[str, Any], value: Any) -> Any:
    return value


def worker(args: argparse.Namespace) -> None:
    # WARNING, not INFO: arq logs two lines per job at INFO, and corefleet logs none.
    logging.basicConfig(level=logging.WARNING)
    Worker(
        functions=[echo],
        redis_settings=RedisSettings(host="127.0.0.1", port=args.redis_port),
        max_jobs=args.max_jobs,
        poll_delay=args.poll_delay,
        handle_signals=True,
    ).run()


class Counter:
    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.done = asyncio.Event()
        self.done_at = 0.0

    def reset(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.done.clear()

    def on_key(self, key: str) -> None:
        if key.startswith(result_key_prefix):
            self.count += 1
            if self.count >= self.target:
                self.done_at = time.perf_counter()
                self.done.set()


async def listen(pool: Any, counter: Counter, ready: asyncio.Event) -> None:
    pubsub = pool.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(SET_EVENTS)
    ready.set()
    while True:
        message = await pubsub.get_message(timeout=None)
        if message is not None and message["type"] == "message":
            data = message["data"]
            counter.on_key(data.decode() if isinstance(data, bytes) else data)


async def enqueue_all(pool: Any, n: int, concurrency: int) -> list[str]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> str:
        async with gate:
            job = await pool.enqueue_job("echo", 1)
            if job is None:
                raise RuntimeError("enqueue_job returned None")
            return str(job.job_id)

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def produce_async(args: argparse.Namespace) -> dict[str, Any]:
    cpu0 = time.process_time()
    pool = await create_pool(RedisSettings(host="127.0.0.1", port=args.redis_port))
    counter = Counter()
    ready = asyncio.Event()
    listener = asyncio.create_task(listen(pool, counter, ready))
    await ready.wait()
    if args.warmup:
        counter.reset(args.warmup)
        await enqueue_all(pool, args.warmup, args.concurrency)
        await asyncio.wait_for(counter.done.wait(), args.timeout)
    counter.reset(args.n)
    started = time.perf_counter()
    ids = await enqueue_all(pool, args.n, args.concurrency)
    submitted = time.perf_counter()
    await asyncio.wait_for(counter.done.wait(), args.timeout)
    wall = counter.done_at - started
    listener.cancel()
    good = 0
    for start in range(0, len(ids), 1000):
        good += await pool.exists(*(result_key_prefix + i for i in ids[start : start + 1000]))
    await pool.aclose()
    return {
        "system": "arq",
        "n": args.n,
        "concurrency": args.concurrency,
        "wall_s": wall,
        "submit_s": submitted - started,
        "jobs_per_s": args.n / wall,
        "producer_cpu_s": time.process_time() - cpu0,
        "submit_jobs_per_s": args.n / (submitted - started),
        "result_events": counter.count,
        "verified_results": good,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--redis-port", type=int, required=True)
    w.add_argument("--max-jobs", type=int, default=1000)
    w.add_argument("--poll-delay", type=float, default=0.01)
    p = sub.add_parser("produce")
    p.add_argument("--redis-port", type=int, required=True)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    if args.command == "worker":
        worker(args)
    else:
        print(json.dumps(asyncio.run(produce_async(args))), flush=True)


if __name__ == "__main__":
    main()
