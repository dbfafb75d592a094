"""The bare baseline for ``bench gpu``: the same matmul as gpu.matmul, no queue around it.

Prints one JSON line: {"tflops", "checksum", "device"}. ``--cpu`` uses NumPy (to check the
benchmark itself on a host without a GPU).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeat", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    a = rng.standard_normal((args.n, args.n)).astype(args.dtype)
    b = rng.standard_normal((args.n, args.n)).astype(args.dtype)
    if args.cpu:
        c = a @ b
        started = time.perf_counter()
        for _ in range(args.repeat):
            c = a @ b
        elapsed = time.perf_counter() - started
        checksum, device = float(c.sum(dtype=np.float64)), "cpu"
    else:
        import cupy as cp

        da, db = cp.asarray(a), cp.asarray(b)
        dc = da @ db
        cp.cuda.Device().synchronize()
        started = time.perf_counter()
        for _ in range(args.repeat):
            dc = da @ db
        cp.cuda.Device().synchronize()
        elapsed = time.perf_counter() - started
        checksum = float(dc.sum(dtype=cp.float64))
        device = cp.cuda.runtime.getDeviceProperties(0)["name"]
        device = device.decode() if isinstance(device, bytes) else str(device)
    tflops = 2.0 * args.n**3 * args.repeat / elapsed / 1e12
    print(json.dumps({"tflops": tflops, "checksum": checksum, "device": device}))


if __name__ == "__main__":
    main()
