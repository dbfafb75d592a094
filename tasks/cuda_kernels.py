"""Numba CUDA kernels behind the gpu tasks; importing this module imports numba.cuda."""

from __future__ import annotations

from typing import Any

from numba import cuda


@cuda.jit  # type: ignore[untyped-decorator]
def _saxpy_kernel(a: Any, x: Any, y: Any, out: Any) -> None:
    i = cuda.grid(1)  # type: ignore[attr-defined]  # made at run time by numba.cuda
    if i < x.size:
        out[i] = a * x[i] + y[i]


def saxpy_cuda(a: Any, x: Any, y: Any) -> Any:
    try:
        return _saxpy_on_device(a, x, y)
    finally:
        # Numba frees device arrays in batches, late; a worker child runs job after job,
        # and a job of the other allocator (CuPy's) could find the device full.
        cuda.current_context().deallocations.clear()  # type: ignore[no-untyped-call]  # numba


def _saxpy_on_device(a: Any, x: Any, y: Any) -> Any:
    d_x, d_y = cuda.to_device(x), cuda.to_device(y)
    d_out = cuda.device_array_like(d_x)  # type: ignore[no-untyped-call]  # untyped in numba
    threads = 256
    blocks = (x.size + threads - 1) // threads
    _saxpy_kernel[blocks, threads](a, d_x, d_y, d_out)
    return d_out.copy_to_host()
