"""Settings: frozen dataclasses read once from ``COREFLEET_*`` environment variables.

Every component receives the settings it needs explicitly. The one exception is
``COREFLEET_GPU_FALLBACK``, which the gpu tasks read in the worker process that runs them
(``corefleet worker --gpu`` sets it from these settings). The README's settings table lists
every variable, and a test keeps the two in step.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_REDIS_PORT = 6379
#: The longest ``?wait=`` a gateway may be configured to allow (COREFLEET_MAX_WAIT_S).
MAX_WAIT_LIMIT_S = 3600.0


class SettingsError(ValueError):
    """An environment variable holds a value corefleet cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, not {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, not {value}")
    return value


def _float(
    env: Mapping[str, str],
    name: str,
    default: float,
    minimum: float = 0.0,
    maximum: float = math.inf,
) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, not {raw!r}") from None
    if not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number, not {raw!r}")
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, not {value}")
    if value > maximum:
        raise SettingsError(f"{name} must be at most {maximum:g}, not {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be 1/0, true/false, yes/no or on/off, not {raw!r}")


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env.get(name, "")
    return tuple(part.strip() for part in raw.split(",") if part.strip())


#: The shortest API token accepted: shorter ones are guessable.
MIN_TOKEN_CHARS = 16
#: What a bearer token is made of (RFC 6750): what every client can send in a header.
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/=-]+")


