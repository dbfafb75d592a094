"""Long-running processes: ``corefleet gateway`` and ``corefleet io-worker``."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from service.app import create_app
from service.engines.asyncio_ import consumer_name, io_worker
from service.runner import JobRunner
from service.settings import Settings
from service.store import JobStore, connect
from tasks import Registry


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


#: Hosts only this machine reaches.
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def run_gateway(settings: Settings) -> None:
    configure_logging(settings.log_level)
    gateway = settings.gateway
    if gateway.host not in _LOOPBACK and not (gateway.api_tokens or gateway.read_tokens):
        logging.getLogger("corefleet.gateway").warning(
            "listening on %s without API tokens: whoever reaches it can submit and cancel "
            "jobs (set COREFLEET_API_TOKENS)",
            gateway.host,
        )
    app = create_app(settings)
    web.run_app(
        app,
        host=settings.gateway.host,
        port=settings.gateway.port,
        print=lambda *_: None,
        access_log=None,
        handle_signals=True,
    )


async def _io_worker(settings: Settings) -> None:
    redis = connect(settings.redis)
    # The runners' own client waits for Redis however long it is away: a job that ran
    # and could not store its outcome would otherwise run again once its lease ended.
    runner_redis = connect(settings.redis, until_answered=True)
    name = consumer_name()
    store = JobStore(runner_redis, settings.job_ttl_s)
    runner = JobRunner(store, Registry.load(settings.task_modules), worker_id=name)
    worker = io_worker(redis, runner, settings.io, name=name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logging.getLogger("corefleet.io").info(
        "io worker %s consuming %s, %d at once",
        name,
        ",".join(settings.io.queues),
        settings.io.concurrency,
    )
    try:
        await worker.run(stop)
    finally:
        await redis.aclose()
        await runner_redis.aclose()


def run_io_worker(settings: Settings) -> None:
    configure_logging(settings.log_level)
    asyncio.run(_io_worker(settings))
