"""`corefleet up` with no Redis around starts the embedded one and leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import IO, Any

import pytest
import redis

from service.settings import GatewaySettings, Settings
from service.up import Stack, UpError, shown
from tests.procs import ROOT, alive, env_with, free_port, http_ok, process_tree, wait_until


def test_up_starts_embedded_redis_serves_a_job_and_stops_cleanly(tmp_path: Path) -> None:
    """up → embedded Redis, gateway, worker, Flower; io, cpu, gpu (fallback) and heavy jobs
    succeed; SIGHUP (as SIGINT and SIGTERM) stops every process, Ray's included."""
    redis_port, port, flower_port = free_port(), free_port(), free_port()
    proc, log = _up(tmp_path, redis_port, port, flower_port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: "corefleet is up" in (tmp_path / "up.log").read_text(), 90, "up")
        banner = (tmp_path / "up.log").read_text()
        assert f"redis://127.0.0.1:{redis_port}/0  (embedded" in banner
        assert (tmp_path / "data" / "redis").is_dir()
        tree = process_tree(proc.pid)
        assert f"flower     http://127.0.0.1:{flower_port}" in banner
        assert f"dashboard  {url}/dashboard" in banner
        assert http_ok(f"{url}/dashboard")
        # No GPU here: up says so, and its gpu worker runs gpu jobs on the CPU fallback.
        assert "no GPU found: gpu jobs run on the CPU" in banner
        assert http_ok(f"http://127.0.0.1:{flower_port}/healthcheck")
        assert len(tree) >= 5  # up, the embedded Redis, the gateway, the worker, Flower
        job = _call(url + "/v1/jobs", {"task": "io.echo", "args": ["hi"]})
        done = _call(f"{url}/v1/jobs/{job['id']}?wait=30")
        assert done["state"] == "succeeded" and done["result"] == "hi"
        job = _call(url + "/v1/jobs", {"task": "cpu.count_primes", "args": [100]})
        done = _call(f"{url}/v1/jobs/{job['id']}?wait=60")
        assert done["state"] == "succeeded" and done["result"] == 25
        done = _call(url + "/v1/jobs?wait=60", {"task": "gpu.fft", "args": [8]})
        assert done["state"] == "succeeded" and done["result"]["device"] == "cpu"
        # A heavy job starts the gateway's local Ray and Ray's dispatcher actor inside it.
        done = _call(url + "/v1/jobs?wait=60", {"task": "heavy.pi", "args": [100_000, 2, 1]})
        assert done["state"] == "succeeded" and abs(done["result"]["pi"] - 3.14) < 0.05
        # A local Ray never grows: a job asking for what it has none of fails at once,
        # rather than waiting in Ray for good.
        gpu_pi = {"task": "heavy.pi", "args": [1000], "options": {"resources": {"num_gpus": 1}}}
        done = _call(url + "/v1/jobs?wait=60", gpu_pi)
        assert done["state"] == "failed" and done["error"]["type"] == "Infeasible", done
        assert "has num_gpus 0" in done["error"]["message"]
        # heavy.pi has a time limit: Ray's dispatcher followed job events while it waited
        # to start, and lets go of them although it never started (only the gateway's own
        # subscription is left).
        events = redis.Redis(port=redis_port)
        try:
            wait_until(lambda: _subscribers(events, "cf:events") == 1, 30, "events let go")
        finally:
            events.close()
        tree = process_tree(proc.pid)
        # Ray's processes, the detached dispatcher among them, are up's to stop as well.
        assert any("RayDispatcherActor" in _cmdline(pid) for pid in tree)
        # A closed terminal: the children have sessions of their own, so only up hears it.
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(60) == 0
        wait_until(lambda: not any(alive(pid) for pid in tree), 30, "children to exit")
        assert not http_ok(url + "/healthz")
    finally:
        if proc.poll() is None:
            for pid in process_tree(proc.pid):
                os.kill(pid, signal.SIGKILL)
        log.close()


