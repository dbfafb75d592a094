"""Benchmark 3: cpu jobs on Celery prefork workers, corefleet vs bare Celery and a process pool.

One Redis server for the whole run (flushed between systems); every worker is a Celery
prefork worker, started fresh for each measurement and warmed up before the clock starts
(a separate warm-up producer run, so start-up CPU is not counted).

* ``noop``: N no-op cpu jobs end to end (first submit -> last result stored).
  corefleet: the gateway (embedded io worker off) + ``corefleet worker --concurrency 2``,
  task ``bench.noop`` (``bench/bench_tasks.py``); the producer (``bench/cpu_producer.py``,
  its own process) submits with ``POST /v1/jobs/batch`` (100 a request, 4 in flight) and
  counts ``succeeded`` events on ``cf:events``. Bare Celery: ``bench/bare_celery_app.py``,
  a plain Celery app (same Redis as broker and result backend, JSON, ``-P prefork -c 2``,
  acks_late + prefetch 1 like corefleet's app unless ``--bare-config default``); its
  producer calls ``apply_async`` N times, then waits on a ``ResultSet``.
* ``scaling``: a batch of equal CPU-bound jobs (``bench.burn``, a pure-Python loop
  calibrated first, in this process, to ~0.2 s a call) through corefleet with a worker at
  ``--concurrency 2`` and ``--concurrency 1``, and the same function on
  ``ProcessPoolExecutor(2)`` and ``(1)`` (the pool's own 2/1 ratio shows what the machine
  allowed at that moment).

The machine may be shared: besides ``os.getloadavg()``, every timed window records how
many cores' worth of CPU processes outside the benchmark used (/proc/stat busy time minus
the benchmark's own processes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.bench_tasks import burn_loop
from bench.common import (
    BENCH,
    PYTHON,
    ROOT,
    Proc,
    RedisServer,
    free_port,
    http_ok,
    machine_info,
    print_table,
    run_json_child,
    unverified,
    verdict,
)

NAME = "cpu"
HELP = "cpu jobs on Celery prefork: corefleet vs bare Celery (no-op), scaling c=1/c=2 vs a pool"
TARGET_NOOP = 1.0
TARGET_SCALING = 1.9
TARGET_POOL = 0.9
TASK_MODULE = "bench.bench_tasks"
#: Jobs each producer process sends and waits for before its clock starts: its own lazy
#: set-up (Celery's broker connection, the transport's imports) is not timed, on either side.
IN_PROCESS_WARMUP = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--part",
        choices=("noop", "scaling", "both"),
        default="both",
        help="which measurement(s) to run (both)",
    )
    parser.add_argument("--n", type=int, default=3000, help="no-op jobs per system (3000)")
    parser.add_argument(
        "--warmup", type=int, default=200, help="no-op warm-up jobs per system (200)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=100, help="corefleet jobs per POST /v1/jobs/batch (100)"
    )
    parser.add_argument(
        "--bare-config",
        choices=("matched", "default", "matched-events"),
        default="matched",
        help="bare Celery: corefleet's acks_late + prefetch 1, or Celery defaults; "
        "matched-events also sends task events (-E), as corefleet's worker does for Flower",
    )
    parser.add_argument("--jobs", type=int, default=40, help="CPU-bound jobs in the batch (40)")
    parser.add_argument(
        "--job-seconds", type=float, default=0.2, help="target duration of one CPU-bound job (0.2)"
    )


# --- processes ---------------------------------------------------------------------------


def _env(redis_url: str) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {
        "COREFLEET_REDIS_URL": redis_url,
        "COREFLEET_TASK_MODULES": TASK_MODULE,
        "COREFLEET_LOG_LEVEL": "WARNING",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT),
    }


def gateway(redis_url: str, port: int) -> Proc:
    return Proc(
        "cpu-gateway",
        [PYTHON, "-m", "clients.cli", "gateway"],
        env={
            **_env(redis_url),
            "COREFLEET_HOST": "127.0.0.1",
            "COREFLEET_PORT": str(port),
            "COREFLEET_EMBEDDED_IO_WORKER": "0",
        },
    )


def cf_worker(redis_url: str, concurrency: int) -> Proc:
    return Proc(
        f"cf-worker-c{concurrency}",
        [PYTHON, "-m", "clients.cli", "worker", "--concurrency", str(concurrency)],
        env=_env(redis_url),
    )


def bare_worker(redis_url: str, config: str) -> Proc:
    return Proc(
        "bare-celery-worker",
        [
            PYTHON,
            "-m",
            "celery",
            "-A",
            "bench.bare_celery_app",
            "worker",
            "-P",
            "prefork",
            "-c",
            "2",
            "-Q",
            "bare",
            "--without-mingle",
            "--without-gossip",
            "-l",
            "WARNING",
            *(["-E"] if config.endswith("-events") else []),
        ],
        env={
            **_env(redis_url),
            "BENCH_REDIS_URL": redis_url,
            "BENCH_BARE_CONFIG": config.removesuffix("-events"),
        },
    )


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process and, summed, of its live children."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(p: int) -> float:
        fields = _stat(p)
        return (int(fields[11]) + int(fields[12])) / tick if fields else 0.0

    return {"main": cpu(pid), "children": sum(cpu(c) for c in children_of(pid))}


class Worker:
    """A Celery worker Proc whose pool children are stopped too (by PID) if they linger."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.kids: dict[int, str] = {}  # pid -> start time, so a reused PID is never hit

    def __enter__(self) -> Worker:
        self.proc.start()
        return self

    def _remember_kids(self) -> None:
        if self.proc.alive():
            for kid in children_of(self.proc.pid):
                fields = _stat(kid)
                if fields is not None:
                    self.kids[kid] = fields[19]

    def snapshot(self) -> dict[str, float]:
        self._remember_kids()
        return tree_cpu(self.proc.pid)

    def __exit__(self, *exc: object) -> None:
        self._remember_kids()
        self.proc.stop(timeout=15)
        for kid, started in self.kids.items():
            fields = _stat(kid)
            if fields is not None and fields[19] == started and fields[0] != "Z":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(kid, signal.SIGKILL)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def machine_cpu() -> dict[str, float]:
    """Machine-wide CPU seconds so far (all cores): busy (user, nice, system, irq, softirq)
    and steal, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    steal = fields[7] if len(fields) > 7 else 0
    return {"busy": busy / tick, "steal": steal / tick, "at": time.monotonic()}


def children_cpu() -> float:
    """CPU seconds of this process's finished, reaped children (the producers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def others_load(
    before: dict[str, float], after: dict[str, float], ours_s: float
) -> dict[str, float]:
    """Cores' worth of CPU that processes outside this benchmark used in the window
    (machine-wide busy time minus what this benchmark's own processes used)."""
    window = after["at"] - before["at"]
    return {
        "window_s": window,
        "machine_busy_cores": (after["busy"] - before["busy"]) / window,
        "ours_cores": ours_s / window,
        "others_cores": (after["busy"] - before["busy"] - ours_s) / window,
        "steal_cores": (after["steal"] - before["steal"]) / window,
    }


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- part 1: no-op jobs ------------------------------------------------------------------


