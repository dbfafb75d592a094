"""Benchmark 2: io no-op jobs end to end (first submit -> every result stored), corefleet vs arq.

Same machine, same Redis server (flushed between runs), one worker process each:

* corefleet: the gateway (embedded io worker off) + one ``corefleet io-worker``
  (concurrency 1000); the producer (``bench/cf_producer.py``, a process of its own)
  submits ``io.echo`` jobs over HTTP and counts ``succeeded`` events on ``cf:events``.
* arq 0.28 (in ``bench/.venv-arq``, created on demand): one worker with ``max_jobs=1000``
  and ``poll_delay=0.01``; the producer (``bench/arq_side.py produce``) enqueues with
  ``ArqRedis.enqueue_job`` (64 in flight) and counts result keys as they are written,
  through keyspace notifications.

Each producer warms up with a few hundred jobs before the timed N. corefleet pays an
HTTP hop that arq does not (arq's producer talks to Redis directly); by default
corefleet submits in batches of 100 (``POST /v1/jobs/batch``, 4 requests in flight),
and ``--cf-mode single`` measures one POST per job (64 in flight) instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from typing import Any

from bench.common import (
    BENCH,
    PYTHON,
    ROOT,
    Proc,
    RedisServer,
    free_port,
    http_ok,
    machine_info,
    median,
    print_table,
    run_json_child,
    unverified,
    verdict,
)
from bench.submit import gateway_proc

NAME = "io"
HELP = "io.echo jobs end to end: corefleet (gateway + io-worker) vs arq 0.28, same Redis"
TARGET = 2.0
ARQ_VENV = BENCH / ".venv-arq"
ARQ_PYTHON = ARQ_VENV / "bin" / "python"
ARQ_HEALTH_KEY = "arq:queue:health-check"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=10_000, help="jobs per timed run (10000)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per system (1)")
    parser.add_argument("--warmup", type=int, default=500, help="warm-up jobs per run (500)")
    parser.add_argument(
        "--cf-mode",
        choices=("batch", "single", "both"),
        default="batch",
        help="corefleet submission: batch POSTs, single POSTs, or both",
    )
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--skip-arq", action="store_true", help="run corefleet only")


def ensure_arq_venv() -> None:
    if ARQ_PYTHON.exists():
        probe = subprocess.run([str(ARQ_PYTHON), "-c", "import arq"], capture_output=True)
        if probe.returncode == 0:
            return
    print("creating bench/.venv-arq with arq 0.28 (uv) ...", flush=True)
    uv = _uv()
    subprocess.run([uv, "venv", str(ARQ_VENV), "-p", "3.11"], check=True, cwd=ROOT)
    subprocess.run(
        [uv, "pip", "install", "-p", str(ARQ_PYTHON), "arq==0.28.*"], check=True, cwd=ROOT
    )


def _uv() -> str:
    """uv: the one running us (``uv run`` sets UV), on PATH, or the README's ``.uv``."""
    found = os.environ.get("UV") or shutil.which("uv")
    if found:
        return found
    local = ROOT / ".uv" / "bin" / "uv"
    if local.exists():
        return str(local)
    raise SystemExit("uv is needed to build arq's environment: pip install uv")