def test_the_stack_stops_when_up_is_killed_outright(tmp_path: Path) -> None:
    """A SIGKILL gives up no chance to stop its children: each gets a SIGTERM from the
    kernel (the parent-death signal) and stops on its own, grandchildren included. (With
    the gateway's embedded io worker off, up runs one in a process of its own.)"""
    port = free_port()
    proc, log = _up(tmp_path, free_port(), port, free_port(), COREFLEET_EMBEDDED_IO_WORKER="0")
    try:
        wait_until(lambda: "corefleet is up" in (tmp_path / "up.log").read_text(), 90, "up")
        assert "io worker  a process of its own" in (tmp_path / "up.log").read_text()
        done = _call(f"http://127.0.0.1:{port}/v1/jobs?wait=30", {"task": "io.echo", "args": [1]})
        assert done["state"] == "succeeded" and done["result"] == 1, done
        tree = process_tree(proc.pid) - {proc.pid}
        # The embedded Redis, the gateway, the io worker, the worker, Flower.
        assert len(tree) >= 5
        proc.kill()
        proc.wait(10)
        wait_until(lambda: not any(alive(pid) for pid in tree), 60, "children to exit")
    finally:
        for pid in process_tree(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()


def _up(
    tmp_path: Path, redis_port: int, port: int, flower_port: int, **extra_env: str
) -> tuple[subprocess.Popen[bytes], IO[str]]:
    """`corefleet up` with its own embedded Redis, data dir and ports (and ``extra_env``),
    its output in ``up.log``; and that log."""
    env = env_with(
        COREFLEET_REDIS_PORT=str(redis_port),
        COREFLEET_PORT=str(port),
        COREFLEET_FLOWER_PORT=str(flower_port),
        COREFLEET_WORKER_CONCURRENCY="1",
        COREFLEET_DATA_DIR=str(tmp_path / "data"),
        **extra_env,
    )
    env.pop("COREFLEET_REDIS_URL", None)
    log = (tmp_path / "up.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "up"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, log


def _subscribers(client: redis.Redis, channel: str) -> int:
    return int(dict(client.pubsub_numsub(channel))[channel.encode()])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _call(url: str, body: dict[str, Any] | None = None) -> Any:
    """GET ``url``, or POST ``body`` to it as JSON; the JSON answer (waits of up to 60 s)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(request, timeout=70) as resp:
        return json.loads(resp.read())


def test_a_second_up_on_the_same_data_dir_or_ports_is_refused(tmp_path: Path) -> None:
    """Two embedded servers on one append-only file would write over each other's data,
    and a stack beside another's ports would answer its readiness checks with the other's
    gateway: either is refused before anything starts."""
    first = Stack(Settings(data_dir=tmp_path))
    first.claim_data_dir(tmp_path / "redis")
    try:
        with pytest.raises(UpError, match="in use by another corefleet up"):
            Stack(Settings(data_dir=tmp_path)).claim_data_dir(tmp_path / "redis")
    finally:
        assert first.data_lock is not None
        first.data_lock.close()
    Stack(Settings(data_dir=tmp_path)).claim_data_dir(tmp_path / "redis")  # free again

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        settings = Settings(gateway=GatewaySettings(port=port))
        with pytest.raises(UpError, match=f"already listens on 127.0.0.1:{port}"):
            Stack(settings).check_ports()


def test_up_prints_a_redis_url_without_its_password() -> None:
    """The banner and errors go to terminals and journals: a Redis password never does."""
    assert shown("redis://:s3cret@redis.internal:6379/0") == "redis://:***@redis.internal:6379/0"
    assert shown("rediss://app:s3cret@[::1]:6380/2") == "rediss://app:***@[::1]:6380/2"
    assert shown("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert shown("unix:///run/redis.sock?db=1&password=s3cret") == (
        "unix:///run/redis.sock?db=1&password=***"
    )
    assert shown("redis://h:6379/0?password=s3cret") == "redis://h:6379/0?password=***"
    stack = Stack(Settings(redis_url="redis://:s3cret@127.0.0.1:1/0"))
    with pytest.raises(UpError) as refused:
        stack.resolve_redis()
    assert "s3cret" not in str(refused.value) and ":***@" in str(refused.value)
