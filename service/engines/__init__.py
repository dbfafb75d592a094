"""One module per engine. Importing this package imports no engine library."""

from __future__ import annotations

import redis.asyncio as aioredis

from service.engines.asyncio_ import AsyncioEngine
from service.engines.base import Engine
from service.engines.celery_ import CeleryEngine
from service.engines.dask_ import DaskEngine
from service.engines.ray_ import RayEngine
from service.settings import Settings


def build_engines(redis: aioredis.Redis, settings: Settings) -> dict[str, Engine]:
    """Every engine a gateway or producer can hand jobs to, by name."""
    return {
        "asyncio": AsyncioEngine(redis, settings.io.queues),
        "celery": CeleryEngine(redis, settings),
        "ray": RayEngine(redis, settings),
        "dask": DaskEngine(redis, settings),
    }