def run_corefleet(redis: RedisServer, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    redis.flush()
    port = free_port()
    gateway = gateway_proc(redis.url, port)
    worker = Proc(
        "io-worker",
        [PYTHON, "-m", "clients.cli", "io-worker"],
        env={
            "COREFLEET_REDIS_URL": redis.url,
            "COREFLEET_IO_CONCURRENCY": "1000",
            "COREFLEET_LOG_LEVEL": "INFO",  # for the start-up line; nothing is logged per job
        },
    )
    url = f"http://127.0.0.1:{port}"
    with gateway, worker:
        gateway.wait_ready(lambda: http_ok(url + "/healthz"))
        worker.wait_log("consuming")
        single = mode == "single"
        before = {p.name: p.cpu_seconds() for p in (gateway, worker, redis)}
        result = run_json_child(
            "cf_producer",
            [
                PYTHON,
                str(BENCH / "cf_producer.py"),
                "--url",
                url,
                "--redis-url",
                redis.url,
                "--n",
                str(args.n),
                "--warmup",
                str(args.warmup),
                "--mode",
                mode,
                "--batch-size",
                str(args.batch_size),
                "--concurrency",
                "64" if single else "4",
            ],
            timeout=300,
        )
        result["cpu_s"] = {
            p.name: p.cpu_seconds() - before[p.name] for p in (gateway, worker, redis)
        }
        result["cpu_s"]["producer"] = result.pop("producer_cpu_s")
        return result


def run_arq(redis: RedisServer, args: argparse.Namespace) -> dict[str, Any]:
    redis.flush()
    redis.command("CONFIG", "SET", "notify-keyspace-events", "E$")
    worker = Proc(
        "arq-worker",
        [
            str(ARQ_PYTHON),
            str(BENCH / "arq_side.py"),
            "worker",
            "--redis-port",
            str(redis.port),
            "--max-jobs",
            "1000",
            "--poll-delay",
            "0.01",
        ],
    )
    try:
        with worker:
            worker.wait_ready(lambda: bool(redis.command("EXISTS", ARQ_HEALTH_KEY)))
            before = {p.name: p.cpu_seconds() for p in (worker, redis)}
            result = run_json_child(
                "arq_producer",
                [
                    str(ARQ_PYTHON),
                    str(BENCH / "arq_side.py"),
                    "produce",
                    "--redis-port",
                    str(redis.port),
                    "--n",
                    str(args.n),
                    "--warmup",
                    str(args.warmup),
                    "--concurrency",
                    "64",
                ],
                timeout=300,
            )
            result["cpu_s"] = {p.name: p.cpu_seconds() - before[p.name] for p in (worker, redis)}
            result["cpu_s"]["producer"] = result.pop("producer_cpu_s")
            return result
    finally:
        redis.command("CONFIG", "SET", "notify-keyspace-events", "")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not args.skip_arq:
        ensure_arq_venv()
    info = machine_info()
    modes = ["batch", "single"] if args.cf_mode == "both" else [args.cf_mode]
    runs: list[dict[str, Any]] = []
    with RedisServer() as redis:
        for rep in range(args.repeats):
            plan: list[str] = [f"corefleet-{m}" for m in modes]
            if not args.skip_arq:
                plan = ["arq", *plan] if rep % 2 else [*plan, "arq"]
            for system in plan:
                if system == "arq":
                    result = run_arq(redis, args)
                    result["label"] = "arq"
                else:
                    mode = system.split("-", 1)[1]
                    result = run_corefleet(redis, args, mode)
                    result["label"] = system
                result["repeat"] = rep + 1
                runs.append(result)
                print(
                    f"  {result['label']:<16} run {rep + 1}: {result['jobs_per_s']:,.0f} jobs/s "
                    f"end to end ({result['wall_s']:.2f} s), submit phase "
                    f"{result['submit_jobs_per_s']:,.0f} jobs/s, "
                    f"verified {result['verified_results']}/{result['n']}",
                    flush=True,
                )
        redis_version = redis.version()

    summary: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in runs if r["label"] == label]
        summary[label] = {
            "median_jobs_per_s": median(r["jobs_per_s"] for r in mine),
            "median_wall_s": median(r["wall_s"] for r in mine),
            "median_submit_jobs_per_s": median(r["submit_jobs_per_s"] for r in mine),
            "verified": f"{min(r['verified_results'] for r in mine)}/{args.n}",
            # CPU over the whole producer run (warm-up included), per job submitted.
            "cpu_us_per_job": {
                proc: median(r["cpu_s"][proc] for r in mine) * 1e6 / (args.n + args.warmup)
                for proc in mine[0]["cpu_s"]
            },
        }
    ratios = {}
    if "arq" in summary:
        for label, s in summary.items():
            if label != "arq":
                ratios[label] = s["median_jobs_per_s"] / summary["arq"]["median_jobs_per_s"]
    rows = [
        {
            "system": label,
            "jobs/s e2e": s["median_jobs_per_s"],
            "wall s": s["median_wall_s"],
            "submit jobs/s": s["median_submit_jobs_per_s"],
            "verified": s["verified"],
            "cpu us/job": " ".join(f"{k}={v:.0f}" for k, v in s["cpu_us_per_job"].items()),
            "vs arq": f"{ratios[label]:.2f}" if label in ratios else "",
        }
        for label, s in summary.items()
    ]
    print_table(
        f"io.echo end to end, N={args.n}, {args.repeats} run(s) each (median)",
        ["system", "jobs/s e2e", "wall s", "submit jobs/s", "verified", "vs arq", "cpu us/job"],
        rows,
    )
    problem = unverified(runs, args.n)
    for label, ratio in ratios.items():
        print(f"{label} / arq: {verdict(ratio, TARGET, problem)}")
    return {
        "benchmark": NAME,
        "machine": info,
        "redis_version": redis_version,
        "params": {
            "n": args.n,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "cf_modes": modes,
            "batch_size": args.batch_size,
            "cf_io_concurrency": 1000,
            "arq_max_jobs": 1000,
            "arq_poll_delay_s": 0.01,
            "arq_enqueue_concurrency": 64,
        },
        "runs": runs,
        "summary": summary,
        "ratios_over_arq": ratios,
        "target": TARGET,
    }
