"""On a host with a GPU: the gpu tasks run on the device and agree with NumPy.

These run wherever a GPU and CuPy are present and are skipped only where none is.
"""

from __future__ import annotations

import numpy as np
import pytest

from tasks.gpu import _cupy, fft, matmul, saxpy

pytestmark = pytest.mark.skipif(_cupy() is None, reason="no GPU with CuPy on this host")


def test_matmul_on_the_device_matches_numpy() -> None:
    """gpu.matmul runs on the GPU (device named) and its checksum is NumPy's A @ B sum."""
    out = matmul(256, "float64", 3, 1)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((256, 256)), rng.standard_normal((256, 256))
    assert out["device"] != "cpu" and out["tflops"] > 0
    assert out["checksum"] == pytest.approx(float((a @ b).sum()), rel=1e-9)


def test_fft_and_saxpy_on_the_device_match_numpy() -> None:
    """gpu.fft (CuPy) and gpu.saxpy (Numba CUDA) agree with NumPy."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal(4096) + 1j * rng.standard_normal(4096)
    got = fft(4096, 2)
    assert got["device"] != "cpu"
    assert got["checksum"] == pytest.approx(float(np.abs(np.fft.fft(x)).sum()), rel=1e-9)
    rng = np.random.default_rng(3)
    xs, ys = (rng.standard_normal(100_000).astype(np.float32) for _ in range(2))
    got = saxpy(100_000, 1.5, 3)
    expected = float((np.float32(1.5) * xs + ys).sum(dtype=np.float64))
    assert got["device"] != "cpu" and got["checksum"] == pytest.approx(expected, rel=1e-5)


def test_a_job_leaves_no_device_memory_held() -> None:
    """A worker child runs job after job: what a job's arrays held goes back to the device
    (CuPy kept its peak in its pool, and Numba frees late), so the next job, of either
    library, finds the device as it was."""
    cp = _cupy()
    matmul(2048, "float32", 2, 0)
    fft(1 << 20, 0)
    assert cp.get_default_memory_pool().total_bytes() == 0
    from numba import cuda

    saxpy(1 << 22, 2.0, 0)
    assert len(cuda.current_context().deallocations._cons) == 0
