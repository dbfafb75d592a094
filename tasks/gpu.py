"""Built-in gpu tasks: CuPy and Numba-CUDA kernels, on the Celery ``gpu`` queue.

On a host without a GPU (or without CuPy) a gpu task fails with ``NoGPU``, unless the
worker runs with ``COREFLEET_GPU_FALLBACK=cpu``: then the same maths runs on the CPU
(NumPy, Numba) and the result says ``"device": "cpu"``. The inputs are drawn from NumPy's
seeded generator on the host in both cases, so the two paths agree to rounding.
"""

from __future__ import annotations

import os
import time
from typing import Any

from tasks import task

_DTYPES = ("float32", "float64")


class NoGPU(RuntimeError):
    """No usable GPU here, and no CPU fallback was asked for."""


def _cupy() -> Any:
    """CuPy with at least one device, or None. Whatever CuPy wheel is installed will do."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # a CuPy without a driver or device raises CUDA errors of its own
        return None


def _fallback() -> bool:
    # Read at call time: this is the worker process's configuration.
    return os.environ.get("COREFLEET_GPU_FALLBACK", "") == "cpu"


def _no_gpu(what: str) -> NoGPU:
    return NoGPU(
        f"{what} needs a GPU and none is usable here (CuPy or a device is missing); "
        "set COREFLEET_GPU_FALLBACK=cpu on the worker to run it on the CPU"
    )


def _device_name(cp: Any) -> str:
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _inputs(n: int, dtype: str, seed: int) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype))


def _matmul_on_device(cp: Any, a: Any, b: Any, repeat: int) -> tuple[float, float]:
    """The checksum of ``a @ b`` on the device and the seconds ``repeat`` products took;
    the device arrays are let go on return."""
    da, db = cp.asarray(a), cp.asarray(b)
    dc = da @ db  # warm-up: loads the cuBLAS kernels outside the timing
    cp.cuda.Device().synchronize()
    started = time.perf_counter()
    for _ in range(repeat):
        dc = da @ db
    cp.cuda.Device().synchronize()
    elapsed = time.perf_counter() - started
    return float(dc.sum(dtype=cp.float64)), elapsed


def _free_device_memory(cp: Any) -> None:
    """Hand back to the device what this job's arrays held. A worker child runs job after
    job, and CuPy keeps freed blocks (and FFT plans with their work areas) for the next:
    a big job's peak would stay taken, and a job of the other allocator (Numba's) could
    run out of memory on an idle device."""
    cp.get_default_memory_pool().free_all_blocks()
    cp.get_default_pinned_memory_pool().free_all_blocks()
    cp.fft.config.get_plan_cache().clear()


@task("gpu.matmul", kind="gpu", timeout_s=600)
def matmul(n: int, dtype: str = "float32", repeat: int = 10, seed: int = 0) -> dict[str, Any]:
    """C = A @ B for seeded n x n matrices, ``repeat`` times; checksum and TFLOP/s."""
    if n <= 0 or repeat <= 0 or dtype not in _DTYPES:
        raise ValueError(f"n and repeat must be positive and dtype one of {_DTYPES}")
    a, b = _inputs(n, dtype, seed)
    cp = _cupy()
    if cp is not None:
        try:
            checksum, elapsed = _matmul_on_device(cp, a, b, repeat)
        finally:
            _free_device_memory(cp)
        device = _device_name(cp)
    elif _fallback():
        import numpy as np

        c = a @ b
        started = time.perf_counter()
        for _ in range(repeat):
            c = a @ b
        elapsed = time.perf_counter() - started
        checksum, device = float(c.sum(dtype=np.float64)), "cpu"
    else:
        raise _no_gpu("gpu.matmul")
    tflops = 2.0 * n**3 * repeat / elapsed / 1e12
    return {
        "n": n,
        "dtype": dtype,
        "repeat": repeat,
        "checksum": checksum,
        "seconds": elapsed,
        "tflops": tflops,
        "device": device,
    }


@task("gpu.fft", kind="gpu", timeout_s=600)
def fft(n: int, seed: int = 0) -> dict[str, Any]:
    """The FFT of ``n`` seeded complex samples; a checksum of its magnitudes."""
    import numpy as np

    if n <= 0:
        raise ValueError("n must be positive")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    cp = _cupy()
    if cp is not None:
        try:
            spectrum = cp.asnumpy(cp.fft.fft(cp.asarray(x)))
        finally:
            _free_device_memory(cp)
        device = _device_name(cp)
    elif _fallback():
        spectrum, device = np.fft.fft(x), "cpu"
    else:
        raise _no_gpu("gpu.fft")
    return {
        "n": n,
        "checksum": float(np.abs(spectrum).sum()),
        "dc": [float(spectrum[0].real), float(spectrum[0].imag)],
        "device": device,
    }


@task("gpu.saxpy", kind="gpu", timeout_s=600)
def saxpy(n: int, a: float, seed: int = 0) -> dict[str, Any]:
    """y = a * x + y over ``n`` seeded float32 values, as a Numba CUDA kernel."""
    import numpy as np

    if n <= 0:
        raise ValueError("n must be positive")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    y = rng.standard_normal(n).astype(np.float32)
    if _cupy() is not None:
        from tasks.cuda_kernels import saxpy_cuda

        out, device = saxpy_cuda(np.float32(a), x, y), _device_name(_cupy())
    elif _fallback():
        from tasks.kernels import saxpy_cpu

        out, device = saxpy_cpu(np.float32(a), x, y), "cpu"
    else:
        raise _no_gpu("gpu.saxpy")
    return {"n": n, "a": a, "checksum": float(out.sum(dtype=np.float64)), "device": device}
