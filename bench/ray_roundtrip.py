"""Benchmark: a no-op heavy job's round trip through the gateway vs bare Ray.

corefleet: ``POST /v1/jobs?wait=`` for ``bench.heavy_noop`` (submit and result in one
request; compared with the target), and ``POST`` then ``GET /v1/jobs/{id}?wait=`` (two
requests), one job at a time on a keep-alive connection, against a gateway subprocess with
its own local Ray (2 CPUs); for comparison, ``bench.io_noop`` through the same gateway (its
embedded io worker): corefleet's own path (HTTP, the store, a stream, the runner's two
writes, the event back) without Ray. Bare: ``ray.get(f.remote())`` for a no-op function, one at a
time, from this process on its own local Ray (2 CPUs): with Ray's defaults (the target's
baseline), and with task events off (``enable_task_events=False``), as corefleet launches
its runner tasks. The bare Ray starts after the gateway has stopped, so the two never
share the machine.

The corefleet variants take turns in blocks of ``--block`` round trips, so a slower or
faster spell of the machine falls on both alike; the two bare variants run one after the
other. Each system gets the same warm-up first (long enough for Ray to grow its worker
pool); medians are compared.

After the timed turns, ``--cpu-n`` more round trips of the target's two systems (one
request through the gateway; bare Ray with its defaults) are run while every process of
each system is watched: the CPU each group of processes spends per round trip (the
gateway, Ray's dispatcher, Ray's workers, Ray's own daemons, Redis, this process). On a
machine of few cores that CPU is what the round trip waits for.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.common import (
    RedisServer,
    cpu_by_role,
    free_port,
    http_ok,
    machine_info,
    print_table,
    tree_cpu,
)
from bench.ray_pi import GatewayClient, heavy_gateway

NAME = "ray-roundtrip"
HELP = "no-op heavy job round trip via the gateway vs bare ray.get(f.remote())"
TARGET = 2.0  # corefleet / bare, at most

ONE_TRIP = "corefleet (POST ?wait)"
TWO_TRIPS = "corefleet (POST, GET ?wait)"
IO_TRIP = "corefleet io no-op, no Ray (POST ?wait)"
BARE = "bare ray.get(f.remote())"
BARE_NO_EVENTS = "bare, task events off"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=300, help="round trips per system (300)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up round trips (200)")
    parser.add_argument("--block", type=int, default=25, help="round trips per turn (25)")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of each local Ray (2)")
    parser.add_argument(
        "--cpu-n", type=int, default=1000, help="round trips per system watched for CPU (1000)"
    )


def _noop() -> int:
    return 1


def _role(pid: int, command: str) -> str:
    """Which part of a system a process is, by its command line (this process by its pid:
    the bench may be started as ``-m bench`` or as ``bench/run.py``)."""
    if pid == os.getpid():
        return "this process (client / driver)"
    if "RayDispatcherActor" in command:
        return "Ray's dispatcher (actor)"
    if command.startswith("ray::"):  # Ray's workers name themselves after what they run
        return "Ray workers"
    if "clients.cli gateway" in command:
        return "gateway"
    if "ray_keeper" in command:
        return "Ray's keeper"
    if "redis-server" in command:
        return "Redis"
    return "Ray's daemons (raylet, GCS, agents)"


def _cpu_per_call(roots: list[int], call: Callable[[], object], n: int) -> dict[str, float]:
    """CPU milliseconds per call of ``call``, by role, over ``n`` calls: every process of
    the trees under ``roots`` is counted."""

    def reading() -> dict[int, tuple[str, float]]:
        return {pid: got for root in roots for pid, got in tree_cpu(root).items()}

    before = reading()
    for _ in range(n):
        call()
    used = cpu_by_role(before, reading(), _role)
    return {role: seconds * 1000 / n for role, seconds in sorted(used.items()) if seconds > 0}


def _measure(
    systems: dict[str, Callable[[], object]], n: int, warmup: int, block: int
) -> dict[str, list[float]]:
    """Round-trip times per system: the same warm-up each, then turns of ``block``."""
    for call in systems.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in systems}
    while any(len(got) < n for got in times.values()):
        for name, call in systems.items():
            for _ in range(min(block, n - len(times[name]))):
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
    return times


def _corefleet(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, float]]:
    with RedisServer() as redis:
        port = free_port()
        with heavy_gateway(redis.url, port, args.ray_cpus) as gateway:
            gateway.wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 60)
            client = GatewayClient(port)
            try:
                systems: dict[str, Callable[[], object]] = {
                    ONE_TRIP: lambda: client.run_in_one_trip("bench.heavy_noop"),
                    TWO_TRIPS: lambda: client.run("bench.heavy_noop"),
                    IO_TRIP: lambda: client.run_in_one_trip("bench.io_noop"),
                }
                times = _measure(systems, args.n, args.warmup, args.block)
                roots = [gateway.pid, redis.pid, os.getpid()]
                return times, _cpu_per_call(roots, systems[ONE_TRIP], args.cpu_n)
            finally:
                client.close()


def _bare(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, float]]:
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
        quiet = noop.options(enable_task_events=False)
        # One after the other: a Ray that records task events for one variant would also
        # be busy flushing them while the other runs.
        times = _measure({BARE: lambda: ray.get(noop.remote())}, args.n, args.warmup, args.n)
        quiet_times = _measure(
            {BARE_NO_EVENTS: lambda: ray.get(quiet.remote())}, args.n, args.warmup, args.n
        )
        # This process is the driver, and the local Ray's processes are its children.
        cpu = _cpu_per_call([os.getpid()], lambda: ray.get(noop.remote()), args.cpu_n)
        return times | quiet_times, cpu
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
    times, cpu = _corefleet(args)
    bare_times, bare_cpu = _bare(args)
    times |= bare_times
    summary = {name: _summary(got) for name, got in times.items()}
    ratio = summary[ONE_TRIP]["median_ms"] / summary[BARE]["median_ms"]
    print_table(
        f"no-op round trip, {args.n} sequential per system in turns of {args.block}, "
        f"Ray {args.ray_cpus} CPUs",
        ["system", "median_ms", "p90_ms", "mean_ms"],
        [{"system": name, **numbers} for name, numbers in summary.items()],
    )
    mark = "meets" if ratio <= TARGET else "ABOVE"
    two = summary[TWO_TRIPS]["median_ms"] / summary[BARE]["median_ms"]
    quiet = summary[ONE_TRIP]["median_ms"] / summary[BARE_NO_EVENTS]["median_ms"]
    plumbing = summary[IO_TRIP]["median_ms"] / summary[BARE]["median_ms"]
    print(
        f"corefleet / bare: {ratio:.2f} ({mark} target <= {TARGET:g}); with two requests: "
        f"{two:.2f}; against bare with task events off too: {quiet:.2f}"
    )
    print(
        f"corefleet's own path without Ray (an io no-op through the same gateway) / bare Ray: "
        f"{plumbing:.2f}"
    )
    print_table(
        f"CPU per round trip (ms), {args.cpu_n} round trips each, by process",
        ["system", "process", "cpu_ms"],
        [
            {"system": system, "process": role, "cpu_ms": ms}
            for system, used in ((ONE_TRIP, cpu), (BARE, bare_cpu))
            for role, ms in [*used.items(), ("all", sum(used.values()))]
        ],
    )
    return {
        "machine": info,
        "cpu_ms_per_round_trip": {ONE_TRIP: cpu, BARE: bare_cpu},
        "args": vars(args),
        "systems": summary,
        "ratio": ratio,
        "ratio_two_requests": two,
        "ratio_vs_bare_without_task_events": quiet,
        "io_noop_vs_bare": plumbing,
        "target": TARGET,
    }
