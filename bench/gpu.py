"""GPU benchmark: a gpu.matmul job's TFLOP/s vs the same CuPy code run bare, same device.

corefleet: a gateway and a ``corefleet worker --gpu`` pinned to one device
(``CUDA_VISIBLE_DEVICES``), on their own Redis; each run submits one ``gpu.matmul`` job
and reads the TFLOP/s the task measured on the device. Bare: ``bench/gpu_bare.py`` runs the
same matmul on the same device in a plain process. Target: corefleet/bare >= 0.95.
``--cpu`` runs both on the CPU fallback (NumPy), to check the benchmark where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request
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
    run_json_child,
    verdict,
)
from bench.submit import gateway_proc

NAME = "gpu"
HELP = "gpu.matmul job TFLOP/s vs bare CuPy on the same device"
TARGET = 0.95


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=8192, help="matrix size (8192)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--repeat", type=int, default=20, help="matmuls timed per run (20)")
    parser.add_argument("--runs", type=int, default=3, help="runs per side (3)")
    parser.add_argument("--device", default="0", help="the GPU both sides use (0)")
    parser.add_argument("--cpu", action="store_true", help="NumPy on the CPU fallback")


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return dict(json.loads(resp.read()))


def _wait(url: str) -> dict[str, Any]:
    while True:
        with urllib.request.urlopen(url + "?wait=60", timeout=90) as resp:
            job = dict(json.loads(resp.read()))
        if job["state"] in ("succeeded", "failed", "cancelled", "dead"):
            return job


def run(args: argparse.Namespace) -> dict[str, Any]:
    call = [args.n, args.dtype, args.repeat, 0]
    with RedisServer() as redis:
        port = free_port()
        worker_env = {
            "COREFLEET_REDIS_URL": redis.url,
            "COREFLEET_LOG_LEVEL": "WARNING",
            "CUDA_VISIBLE_DEVICES": "" if args.cpu else args.device,
        }
        if args.cpu:
            worker_env["COREFLEET_GPU_FALLBACK"] = "cpu"
        worker = Proc(
            "gpu-worker", [PYTHON, "-m", "clients.cli", "worker", "--gpu"], env=worker_env
        )
        with gateway_proc(redis.url, port) as gateway, worker:
            base = f"http://127.0.0.1:{port}"
            gateway.wait_ready(lambda: http_ok(base + "/healthz"), 60)
            jobs = []
            for _ in range(args.runs + 1):  # the first run warms the worker child up
                job = _post(base + "/v1/jobs", {"task": "gpu.matmul", "args": call})
                done = _wait(f"{base}/v1/jobs/{job['id']}")
                if done["state"] != "succeeded":
                    raise RuntimeError(f"gpu.matmul job {done['state']}: {done['error']}")
                jobs.append(done["result"])
    bare_argv = [
        PYTHON,
        str(BENCH / "gpu_bare.py"),
        "--n",
        str(args.n),
        "--dtype",
        args.dtype,
        "--repeat",
        str(args.repeat),
    ] + (["--cpu"] if args.cpu else [])
    env = {"CUDA_VISIBLE_DEVICES": args.device} if not args.cpu else {}
    bare = [run_json_child("gpu-bare", bare_argv, 600, env) for _ in range(args.runs)]
    corefleet = median(r["tflops"] for r in jobs[1:])
    baseline = median(r["tflops"] for r in bare)
    ratio = corefleet / baseline
    rows = [
        {
            "side": "corefleet gpu.matmul job",
            "TFLOP/s": corefleet,
            "device": jobs[-1]["device"],
            "checksum": jobs[-1]["checksum"],
        },
        {
            "side": "bare CuPy" if not args.cpu else "bare NumPy",
            "TFLOP/s": baseline,
            "device": bare[-1]["device"],
            "checksum": bare[-1]["checksum"],
        },
    ]
    print_table(
        f"gpu.matmul n={args.n} {args.dtype} x{args.repeat}, median of {args.runs}",
        ["side", "TFLOP/s", "device", "checksum"],
        rows,
    )
    # Both sides multiply the same seeded matrices on the same device: their sums agree to
    # rounding, or one of them did not do the work it timed.
    sums = [r["checksum"] for r in jobs[1:] + bare]
    spread = max(sums) - min(sums)
    problem = (
        f"the checksums differ by {spread:g}"
        if spread > 1e-3 * max(1.0, max(abs(x) for x in sums))
        else ""
    )
    if {r["device"] for r in jobs[1:]} != {r["device"] for r in bare}:
        problem = "the job and bare CuPy ran on different devices"
    print(f"corefleet / bare: {ratio:.3f} {verdict(ratio, TARGET, problem)}")
    return {
        "benchmark": NAME,
        "machine": machine_info(),
        "args": vars(args),
        "rows": rows,
        "ratio": ratio,
        "target": TARGET,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
