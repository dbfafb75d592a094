"""Built-in cpu tasks: they keep a core busy, so they run in Celery worker processes.

Numba is imported inside the tasks (through ``tasks.kernels``), never when the gateway
loads the registry.
"""

from __future__ import annotations

from typing import Any

from tasks import task


@task("cpu.count_primes", kind="cpu", timeout_s=600)
def count_primes(n: int) -> int:
    """How many primes are below ``n`` (a sieve of Eratosthenes in pure Python)."""
    if n < 0:
        raise ValueError("n must not be negative")
    if n < 3:
        return 0
    sieve = bytearray([1]) * n
    sieve[0:2] = b"\x00\x00"
    for p in range(2, int((n - 1) ** 0.5) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, n, p)))
    return sum(sieve)


@task("cpu.mandelbrot", kind="cpu", timeout_s=600)
def mandelbrot(width: int, height: int, max_iter: int) -> dict[str, Any]:
    """Escape counts over [-2, 1] x [-1.5, 1.5], compiled with Numba (rows in parallel)."""
    if width <= 0 or height <= 0 or max_iter <= 0:
        raise ValueError("width, height and max_iter must be positive")
    from tasks.kernels import mandelbrot_counts

    counts = mandelbrot_counts(width, height, max_iter)
    return {
        "width": width,
        "height": height,
        "max_iter": max_iter,
        "checksum": int(counts.sum()),
        "inside": int((counts == max_iter).sum()),
    }


@task("cpu.monte_carlo_pi", kind="cpu", timeout_s=600)
def monte_carlo_pi(samples: int, seed: int = 0) -> dict[str, Any]:
    """Estimate pi from ``samples`` seeded random points, compiled with Numba."""
    if samples <= 0:
        raise ValueError("samples must be positive")
    from tasks.kernels import points_in_circle

    hits = int(points_in_circle(samples, seed))
    return {"samples": samples, "seed": seed, "hits": hits, "pi": 4.0 * hits / samples}