def _tokens(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    tokens = _list(env, name)
    for token in tokens:
        if len(token) < MIN_TOKEN_CHARS or not _TOKEN_RE.fullmatch(token):
            raise SettingsError(
                f"each token in {name} must be at least {MIN_TOKEN_CHARS} characters of "
                "A-Z a-z 0-9 . _ ~ + / = -"
            )
    return tokens


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8000
    #: Bearer tokens that may use the whole API; with none (nor read tokens) the API is
    #: open to whoever reaches the gateway.
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    #: Bearer tokens that may only read (GET, HEAD): ops views, dashboards, scrapers.
    read_tokens: tuple[str, ...] = field(default=(), repr=False)
    #: Largest request body accepted; larger ones get a 413.
    max_body_bytes: int = 1024 * 1024
    #: Longest ``?wait=`` a client may ask for, in seconds.
    max_wait_s: float = 60.0
    #: Whether the gateway runs an io worker on its own event loop.
    embedded_io_worker: bool = True


@dataclass(frozen=True)
class IoWorkerSettings:
    #: Streams (asyncio queues) an io worker consumes.
    queues: tuple[str, ...] = ("io",)
    #: Jobs one io worker runs at once on its event loop.
    concurrency: int = 1000
    #: Seconds a job may sit unacknowledged with a silent consumer before another takes it.
    lease_s: float = 30.0


@dataclass(frozen=True)
class CelerySettings:
    #: Queues a ``corefleet worker`` consumes.
    queues: tuple[str, ...] = ("cpu",)
    #: Worker child processes; 0 means one per core.
    concurrency: int = 0
    max_tasks_per_child: int = 0
    #: Kilobytes of resident memory after which a child is replaced (0: no limit).
    max_memory_per_child_kb: int = 0
    #: Seconds a delivered message may stay unacknowledged before Redis redelivers it;
    #: always kept above the longest task time limit.
    visibility_timeout_s: int = 3600
    #: Time limit for cpu and gpu jobs whose task and job set none.
    default_time_limit_s: float = 1800.0
    #: On SIGTERM, how long running jobs may go on before the worker stops them and puts
    #: their messages back on the queue (where another worker takes them at once).
    shutdown_grace_s: float = 10.0


@dataclass(frozen=True)
class FlowerSettings:
    host: str = "127.0.0.1"
    port: int = 5555
    #: ``user:password[,user2:password2]``; required unless Flower listens on loopback.
    basic_auth: str = ""


@dataclass(frozen=True)
class EngineSettings:
    #: An existing Ray cluster (``ray://host:10001`` or ``host:6379``); empty: a local one.
    ray_address: str = ""
    #: CPUs a local Ray may use (0: all).
    ray_cpus: int = 0
    ray_dashboard: bool = False
    #: Ray's own record of each job's Ray task (its dashboard's task list, ``ray list
    #: tasks``). Off: corefleet records every job itself, and Ray's record costs about as
    #: much CPU per task as the task's whole round trip otherwise.
    ray_task_events: bool = False
    #: Ray jobs handed to Ray at once; the rest wait on corefleet's streams, where their
    #: priorities order them (Ray runs what it holds in its own order). 0: four per CPU
    #: of the cluster, at least 8.
    ray_in_flight: int = 0
    #: Ray actors kept between heavy jobs of one shape (the resources they ask for), so
    #: that such a job skips Ray's worker lease; 0: every job is a Ray task.
    ray_warm_runners: int = 4
    #: A Dask scheduler (``tcp://host:8786``); empty: a LocalCluster.
    dask_address: str = ""
    #: Worker processes of a local Dask cluster (0: one per core).
    dask_workers: int = 0
    #: ``cpu`` runs gpu tasks with NumPy/Numba where no GPU is present; empty: fail.
    gpu_fallback: str = ""


#: The ports a URL without one goes to.
DEFAULT_PORTS = {"http": 80, "https": 443}


@functools.cache
def webhook_addresses(allowed_hosts: tuple[str, ...]) -> frozenset[tuple[str, int | None]]:
    """The (host, port) pairs ``COREFLEET_WEBHOOK_HOSTS`` allows: ``name:port`` that port
    only, a bare ``name`` the default ports of http and https (80, 443). IPv6 literals are
    written in brackets. Raises ``ValueError`` for an entry that is not a host."""
    allowed: set[tuple[str, int | None]] = set()
    for entry in allowed_hosts:
        parts = urlsplit(f"//{entry}")
        if not parts.hostname or parts.path or parts.query or parts.fragment or parts.username:
            raise ValueError(f"{entry!r} is not a host or host:port")
        if parts.port is not None:
            allowed.add((parts.hostname, parts.port))
        else:
            allowed |= {(parts.hostname, port) for port in DEFAULT_PORTS.values()}
    return frozenset(allowed)


@dataclass(frozen=True)
class WebhookSettings:
    #: Hosts (``name``, or ``name:port`` for that port only) a job's webhook may call;
    #: with none, webhooks are off.
    hosts: tuple[str, ...] = ()
    #: When set, every try is signed with each (``Corefleet-Signature``); more than one
    #: while a secret is rotated.
    secrets: tuple[str, ...] = field(default=(), repr=False)
    #: How long a receiver may take to answer, in seconds.
    timeout_s: float = 10.0
    #: The wait before a failed delivery is tried again; it doubles for each try after.
    first_retry_s: float = 1.0


#: Seconds an ``Idempotency-Key`` keeps standing for its job unless configured.
DEFAULT_IDEMPOTENCY_TTL_S = 24 * 3600


@dataclass(frozen=True)
class Settings:
    #: Redis URL; ``None`` means "find one" (``corefleet up``) or the default local one.
    redis_url: str | None = None
    #: Port ``corefleet up`` probes on 127.0.0.1 and starts the embedded server on.
    redis_port: int = DEFAULT_REDIS_PORT
    #: Where ``corefleet up`` keeps the embedded server's files.
    data_dir: Path = Path(".corefleet")
    #: Extra modules whose ``@task`` functions are registered in every process.
    task_modules: tuple[str, ...] = ()
    #: Seconds a finished job's record is kept.
    job_ttl_s: int = 7 * 24 * 3600
    #: Seconds an ``Idempotency-Key`` keeps standing for the job it created.
    idempotency_ttl_s: int = DEFAULT_IDEMPOTENCY_TTL_S
    #: The most jobs one queue may hold; submits to a fuller queue get a 429. 0: no limit.
    max_queue_length: int = 0
    log_level: str = "INFO"
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    io: IoWorkerSettings = field(default_factory=IoWorkerSettings)
    celery: CelerySettings = field(default_factory=CelerySettings)
    flower: FlowerSettings = field(default_factory=FlowerSettings)
    engines: EngineSettings = field(default_factory=EngineSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)

    @property
    def redis(self) -> str:
        """The Redis URL every component connects to."""
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    def with_redis(self, url: str) -> Settings:
        return replace(self, redis_url=url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        gateway = GatewaySettings(
            host=env.get("COREFLEET_HOST", "127.0.0.1"),
            port=_int(env, "COREFLEET_PORT", 8000),
            max_body_bytes=_int(env, "COREFLEET_MAX_BODY_BYTES", 1024 * 1024, minimum=1024),
            max_wait_s=_float(env, "COREFLEET_MAX_WAIT_S", 60.0, maximum=MAX_WAIT_LIMIT_S),
            embedded_io_worker=_bool(env, "COREFLEET_EMBEDDED_IO_WORKER", True),
            api_tokens=_tokens(env, "COREFLEET_API_TOKENS"),
            read_tokens=_tokens(env, "COREFLEET_READ_TOKENS"),
        )
        io = IoWorkerSettings(
            queues=_list(env, "COREFLEET_IO_QUEUES") or ("io",),
            concurrency=_int(env, "COREFLEET_IO_CONCURRENCY", 1000, minimum=1),
            lease_s=_float(env, "COREFLEET_IO_LEASE_S", 30.0, minimum=0.1),
        )
        celery = CelerySettings(
            queues=_list(env, "COREFLEET_WORKER_QUEUES") or ("cpu",),
            concurrency=_int(env, "COREFLEET_WORKER_CONCURRENCY", 0),
            max_tasks_per_child=_int(env, "COREFLEET_WORKER_MAX_TASKS_PER_CHILD", 0),
            max_memory_per_child_kb=_int(env, "COREFLEET_WORKER_MAX_MEMORY_PER_CHILD_KB", 0),
            visibility_timeout_s=_int(env, "COREFLEET_VISIBILITY_TIMEOUT_S", 3600, minimum=1),
            default_time_limit_s=_float(
                env, "COREFLEET_DEFAULT_TIME_LIMIT_S", 1800.0, minimum=0.001
            ),
            shutdown_grace_s=_float(env, "COREFLEET_WORKER_SHUTDOWN_GRACE_S", 10.0),
        )
        flower = FlowerSettings(
            host=env.get("COREFLEET_FLOWER_HOST", "127.0.0.1"),
            port=_int(env, "COREFLEET_FLOWER_PORT", 5555, minimum=1),
            basic_auth=env.get("COREFLEET_FLOWER_BASIC_AUTH", ""),
        )
        engines = EngineSettings(
            ray_address=env.get("COREFLEET_RAY_ADDRESS", ""),
            ray_cpus=_int(env, "COREFLEET_RAY_CPUS", 0),
            ray_dashboard=_bool(env, "COREFLEET_RAY_DASHBOARD", False),
            ray_task_events=_bool(env, "COREFLEET_RAY_TASK_EVENTS", False),
            ray_in_flight=_int(env, "COREFLEET_RAY_IN_FLIGHT", 0),
            ray_warm_runners=_int(env, "COREFLEET_RAY_WARM_RUNNERS", 4),
            dask_address=env.get("COREFLEET_DASK_ADDRESS", ""),
            dask_workers=_int(env, "COREFLEET_DASK_WORKERS", 0),
            gpu_fallback=env.get("COREFLEET_GPU_FALLBACK", ""),
        )
        webhooks = WebhookSettings(
            hosts=tuple(host.lower() for host in _list(env, "COREFLEET_WEBHOOK_HOSTS")),
            secrets=_list(env, "COREFLEET_WEBHOOK_SECRET"),
            timeout_s=_float(env, "COREFLEET_WEBHOOK_TIMEOUT_S", 10.0, minimum=0.1),
            first_retry_s=_float(env, "COREFLEET_WEBHOOK_FIRST_RETRY_S", 1.0, minimum=0.1),
        )
        try:
            webhook_addresses(webhooks.hosts)
        except ValueError as exc:
            raise SettingsError(f"COREFLEET_WEBHOOK_HOSTS: {exc}") from None
        if engines.gpu_fallback not in ("", "cpu"):
            raise SettingsError("COREFLEET_GPU_FALLBACK must be empty or 'cpu'")
        return cls(
            redis_url=env.get("COREFLEET_REDIS_URL") or None,
            redis_port=_int(env, "COREFLEET_REDIS_PORT", DEFAULT_REDIS_PORT, minimum=1),
            data_dir=Path(env.get("COREFLEET_DATA_DIR", ".corefleet")),
            task_modules=_list(env, "COREFLEET_TASK_MODULES"),
            job_ttl_s=_int(env, "COREFLEET_JOB_TTL_S", 7 * 24 * 3600, minimum=1),
            idempotency_ttl_s=_int(
                env, "COREFLEET_IDEMPOTENCY_TTL_S", DEFAULT_IDEMPOTENCY_TTL_S, minimum=1
            ),
            max_queue_length=_int(env, "COREFLEET_MAX_QUEUE_LENGTH", 0, minimum=0),
            log_level=env.get("COREFLEET_LOG_LEVEL", "INFO").upper(),
            gateway=gateway,
            io=io,
            celery=celery,
            flower=flower,
            engines=engines,
            webhooks=webhooks,
        )


def env_names() -> set[str]:
    """Every ``COREFLEET_*`` variable the program reads (for docs and config checks)."""
    names: set[str] = set()
    root = Path(__file__).resolve().parent.parent
    for package in ("service", "tasks", "clients"):
        for path in (root / package).rglob("*.py"):
            names.update(re.findall(r'"(COREFLEET_[A-Z0-9_]+)"', path.read_text()))
    return names
