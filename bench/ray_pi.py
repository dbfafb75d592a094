"""Benchmark: ``heavy.pi`` through the gateway on a local Ray of 2 CPUs vs one process.

The gateway runs as a subprocess with ``COREFLEET_RAY_CPUS=2`` (its own local Ray, started
by a warm-up job). Each repeat posts ``heavy.pi(samples, chunks, seed)`` and holds
``GET /v1/jobs/{id}?wait=`` until it finishes: the time is the client's, end to end. The
baseline draws the same points in this process (runs alternate), chunk after chunk, with
the very function the Ray tasks run (``tasks.heavy.pi_chunk``), and the hit counts must agree.
The same chunks on a bare ``multiprocessing.Pool`` of as many processes as Ray has CPUs show
the machine's own ceiling for this work (memory and shared caches keep it under the CPU
count), so the speed-up can be read against what the hardware allows.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import time
from typing import Any

from bench.common import (
    PYTHON,
    Proc,
    RedisServer,
    free_port,
    http_ok,
    machine_info,
    median,
    print_table,
    verdict,
)

NAME = "ray-pi"
HELP = "heavy.pi on 2 Ray CPUs through the gateway vs the same samples in one process"
TARGET = 1.8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=200_000_000, help="points (200M)")
    parser.add_argument("--chunks", type=int, default=8, help="Ray tasks per job (8)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per system (5)")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray (2)")


def heavy_gateway(redis_url: str, port: int, ray_cpus: int) -> Proc:
    """A gateway whose heavy jobs run on its own local Ray of ``ray_cpus`` CPUs."""
    return Proc(
        "gateway-ray",
        [PYTHON, "-m", "clients.cli", "gateway"],
        env={
            "COREFLEET_REDIS_URL": redis_url,
            "COREFLEET_HOST": "127.0.0.1",
            "COREFLEET_PORT": str(port),
            "COREFLEET_RAY_CPUS": str(ray_cpus),
            "COREFLEET_TASK_MODULES": "bench.heavy_tasks",
            "COREFLEET_MAX_WAIT_S": "600",
            "COREFLEET_LOG_LEVEL": "WARNING",
            "RAY_AUTH_MODE": "disabled",
        },
    )


class GatewayClient:
    """One keep-alive HTTP connection: submit a job, then wait for its end."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=620)

    def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        payload = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        self.conn.request(method, path, body=payload, headers=headers)
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read())

    def run(self, task: str, *args: Any) -> dict[str, Any]:
        status, job = self._call("POST", "/v1/jobs", {"task": task, "args": list(args)})
        if status != 202:
            raise RuntimeError(f"POST {task} answered {status}: {job}")
        status, record = self._call("GET", f"/v1/jobs/{job['id']}?wait=600")
        if status != 200 or record["state"] != "succeeded":
            raise RuntimeError(f"{task} did not succeed: {record}")
        return dict(record)

    def run_in_one_trip(self, task: str, *args: Any) -> dict[str, Any]:
        """Submit and wait in one request: ``POST /v1/jobs?wait=``."""
        status, record = self._call("POST", "/v1/jobs?wait=600", {"task": task, "args": list(args)})
        if status != 200 or record["state"] != "succeeded":
            raise RuntimeError(f"{task} did not succeed: {status} {record}")
        return dict(record)

    def close(self) -> None:
        self.conn.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.heavy import pi_chunk, split

    info = machine_info()
    sizes = split(args.samples, args.chunks)
    seed = 11
    chunk_args = [(size, seed, i) for i, size in enumerate(sizes)]
    cf_times: list[float] = []
    base_times: list[float] = []
    pool_times: list[float] = []
    with (
        RedisServer() as redis,
        # All its processes start at once (a ProcessPoolExecutor starts them on demand, and
        # can go on with one when the first finishes each task before the next arrives).
        multiprocessing.get_context("fork").Pool(args.ray_cpus) as pool,
    ):
        port = free_port()
        with heavy_gateway(redis.url, port, args.ray_cpus) as gateway:
            gateway.wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 60)
            client = GatewayClient(port)
            try:
                started = time.perf_counter()
                client.run("heavy.pi", 1_000_000, args.chunks, 0)  # starts Ray, warms workers
                print(f"  warm-up (Ray start included): {time.perf_counter() - started:.1f} s")
                pool.starmap(pi_chunk, [(1000, 0, i) for i in range(args.ray_cpus)])  # imports
                pi_chunk(1000, 0, 0)  # and this process's own, so that no side starts cold
                # Alternating, so that load from elsewhere on the machine hits all alike.
                for rep in range(args.repeats):
                    t0 = time.perf_counter()
                    record = client.run("heavy.pi", args.samples, args.chunks, seed)
                    cf_times.append(time.perf_counter() - t0)
                    hits = record["result"]["hits"]
                    t0 = time.perf_counter()
                    base_hits = sum(pi_chunk(size, seed, i) for i, size in enumerate(sizes))
                    base_times.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    pool_hits = sum(pool.starmap(pi_chunk, chunk_args, chunksize=1))
                    pool_times.append(time.perf_counter() - t0)
                    if not base_hits == pool_hits == hits:  # every repeat counts the same
                        raise RuntimeError(
                            f"run {rep + 1}: hit counts differ: Ray {hits}, one process "
                            f"{base_hits}, pool {pool_hits}"
                        )
                    print(
                        f"  run {rep + 1}: corefleet {cf_times[-1]:.2f} s, "
                        f"one process {base_times[-1]:.2f} s, "
                        f"process pool {pool_times[-1]:.2f} s",
                        flush=True,
                    )
            finally:
                client.close()
    speedup = median(base_times) / median(cf_times)
    ceiling = median(base_times) / median(pool_times)
    rows = [
        {
            "system": f"corefleet heavy.pi, Ray {args.ray_cpus} CPUs",
            "median s": median(cf_times),
            "runs s": " / ".join(f"{t:.2f}" for t in cf_times),
        },
        {
            "system": "one process (same chunks)",
            "median s": median(base_times),
            "runs s": " / ".join(f"{t:.2f}" for t in base_times),
        },
        {
            "system": f"multiprocessing.Pool({args.ray_cpus}), no queue",
            "median s": median(pool_times),
            "runs s": " / ".join(f"{t:.2f}" for t in pool_times),
        },
    ]
    print_table(
        f"heavy.pi, {args.samples:,} samples in {args.chunks} chunks",
        ["system", "median s", "runs s"],
        rows,
    )
    print(f"speed-up: {verdict(speedup, TARGET)}")
    print(
        f"this machine's own ceiling (the same chunks on a bare process pool): {ceiling:.2f}; "
        f"corefleet reaches {speedup / ceiling:.0%} of it"
    )
    return {
        "machine": info,
        "args": vars(args),
        "hits": hits,
        "corefleet_s": cf_times,
        "one_process_s": base_times,
        "process_pool_s": pool_times,
        "speedup": speedup,
        "ceiling": ceiling,
        "target": TARGET,
    }
