"""Shared helpers for the benchmarks: free ports, child processes, Redis, result tables.

Every process a benchmark starts is a ``Proc``: its output goes to a log file under
``bench/results/logs/``, and it is stopped by its own PID (SIGTERM, then SIGKILL).
Nothing here imports corefleet, so the helpers also work for third-party baselines.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
LOGS = RESULTS / "logs"
#: The project venv's interpreter (the runner is meant to be started with it).
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``check`` until it is true (for processes with no way to signal readiness)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:g} s")
        time.sleep(interval)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return int(resp.status) == 200
    except OSError:
        return False


def stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


class Proc:
    """A child process with its output in a log file; a context manager that stops it."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path = ROOT
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"{stamp()}-{name}-{os.getpid()}-{free_port()}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU time this process has used so far (Linux /proc)."""
        try:
            return _stat(self.pid)[1]
        except (OSError, AssertionError):
            return float("nan")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _check_alive(self) -> bool:
        if not self.alive():
            raise RuntimeError(
                f"{self.name} exited early; its log ({self.log_path}):\n{self.log_text()[-3000:]}"
            )
        return True

    def wait_ready(self, check: Callable[[], bool], timeout: float = 30.0) -> None:
        wait_until(lambda: self._check_alive() and check(), timeout, self.name)

    def wait_log(self, marker: str, timeout: float = 30.0) -> None:
        self.wait_ready(lambda: marker in self.log_text(), timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM this process (by its PID), then SIGKILL if it lingers."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def __enter__(self) -> Self:
        if self.popen is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stat(pid: int) -> tuple[int, float]:
    """A process's parent and the user + system CPU seconds it has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> dict[int, tuple[str, float]]:
    """Each process of the tree under ``root`` (itself included), running now: its command
    line (as it names itself: Ray's workers say ``ray::...``) and CPU seconds so far."""
    found: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = _stat(int(entry.name))
            except OSError:  # it ended meanwhile
                continue
    children: dict[int, list[int]] = {}
    for pid, (parent, _cpu) in found.items():
        children.setdefault(parent, []).append(pid)
    tree: dict[int, tuple[str, float]] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            continue
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        tree[pid] = (command.strip(), found[pid][1])
        todo += children.get(pid, [])
    return tree


def cpu_by_role(
    before: Mapping[int, tuple[str, float]],
    after: Mapping[int, tuple[str, float]],
    role: Callable[[int, str], str],
) -> dict[str, float]:
    """CPU seconds used between two ``tree_cpu`` readings, summed by ``role(pid, command)``;
    processes that started or ended in between are left out."""
    used: dict[str, float] = {}
    for pid, (command, cpu) in after.items():
        if pid in before:
            name = role(pid, command)
            used[name] = used.get(name, 0.0) + cpu - before[pid][1]
    return used


class RedisServer(Proc):
    """A throwaway redis-server on a free loopback port, with no persistence."""

    def __init__(self, port: int | None = None, extra: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        super().__init__(
            "redis",
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                *extra,
            ],
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        super().start()
        self.wait_ready(self.ping, 15)
        return self

    def command(self, *args: str) -> Any:
        """Run one Redis command with the sync redis-py client of this interpreter."""
        import redis

        client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=30, decode_responses=True
        )
        try:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def ping(self) -> bool:
        try:
            return bool(self.command("PING"))
        except Exception:
            return False

    def flush(self) -> None:
        self.command("FLUSHALL")

    def version(self) -> str:
        info = self.command("INFO", "server")
        if isinstance(info, dict):
            return str(info.get("redis_version", "?"))
        for line in str(info).splitlines():
            if line.startswith("redis_version:"):
                return line.split(":", 1)[1]
        return "?"


def run_json_child(
    name: str, argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run a helper to completion; its last stdout line that starts with ``{`` is the result."""
    proc = subprocess.run(
        list(argv),
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return dict(json.loads(lines[-1]))


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    cells = [[fmt(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    print()
    print(title)
    print("  ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )


def save_results(name: str, payload: Mapping[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{stamp()}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def verdict(ratio: float, target: float, problem: str = "") -> str:
    """The ratio against its target; ``problem`` (requests refused, results that did not
    check out) makes it void: a system that fails fast must not look fast."""
    if problem:
        return f"{ratio:.2f} (NOT VALID: {problem})"
    return f"{ratio:.2f} ({'meets' if ratio >= target else 'BELOW'} target >= {target:g})"


def unverified(runs: Iterable[Mapping[str, Any]], n: int) -> str:
    """What is wrong with ``runs`` whose results were checked (``verified_results`` of
    ``n``): "" when every result of every run was right."""
    short = [int(run["verified_results"]) for run in runs if int(run["verified_results"]) != n]
    return f"only {min(short)} of {n} results were right in a run" if short else ""