def _cf_produce(
    redis: RedisServer,
    url: str,
    task: str,
    task_args: list[Any],
    expect: Any,
    n: int,
    batch_size: int,
) -> dict[str, Any]:
    return run_json_child(
        "cpu_producer",
        [
            PYTHON,
            str(BENCH / "cpu_producer.py"),
            "--url",
            url,
            "--redis-url",
            redis.url,
            "--task",
            task,
            "--args",
            json.dumps(task_args),
            "--expect",
            json.dumps(expect),
            "--n",
            str(n),
            "--warmup",
            str(IN_PROCESS_WARMUP),
            "--batch-size",
            str(batch_size),
            "--concurrency",
            "4",
            "--timeout",
            "150",
        ],
        timeout=200,
        env=_env(redis.url),
    )


def run_cf(
    redis: RedisServer,
    concurrency: int,
    task: str,
    task_args: list[Any],
    expect: Any,
    n: int,
    warmup: int,
    batch_size: int,
) -> dict[str, Any]:
    """corefleet: warm-up jobs (which also wait out the worker's start), then N timed."""
    redis.flush()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with gateway(redis.url, port) as gw, Worker(cf_worker(redis.url, concurrency)) as worker:
        gw.wait_ready(lambda: http_ok(url + "/healthz"))
        _cf_produce(redis, url, task, task_args, expect, warmup, batch_size)
        load_before = load()
        before = {"gateway": gw.cpu_seconds(), "redis": redis.cpu_seconds()}
        wk_before = worker.snapshot()
        machine0, reaped0 = machine_cpu(), children_cpu()
        result = _cf_produce(redis, url, task, task_args, expect, n, batch_size)
        machine1 = machine_cpu()
        producer_total = children_cpu() - reaped0  # with its start-up, unlike producer_cpu_s
        wk = _delta(worker.snapshot(), wk_before)
        result["cpu_s"] = {
            "gateway": gw.cpu_seconds() - before["gateway"],
            "worker_main": wk["main"],
            "worker_children": wk["children"],
            "redis": redis.cpu_seconds() - before["redis"],
            "producer": result.pop("producer_cpu_s"),
        }
        ours = sum(v for k, v in result["cpu_s"].items() if k != "producer") + producer_total
        result["cpu_window"] = others_load(machine0, machine1, ours)
        result["loadavg_before"] = load_before
        result["worker_concurrency"] = concurrency
        result["warmup_jobs"] = warmup
    return result


