"""gpu jobs: routing to the gpu queue, one pinned child per GPU, the honest CPU fallback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import redis.asyncio as aioredis

from service.gpus import visible_gpus
from tasks.gpu import NoGPU, matmul
from tests.conftest import TEST_TASKS, Gateway, celery_waiting, wait_workers
from tests.procs import Proc, RedisServer, env_with, process_tree, wait_until


async def test_without_a_gpu_worker_jobs_wait_and_require_worker_is_refused(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """No gpu worker: a job stays queued, /v1/queues shows 0, require_worker gets 503."""
    job = await gateway.submit("gpu.matmul", 8)
    assert (job["engine"], job["queue"]) == ("celery", "gpu")
    assert await celery_waiting(redis, "gpu") == 1
    _status, queues = await gateway.call("GET", "/v1/queues")
    assert queues["engines"]["celery"]["queues"]["gpu"]["workers"] == 0
    before = set(await redis.keys("cf:job:*"))
    async with gateway.session.post(
        gateway.url + "/v1/jobs",
        json={"task": "gpu.matmul", "args": [8], "options": {"require_worker": True}},
    ) as resp:
        body = await resp.json()
        assert resp.status == 503 and body["error"]["code"] == "engine_unavailable"
        assert resp.headers["Retry-After"] == "5"  # a worker may come: say when to ask again
    assert "gpu" in body["error"]["message"]
    assert set(await redis.keys("cf:job:*")) == before
    assert await redis.hget(f"cf:job:{job['id']}", "state") == "queued"


#: Device UUIDs no GPU has: CUDA sees no device through them.
FAKE_GPUS = ("GPU-00000000-0000-0000-0000-00000000000a", "GPU-00000000-0000-0000-0000-00000000000b")


class GpuWorker:
    def __init__(self, redis_server: RedisServer, data_dir: str) -> None:
        # Two "visible" devices that exist on no host (so the CPU fallback runs, whether
        # this host has GPUs or not): the pinning is what is tested.
        env = env_with(
            COREFLEET_REDIS_URL=redis_server.url,
            COREFLEET_TASK_MODULES=TEST_TASKS,
            COREFLEET_DATA_DIR=data_dir,
            COREFLEET_GPU_FALLBACK="cpu",
            COREFLEET_LOG_LEVEL="WARNING",
            CUDA_VISIBLE_DEVICES=",".join(FAKE_GPUS),
        )
        self.proc = Proc(["worker", "--gpu"], env)


@pytest.fixture(scope="module")
def gpu_worker(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GpuWorker]:
    worker = GpuWorker(redis_server, str(tmp_path_factory.mktemp("gpu-worker")))
    wait_until(lambda: len(process_tree(worker.proc.pid)) >= 3, 60, "gpu worker children")
    yield worker
    worker.proc.stop()


async def test_each_child_is_pinned_to_its_own_device(
    gpu_worker: GpuWorker, gateway: Gateway
) -> None:
    """`worker --gpu` runs one child per visible GPU, each with its own CUDA_VISIBLE_DEVICES,
    counted in nvidia-smi's order (PCI bus), not CUDA's own (fastest first)."""
    jobs = [await gateway.submit("test.gpu_env") for _ in range(12)]
    results = [(await gateway.wait(j["id"], 60))["result"] for j in jobs]
    assert {r["order"] for r in results} == {"PCI_BUS_ID"}
    pinned = {r["pid"]: r["device"] for r in results}
    assert set(pinned.values()) <= set(FAKE_GPUS)
    assert len(pinned) == len(set(pinned.values()))  # never two devices for one child
    children = process_tree(gpu_worker.proc.pid) - {gpu_worker.proc.pid}
    assert len(children) == 2 and set(pinned) <= children


async def test_workers_report_their_devices(
    gpu_worker: GpuWorker, gateway: Gateway, redis: aioredis.Redis
) -> None:
    """The gpu worker reports its devices and fallback; /v1/queues shows them."""
    await wait_workers(redis, "gpu")
    _status, body = await gateway.call("GET", "/v1/queues")
    gpu = body["engines"]["celery"]["queues"]["gpu"]
    assert gpu["workers"] == 1 and gpu["cpu_fallback"] is True
    assert sorted(d["id"] for d in gpu["devices"]) == sorted(FAKE_GPUS)
    job = await gateway.call(
        "POST",
        "/v1/jobs",
        json={"task": "gpu.fft", "args": [16], "options": {"require_worker": True}},
    )
    assert job[0] == 202


def _inputs(n: int, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype))


async def test_fallback_results_equal_numpys(gpu_worker: GpuWorker, gateway: Gateway) -> None:
    """On the CPU fallback, matmul, fft and saxpy give NumPy's answers and say device cpu."""
    mm, ff, sx = await asyncio.gather(
        gateway.submit("gpu.matmul", 48, "float64", 2, 5),
        gateway.submit("gpu.fft", 1024, 9),
        gateway.submit("gpu.saxpy", 10_000, 2.5, 4),
    )
    mm, ff, sx = [(await gateway.wait(j["id"], 60))["result"] for j in (mm, ff, sx)]
    a, b = _inputs(48, "float64", 5)
    assert mm["device"] == "cpu" and mm["checksum"] == pytest.approx(float((a @ b).sum()))
    assert mm["tflops"] > 0
    rng = np.random.default_rng(9)
    x = rng.standard_normal(1024) + 1j * rng.standard_normal(1024)
    assert ff["device"] == "cpu"
    assert ff["checksum"] == pytest.approx(float(np.abs(np.fft.fft(x)).sum()))
    rng = np.random.default_rng(4)
    xs = rng.standard_normal(10_000).astype(np.float32)
    ys = rng.standard_normal(10_000).astype(np.float32)
    expected = float((np.float32(2.5) * xs + ys).sum(dtype=np.float64))
    assert sx["device"] == "cpu" and sx["checksum"] == pytest.approx(expected, rel=1e-6)


def test_without_gpu_or_fallback_the_task_raises_nogpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """No device and no fallback: a clear NoGPU error that names the fix."""
    if visible_gpus():
        pytest.skip("this host has a GPU")  # only where a GPU is present
    monkeypatch.delenv("COREFLEET_GPU_FALLBACK", raising=False)
    with pytest.raises(NoGPU, match="COREFLEET_GPU_FALLBACK=cpu"):
        matmul(8)


@pytest.mark.usefixtures("celery_worker")
async def test_a_gpu_job_on_a_worker_without_fallback_fails_with_nogpu(gateway: Gateway) -> None:
    """Routed to a worker with no GPU and no fallback, the job fails with NoGPU."""
    if visible_gpus():
        pytest.skip("this host has a GPU")  # only where a GPU is present
    job = await gateway.submit("gpu.matmul", 8, queue="cpu")
    done = await gateway.wait(job["id"], 60)
    assert done["state"] == "failed" and done["error"]["type"] == "NoGPU"
