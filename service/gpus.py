"""The GPUs this host shows a worker, found without initialising CUDA in this process.

A CUDA context made before the pool forks would be shared by every child (and break), so
the worker's main process asks ``nvidia-smi`` instead, and honours ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Gpu:
    #: What a child's ``CUDA_VISIBLE_DEVICES`` is set to: an index or a UUID.
    id: str
    name: str = "unknown"
    memory_mb: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _nvidia_smi() -> list[dict[str, str]]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.strip().splitlines():
        index, uuid, name, memory = (part.strip() for part in line.split(","))
        rows.append({"index": index, "uuid": uuid, "name": name, "memory": memory})
    return rows


def visible_gpus(env: dict[str, str] | None = None) -> list[Gpu]:
    """The devices a worker may use: ``CUDA_VISIBLE_DEVICES`` if set, else every GPU."""
    env = dict(os.environ) if env is None else env
    found = _nvidia_smi()
    by_id = {row["index"]: row for row in found} | {row["uuid"]: row for row in found}
    chosen = env.get("CUDA_VISIBLE_DEVICES")
    ids = (
        [part.strip() for part in chosen.split(",") if part.strip() and part.strip() != "-1"]
        if chosen is not None
        else [row["index"] for row in found]
    )
    gpus = []
    for gpu_id in ids:
        row = by_id.get(gpu_id)
        memory = row["memory"] if row else ""
        gpus.append(
            Gpu(
                gpu_id,
                row["name"] if row else "unknown",
                int(float(memory)) if memory.replace(".", "", 1).isdigit() else None,
            )
        )
    return gpus