def run_bare(redis: RedisServer, n: int, warmup: int, config: str) -> dict[str, Any]:
    """Bare Celery: a warm-up producer run (also waits out the worker's start), then N."""
    redis.flush()
    env = {**_env(redis.url), "BENCH_REDIS_URL": redis.url, "BENCH_BARE_CONFIG": config}

    def produce(count: int) -> dict[str, Any]:
        return run_json_child(
            "bare_celery_producer",
            [
                PYTHON,
                str(BENCH / "bare_celery_app.py"),
                "produce",
                "--n",
                str(count),
                "--warmup",
                str(IN_PROCESS_WARMUP),
                "--timeout",
                "150",
            ],
            timeout=200,
            env=env,
        )

    with Worker(bare_worker(redis.url, config)) as worker:
        produce(warmup)
        load_before = load()
        before = redis.cpu_seconds()
        wk_before = worker.snapshot()
        machine0, reaped0 = machine_cpu(), children_cpu()
        result = produce(n)
        machine1 = machine_cpu()
        producer_total = children_cpu() - reaped0
        wk = _delta(worker.snapshot(), wk_before)
        result["cpu_s"] = {
            "worker_main": wk["main"],
            "worker_children": wk["children"],
            "redis": redis.cpu_seconds() - before,
            "producer": result.pop("producer_cpu_s"),
        }
        ours = sum(v for k, v in result["cpu_s"].items() if k != "producer") + producer_total
        result["cpu_window"] = others_load(machine0, machine1, ours)
        result["loadavg_before"] = load_before
        result["warmup_jobs"] = warmup
    return result


