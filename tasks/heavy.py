"""Built-in heavy tasks: they fan out over a Ray or Dask cluster, from a Ray or Dask task.

Each runs inside the cluster (the job runner runs in a Ray task or on a Dask worker) and
spreads its work further: Ray tasks for ``heavy.pi`` and ``heavy.matmul_blocks``, a Dask
array for ``heavy.array_stats``. The coordinating Ray tasks declare ``num_cpus=0``: they
only wait, and the CPUs are left to the pieces. Ray, Dask and NumPy are imported inside
the tasks, never when the gateway loads the registry. Every answer is reproducible from
the seed, so tests compare it with plain NumPy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from tasks import task

#: Points drawn per NumPy call in a pi chunk: 1 MB of coordinates stays in a core's cache,
#: so chunks on different cores scale instead of queueing for memory bandwidth (with 16 MB
#: batches one chunk ran 1.7x slower here, and two in parallel slower still).
_PI_BATCH = 1 << 16


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal whole numbers."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def pi_chunk(samples: int, seed: int, index: int) -> int:
    """How many of ``samples`` points of chunk ``index`` fall inside the unit circle."""
    import numpy as np

    rng = np.random.default_rng([seed, index])
    hits = 0
    left = samples
    while left:
        n = min(left, _PI_BATCH)
        x, y = rng.random((2, n))
        hits += int(np.count_nonzero(x * x + y * y <= 1.0))
        left -= n
    return hits


def block_product(a: Any, b: Any, i: int, j: int, block: int) -> float:
    """The sum of block (i, j) of ``a @ b``, computed as sum over k of A[i,k] @ B[k,j]."""
    n = a.shape[0]
    rows, cols = slice(i, i + block), slice(j, j + block)
    total = None
    for k in range(0, n, block):
        part = a[rows, k : k + block] @ b[k : k + block, cols]
        total = part if total is None else total + part
    assert total is not None
    return float(total.sum())


def seeded_matrices(n: int, seed: int) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.random((n, n)), rng.random((n, n))


def block_sizes(n: int, chunk: int) -> tuple[int, ...]:
    """Dask's chunking of ``n``: whole chunks, then what is left."""
    return (chunk,) * (n // chunk) + ((n % chunk,) if n % chunk else ())


def random_block(seed: int, i: int, j: int, rows: int, cols: int) -> Any:
    """Block (i, j) of the seeded array ``heavy.array_stats`` works on."""
    import numpy as np

    return np.random.default_rng([seed, i, j]).random((rows, cols))


@functools.cache
def _ray_remote(fn: Callable[..., Any]) -> Any:
    import ray

    return ray.remote(num_cpus=1, max_retries=0)(fn)


def _ray_get(refs: Sequence[Any]) -> list[Any]:
    """``ray.get``, but a piece's exception is raised as itself, not wrapped by Ray."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return list(ray.get(list(refs)))
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, not {value}")


@task("heavy.pi", kind="heavy", timeout_s=3600, resources={"num_cpus": 0})
def pi(samples: int, chunks: int = 2, seed: int = 0) -> dict[str, Any]:
    """Estimate pi from ``samples`` seeded points, in ``chunks`` Ray tasks."""
    _check_positive(samples=samples, chunks=chunks)
    if chunks > samples:
        raise ValueError("chunks must not exceed samples")
    remote = _ray_remote(pi_chunk)
    refs = [remote.remote(size, seed, i) for i, size in enumerate(split(samples, chunks))]
    hits = sum(_ray_get(refs))
    return {
        "samples": samples,
        "chunks": chunks,
        "seed": seed,
        "hits": hits,
        "pi": 4.0 * hits / samples,
    }


@task("heavy.matmul_blocks", kind="heavy", timeout_s=3600, resources={"num_cpus": 0})
def matmul_blocks(n: int, block: int, seed: int = 0) -> dict[str, Any]:
    """Multiply two seeded n x n matrices, one Ray task per block of the product.

    ``checksum`` is the sum of every entry of A @ B.
    """
    _check_positive(n=n, block=block)
    import ray

    a, b = seeded_matrices(n, seed)
    a_ref, b_ref = ray.put(a), ray.put(b)  # shared by every block task, copied once
    remote = _ray_remote(block_product)
    starts = range(0, n, block)
    refs = [remote.remote(a_ref, b_ref, i, j, block) for i in starts for j in starts]
    sums = _ray_get(refs)
    return {"n": n, "block": block, "seed": seed, "blocks": len(refs), "checksum": float(sum(sums))}


@task("heavy.array_stats", kind="heavy", engine="dask", timeout_s=3600)
def array_stats(n: int, chunk: int, seed: int = 0) -> dict[str, Any]:
    """Mean and standard deviation of a seeded n x n Dask array, block by block.

    No process ever holds the whole array: each block is made where it is reduced.
    """
    _check_positive(n=n, chunk=chunk)
    import dask.array as da
    import numpy as np

    sizes = block_sizes(n, chunk)

    def make(block_id: tuple[int, int] = (0, 0)) -> Any:
        i, j = block_id
        return random_block(seed, i, j, sizes[i], sizes[j])

    # dask.array ships partial annotations; map_blocks has none.
    array = da.map_blocks(  # type: ignore[no-untyped-call]
        make, chunks=(sizes, sizes), dtype=np.float64
    )
    mean, std = _dask_compute(array.mean(), array.std())
    return {
        "n": n,
        "chunk": chunk,
        "seed": seed,
        "blocks": len(sizes) ** 2,
        "mean": float(mean),
        "std": float(std),
    }


def _dask_compute(*collections: Any) -> tuple[Any, ...]:
    """Compute on the Dask cluster this task runs on (else on local threads)."""
    from dask.base import compute
    from distributed import worker_client

    try:
        # Leaves the worker's thread pool while it waits, so the pieces can use it.
        with worker_client() as client:
            return tuple(client.gather(client.compute(list(collections))))
    except ValueError:  # not on a Dask worker
        # dask ships partial annotations; compute has none.
        return tuple(compute(*collections, scheduler="threads"))  # type: ignore[no-untyped-call]
