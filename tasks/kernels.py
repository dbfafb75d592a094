"""Numba kernels behind the cpu tasks; importing this module imports Numba.

``cache=True`` writes compiled code under ``NUMBA_CACHE_DIR``, which ``corefleet worker``
points at one folder, so every child process of a host reuses one compilation.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np


@numba.njit(cache=True, parallel=True)
def mandelbrot_counts(width: int, height: int, max_iter: int) -> Any:
    counts = np.empty((height, width), dtype=np.int64)
    for row in numba.prange(height):
        ci = -1.5 + 3.0 * row / height
        for col in range(width):
            cr = -2.0 + 3.0 * col / width
            zr = 0.0
            zi = 0.0
            n = 0
            while n < max_iter and zr * zr + zi * zi <= 4.0:
                zr, zi = zr * zr - zi * zi + cr, 2.0 * zr * zi + ci
                n += 1
            counts[row, col] = n
    return counts


@numba.njit(cache=True)
def points_in_circle(samples: int, seed: int) -> int:
    # Serial on purpose: one seeded stream gives the same answer for the same seed.
    np.random.seed(seed)
    hits = 0
    for _ in range(samples):
        x = np.random.random()
        y = np.random.random()
        if x * x + y * y <= 1.0:
            hits += 1
    return hits


@numba.njit(cache=True, parallel=True)
def saxpy_cpu(a: Any, x: Any, y: Any) -> Any:
    out = np.empty_like(x)
    for i in numba.prange(x.size):
        out[i] = a * x[i] + y[i]
    return out