def part_noop(redis: RedisServer, args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    cf = run_cf(redis, 2, "bench.noop", [], 1, args.n, args.warmup, args.batch_size)
    cf["label"] = "corefleet (batch POST)"
    runs.append(cf)
    print(
        f"  corefleet   {cf['jobs_per_s']:,.0f} jobs/s ({cf['wall_s']:.2f} s), "
        f"verified {cf['verified_results']}/{args.n}, load {cf['loadavg_before']}, "
        f"others {cf['cpu_window']['others_cores']:.2f} cores",
        flush=True,
    )
    bare = run_bare(redis, args.n, args.warmup, args.bare_config)
    bare["label"] = f"bare Celery ({args.bare_config})"
    runs.append(bare)
    print(
        f"  bare Celery {bare['jobs_per_s']:,.0f} jobs/s ({bare['wall_s']:.2f} s), "
        f"verified {bare['verified_results']}/{args.n}, load {bare['loadavg_before']}, "
        f"others {bare['cpu_window']['others_cores']:.2f} cores",
        flush=True,
    )
    ratio = cf["jobs_per_s"] / bare["jobs_per_s"]
    per_job = args.n
    rows = [
        {
            "system": r["label"],
            "jobs/s e2e": r["jobs_per_s"],
            "wall s": r["wall_s"],
            "submit jobs/s": r["submit_jobs_per_s"],
            "verified": f"{r['verified_results']}/{args.n}",
            "cpu us/job": " ".join(f"{k}={v * 1e6 / per_job:.0f}" for k, v in r["cpu_s"].items()),
            "others cores": f"{r['cpu_window']['others_cores']:.2f}",
            "load before": " ".join(f"{x:g}" for x in r["loadavg_before"]),
        }
        for r in runs
    ]
    print_table(
        f"no-op cpu jobs end to end, N={args.n}, prefork -c 2 (cpu us/job: timed N only)",
        [
            "system",
            "jobs/s e2e",
            "wall s",
            "submit jobs/s",
            "verified",
            "cpu us/job",
            "others cores",
            "load before",
        ],
        rows,
    )
    print(
        "others cores: CPU (in cores, of 2) used by processes outside this benchmark while "
        "the timed producer ran (/proc/stat)"
    )
    print(f"corefleet / bare Celery: {verdict(ratio, TARGET_NOOP, unverified(runs, args.n))}")
    return {"runs": runs, "ratio": ratio, "target": TARGET_NOOP}


# --- part 2: scaling ---------------------------------------------------------------------


def calibrate(seconds: float) -> dict[str, Any]:
    """Loops of ``burn_loop`` that take about ``seconds`` here (fastest of 5 timed calls:
    on a shared machine the fastest call is the one least disturbed by other processes)."""
    loops = 200_000
    for _ in range(3):
        t0 = time.perf_counter()
        burn_loop(loops)
        took = time.perf_counter() - t0
        loops = max(1000, int(loops * seconds / took))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        burn_loop(loops)
        times.append(time.perf_counter() - t0)
    return {"loops": loops, "one_job_s": min(times), "samples_s": times}


def timed_burn(loops: int) -> tuple[int, float]:
    """``burn_loop`` and how long it took in the pool process (for the utilisation figure)."""
    t0 = time.perf_counter()
    value = burn_loop(loops)
    return value, time.perf_counter() - t0


def run_pool(loops: int, jobs: int, expect: int, workers: int) -> dict[str, Any]:
    load_before = load()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(burn_loop, [loops] * workers))  # warm-up: every child runs once
        machine0, t0 = machine_cpu(), time.perf_counter()
        out = list(pool.map(timed_burn, [loops] * jobs))
        wall = time.perf_counter() - t0
        machine1 = machine_cpu()
    runs = [seconds for _, seconds in out]
    return {
        "label": f"ProcessPoolExecutor({workers})",
        "wall_s": wall,
        "jobs_per_s": jobs / wall,
        "verified_results": sum(1 for value, _ in out if value == expect),
        "loadavg_before": load_before,
        "job_run_s_mean": statistics.fmean(runs),
        "job_run_s_max": max(runs),
        "worker_concurrency": workers,
        # ours: the jobs' own run time (the waiting parent uses next to nothing)
        "cpu_window": others_load(machine0, machine1, sum(runs)),
    }


