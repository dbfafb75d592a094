"""Benchmark 1: ``POST /v1/jobs`` throughput, corefleet's gateway vs a bare LPUSH handler.

Both servers run as subprocesses of the project interpreter against one Redis; the load
comes from ``wrk`` (C, one thread by default, so it takes little CPU from the servers)
with 64 connections posting ``{"task": "io.echo", "args": [1]}``. The gateway runs with
its embedded io worker off, so jobs only queue. Runs alternate between the two servers,
Redis is flushed before each run, and the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import urllib.request
from functools import partial
from typing import Any

from bench.common import (
    BENCH,
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

NAME = "submit"
HELP = "POST /v1/jobs req/s: corefleet gateway vs a bare aiohttp LPUSH handler (wrk)"
TARGET = 0.7
BODY = '{"task": "io.echo", "args": [1]}'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per server (3)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per server")


def gateway_proc(redis_url: str, port: int, embedded_worker: bool = False) -> Proc:
    return Proc(
        "gateway",
        [PYTHON, "-m", "clients.cli", "gateway"],
        env={
            "COREFLEET_REDIS_URL": redis_url,
            "COREFLEET_HOST": "127.0.0.1",
            "COREFLEET_PORT": str(port),
            "COREFLEET_EMBEDDED_IO_WORKER": "1" if embedded_worker else "0",
            "COREFLEET_LOG_LEVEL": "WARNING",
        },
    )


def bare_proc(redis_url: str, port: int) -> Proc:
    return Proc(
        "bare",
        [PYTHON, str(BENCH / "bare_lpush.py"), "--port", str(port), "--redis-url", redis_url],
    )


def post_once(url: str) -> int:
    request = urllib.request.Request(
        url, data=BODY.encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        return int(resp.status)


def wrk(url: str, duration: float, connections: int, threads: int) -> dict[str, Any]:
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "-s",
        str(BENCH / "wrk_post.lua"),
        url,
    ]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=duration + 60,
        env={**os.environ, "BENCH_BODY": BODY},
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            stats = dict(json.loads(line[len("BENCH_JSON ") :]))
            stats["rps"] = stats["requests"] / (stats["duration_us"] / 1e6)
            stats["errors"] = sum(v for k, v in stats.items() if k.startswith("errors_"))
            return stats
    raise RuntimeError(
        f"wrk gave no summary (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    info = machine_info()
    runs: list[dict[str, Any]] = []
    with RedisServer() as redis:
        cf_port, bare_port = free_port(), free_port()
        servers = {
            "corefleet": gateway_proc(redis.url, cf_port),
            "bare_lpush": bare_proc(redis.url, bare_port),
        }
        urls = {
            "corefleet": f"http://127.0.0.1:{cf_port}",
            "bare_lpush": f"http://127.0.0.1:{bare_port}",
        }
        try:
            for proc in servers.values():
                proc.start()
            for name, proc in servers.items():
                health = urls[name] + "/healthz"
                proc.wait_ready(partial(http_ok, health))
                status = post_once(urls[name] + "/v1/jobs")
                if status != 202:
                    raise RuntimeError(f"{name}: POST /v1/jobs answered {status}, not 202")
                if args.warmup > 0:
                    wrk(urls[name] + "/v1/jobs", args.warmup, args.connections, args.threads)
            order = list(servers)
            for rep in range(args.repeats):
                for name in order if rep % 2 == 0 else order[::-1]:
                    redis.flush()
                    stats = wrk(
                        urls[name] + "/v1/jobs", args.duration, args.connections, args.threads
                    )
                    stats.update(server=name, repeat=rep + 1)
                    runs.append(stats)
                    print(
                        f"  {name:<10} run {rep + 1}: {stats['rps']:,.0f} req/s, "
                        f"p50 {stats['latency_p50_us'] / 1000:.1f} ms, "
                        f"p99 {stats['latency_p99_us'] / 1000:.1f} ms, "
                        f"errors {stats['errors']}",
                        flush=True,
                    )
        finally:
            for proc in servers.values():
                proc.stop()
        redis_version = redis.version()

    summary: dict[str, dict[str, Any]] = {}
    for name in servers:
        mine = [r for r in runs if r["server"] == name]
        summary[name] = {
            "median_rps": median(r["rps"] for r in mine),
            "runs_rps": [round(r["rps"], 1) for r in mine],
            "median_p50_ms": median(r["latency_p50_us"] for r in mine) / 1000,
            "median_p99_ms": median(r["latency_p99_us"] for r in mine) / 1000,
            "errors": sum(r["errors"] for r in mine),
        }
    ratio = summary["corefleet"]["median_rps"] / summary["bare_lpush"]["median_rps"]
    rows = [
        {
            "server": name,
            "median req/s": s["median_rps"],
            "runs req/s": " / ".join(f"{v:,.0f}" for v in s["runs_rps"]),
            "p50 ms": s["median_p50_ms"],
            "p99 ms": s["median_p99_ms"],
            "errors": s["errors"],
        }
        for name, s in summary.items()
    ]
    print_table(
        f"POST /v1/jobs, {args.connections} connections, {args.duration:g} s x "
        f"{args.repeats} (median)",
        ["server", "median req/s", "runs req/s", "p50 ms", "p99 ms", "errors"],
        rows,
    )
    errors = sum(s["errors"] for s in summary.values())
    problem = f"{errors} requests failed or were refused" if errors else ""
    print(f"corefleet / bare: {verdict(ratio, TARGET, problem)}")
    return {
        "benchmark": NAME,
        "machine": info,
        "redis_version": redis_version,
        "params": {
            "duration_s": args.duration,
            "repeats": args.repeats,
            "connections": args.connections,
            "wrk_threads": args.threads,
            "warmup_s": args.warmup,
            "body": BODY,
            "load_generator": "wrk",
        },
        "runs": runs,
        "summary": summary,
        "ratio_corefleet_over_bare": ratio,
        "target": TARGET,
    }
