"""Settings: frozen dataclasses read once from ``COREFLEET_*`` environment variables.

Every component receives the settings it needs explicitly; nothing reads the environment
later. The README's settings table lists every variable read here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path


DEFAULT_REDIS_PORT = 6379


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


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, not {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, not {value}")
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


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8000
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
    log_level: str = "INFO"
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    io: IoWorkerSettings = field(default_factory=IoWorkerSettings)

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
            max_wait_s=_float(env, "COREFLEET_MAX_WAIT_S", 60.0),
            embedded_io_worker=_bool(env, "COREFLEET_EMBEDDED_IO_WORKER", True),
        )
        io = IoWorkerSettings(
            queues=_list(env, "COREFLEET_IO_QUEUES") or ("io",),
            concurrency=_int(env, "COREFLEET_IO_CONCURRENCY", 1000, minimum=1),
            lease_s=_float(env, "COREFLEET_IO_LEASE_S", 30.0, minimum=0.1),
        )
        return cls(
            redis_url=env.get("COREFLEET_REDIS_URL") or None,
            redis_port=_int(env, "COREFLEET_REDIS_PORT", DEFAULT_REDIS_PORT, minimum=1),
            data_dir=Path(env.get("COREFLEET_DATA_DIR", ".corefleet")),
            task_modules=_list(env, "COREFLEET_TASK_MODULES"),
            job_ttl_s=_int(env, "COREFLEET_JOB_TTL_S", 7 * 24 * 3600, minimum=1),
            log_level=env.get("COREFLEET_LOG_LEVEL", "INFO").upper(),
            gateway=gateway,
            io=io,
        )


def env_names() -> set[str]:
    """Every ``COREFLEET_*`` variable the program reads (for docs and config checks)."""
    import re

    names: set[str] = set()
    root = Path(__file__).resolve().parent.parent
    for package in ("service", "tasks", "clients"):
        for path in (root / package).rglob("*.py"):
            names.update(re.findall(r'"(COREFLEET_[A-Z0-9_]+)"', path.read_text()))
    return names