def part_scaling(
    redis: RedisServer, args: argparse.Namespace, cal: dict[str, Any]
) -> dict[str, Any]:
    loops = cal["loops"]
    expect = burn_loop(loops)
    runs: dict[str, dict[str, Any]] = {}
    # Each corefleet run next to the pool run it is compared with, to limit load drift.
    for system, concurrency in (("cf", 2), ("pool", 2), ("cf", 1), ("pool", 1)):
        if system == "cf":
            r = run_cf(
                redis,
                concurrency,
                "bench.burn",
                [loops],
                expect,
                args.jobs,
                concurrency,
                args.batch_size,
            )
            r["label"] = f"corefleet c={concurrency}"
        else:
            r = run_pool(loops, args.jobs, expect, concurrency)
        runs[f"{system}{concurrency}"] = r
        gap = r.get("gap_s_mean")
        print(
            f"  {r['label']:<24} {r['wall_s']:.2f} s, mean job run "
            f"{r['job_run_s_mean']:.3f} s"
            + (f", mean gap between a child's jobs {gap * 1e3:.1f} ms" if gap is not None else "")
            + f", verified {r['verified_results']}/{args.jobs}, "
            f"load {r['loadavg_before']}, others {r['cpu_window']['others_cores']:.2f} cores",
            flush=True,
        )
    c2, c1, pool = runs["cf2"], runs["cf1"], runs["pool2"]
    scaling = c1["wall_s"] / c2["wall_s"]
    pool_scaling = runs["pool1"]["wall_s"] / pool["wall_s"]
    vs_pool = pool["wall_s"] / c2["wall_s"]  # = throughput(c=2) / throughput(pool)
    ideal_serial = args.jobs * cal["one_job_s"]
    # The same ratio with each run's wall time divided by its mean job run time: what the
    # scaling would be had the jobs run equally fast in both runs (other load slows them).
    normalised = (c1["wall_s"] / c1["job_run_s_mean"]) / (c2["wall_s"] / c2["job_run_s_mean"])
    for r in runs.values():
        # Share of the slots' wall time spent inside the task: 1.0 = no scheduling gaps.
        r["utilisation"] = args.jobs * r["job_run_s_mean"] / (r["worker_concurrency"] * r["wall_s"])
    rows = [
        {
            "system": r["label"],
            "wall s": r["wall_s"],
            "jobs/s": r["jobs_per_s"],
            "speed-up vs serial": ideal_serial / r["wall_s"],
            "mean job run s": r["job_run_s_mean"],
            "utilisation": r["utilisation"],
            "gap ms": f"{r['gap_s_mean'] * 1e3:.1f}" if r.get("gap_s_mean") is not None else "",
            "verified": f"{r['verified_results']}/{args.jobs}",
            "others cores": f"{r['cpu_window']['others_cores']:.2f}",
            "load before": " ".join(f"{x:g}" for x in r["loadavg_before"]),
        }
        for r in runs.values()
    ]
    print_table(
        f"{args.jobs} CPU-bound jobs of ~{cal['one_job_s']:.2f} s "
        f"(serial estimate {ideal_serial:.2f} s)",
        [
            "system",
            "wall s",
            "jobs/s",
            "speed-up vs serial",
            "mean job run s",
            "utilisation",
            "gap ms",
            "verified",
            "others cores",
            "load before",
        ],
        rows,
    )
    problem = unverified(runs.values(), args.jobs)
    print(f"corefleet c=2 / c=1 (wall c=1 / wall c=2): {verdict(scaling, TARGET_SCALING, problem)}")
    print(
        f"  same ratio for the pool, ProcessPoolExecutor(2) / (1): {pool_scaling:.2f} (what "
        f"this machine allowed just now); corefleet's normalised by job run time: "
        f"{normalised:.2f}"
    )
    print(
        "corefleet c=2 / ProcessPoolExecutor(2) throughput: "
        f"{verdict(vs_pool, TARGET_POOL, problem)}"
    )
    return {
        "calibration": cal,
        "runs": runs,
        "scaling_ratio": scaling,
        "pool_scaling_ratio": pool_scaling,
        "scaling_ratio_normalised_by_job_run_time": normalised,
        "scaling_target": TARGET_SCALING,
        "vs_pool_ratio": vs_pool,
        "vs_pool_target": TARGET_POOL,
        "serial_estimate_s": ideal_serial,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine_info()
    out: dict[str, Any] = {
        "benchmark": NAME,
        "machine": info,
        "params": {
            "part": args.part,
            "n": args.n,
            "warmup": args.warmup,
            "batch_size": args.batch_size,
            "bare_config": args.bare_config,
            "jobs": args.jobs,
            "job_seconds": args.job_seconds,
            "cf_submit": "POST /v1/jobs/batch, 4 requests in flight",
        },
    }
    print(f"  load average at start: {info['loadavg_at_start']}", flush=True)
    cal = None
    if args.part in ("scaling", "both"):  # first, before this run has loaded the machine
        cal = calibrate(args.job_seconds)
        print(
            f"  calibrated: burn_loop({cal['loops']:,}) takes {cal['one_job_s']:.3f} s here "
            f"(fastest of 5; load {load()})",
            flush=True,
        )
    with RedisServer() as redis:
        out["redis_version"] = redis.version()
        if args.part in ("noop", "both"):
            out["noop"] = part_noop(redis, args)
        if args.part in ("scaling", "both"):
            assert cal is not None
            out["scaling"] = part_scaling(redis, args, cal)
    out["loadavg_at_end"] = load()
    print(f"  load average at end: {out['loadavg_at_end']}")
    return out
