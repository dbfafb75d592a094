"""Benchmark: a no-op heavy job's round trip through the gateway vs bare Ray.

corefleet: ``POST /v1/jobs?wait=`` for ``bench.heavy_noop`` (submit and result in one
request; compared with the target), and ``POST`` then ``GET /v1/jobs/{id}?wait=`` (two
requests), alternating, one job at a time on a keep-alive connection, against a gateway
subprocess with its own local Ray (2 CPUs). Bare: ``ray.get(f.remote())`` for a no-op
function, one at a time, from this process on its own local Ray (2 CPUs), started after
the gateway has stopped so the two never share the machine. Both get the same warm-up;
medians are compared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from bench.common import RedisServer, free_port, http_ok, machine_info, print_table
from bench.ray_pi import GatewayClient, heavy_gateway

NAME = "ray-roundtrip"
HELP = "no-op heavy job round trip via the gateway vs bare ray.get(f.remote())"
TARGET = 2.0  # corefleet / bare, at most


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=300, help="round trips per system (300)")
    parser.add_argument("--warmup", type=int, default=30, help="warm-up round trips (30)")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray (2)")


def _noop() -> int:
    return 1


def _corefleet(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Round trips in one request, and in two (POST, then GET ?wait)."""
    one: list[float] = []
    two: list[float] = []
    with RedisServer() as redis:
        port = free_port()
        with heavy_gateway(redis.url, port, args.ray_cpus) as gateway:
            gateway.wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 60)
            client = GatewayClient(port)
            try:
                for i in range(args.warmup + args.n):
                    t0 = time.perf_counter()
                    client.run_in_one_trip("bench.heavy_noop")
                    t1 = time.perf_counter()
                    client.run("bench.heavy_noop")
                    if i >= args.warmup:
                        one.append(t1 - t0)
                        two.append(time.perf_counter() - t1)
            finally:
                client.close()
    return one, two


def _bare(args: argparse.Namespace) -> list[float]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    temp_dir = tempfile.mkdtemp(prefix="cf-bench-ray-", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=args.ray_cpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
    )
    try:
        noop = ray.remote(_noop)
        times: list[float] = []
        for i in range(args.warmup + args.n):
            t0 = time.perf_counter()
            ray.get(noop.remote())
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        return times
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_ms": statistics.median(times) * 1000,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000,
        "mean_ms": statistics.fmean(times) * 1000,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine_info()
    one, two = _corefleet(args)
    cf, cf_two = _summary(one), _summary(two)
    bare = _summary(_bare(args))
    ratio = cf["median_ms"] / bare["median_ms"]
    rows = [
        {"system": "corefleet (POST ?wait)", **cf},
        {"system": "corefleet (POST, GET ?wait)", **cf_two},
        {"system": "bare ray.get(f.remote())", **bare},
    ]
    print_table(
        f"no-op round trip, {args.n} sequential, Ray {args.ray_cpus} CPUs",
        ["system", "median_ms", "p90_ms", "mean_ms"],
        rows,
    )
    mark = "meets" if ratio <= TARGET else "ABOVE"
    print(
        f"corefleet / bare: {ratio:.2f} ({mark} target <= {TARGET:g}); "
        f"with two requests: {cf_two['median_ms'] / bare['median_ms']:.2f}"
    )
    return {
        "machine": info,
        "args": vars(args),
        "corefleet": cf,
        "corefleet_two_requests": cf_two,
        "bare": bare,
        "ratio": ratio,
        "target": TARGET,
    }
