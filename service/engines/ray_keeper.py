"""Ray's keeper: the one process of a gateway that is connected to Ray.

Ray ends every process connected to a cluster once the cluster's GCS has been unreachable
for ``gcs_rpc_server_reconnect_timeout_s`` (60 s by default). Were the gateway connected
itself, a Ray head that dies would take the gateway down with it, io and cpu jobs included.
So the gateway starts this child instead: it starts a local Ray (or connects to
``COREFLEET_RAY_ADDRESS``), starts or finds Ray's dispatcher, hands it the gateway's
settings every few seconds, and stops a local Ray when it stops. If Ray ends it, the
gateway marks Ray unreachable (Ray jobs get a 503) and starts a new keeper once Ray is back.

The protocol is two pipes. The gateway writes one JSON line (``keeper_spec``) to stdin and
keeps stdin open: end of file means the gateway is gone, and the keeper stops. The keeper
answers one JSON line on stdout: ``{"dashboard": url or null}`` once Ray and its
dispatcher are up, or ``{"error": message}`` before it exits.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from typing import Any

from service.settings import EngineSettings, IoWorkerSettings, Settings

log = logging.getLogger("corefleet.ray")

#: How often the keeper hands Ray's dispatcher its settings again (and so restarts a lost
#: one): a dead actor means Ray jobs wait at most this long, plus the lease.
KEEP_DISPATCHER_S = 5.0


def keeper_spec(settings: Settings) -> dict[str, Any]:
    """What the keeper needs of the gateway's settings: what Ray's dispatcher is served."""
    engines = settings.engines
    return {
        "redis": settings.redis,
        "job_ttl_s": settings.job_ttl_s,
        "task_modules": list(settings.task_modules),
        "lease_s": settings.io.lease_s,
        "ray_address": engines.ray_address,
        "ray_cpus": engines.ray_cpus,
        "ray_dashboard": engines.ray_dashboard,
        "ray_task_events": engines.ray_task_events,
        "ray_in_flight": engines.ray_in_flight,
        "ray_warm_runners": engines.ray_warm_runners,
    }


def settings_of(spec: dict[str, Any]) -> Settings:
    return Settings(
        redis_url=str(spec["redis"]),
        job_ttl_s=int(spec["job_ttl_s"]),
        task_modules=tuple(spec["task_modules"]),
        io=IoWorkerSettings(lease_s=float(spec["lease_s"])),
        engines=EngineSettings(
            ray_address=str(spec["ray_address"]),
            ray_cpus=int(spec["ray_cpus"]),
            ray_dashboard=bool(spec["ray_dashboard"]),
            ray_task_events=bool(spec["ray_task_events"]),
            ray_in_flight=int(spec["ray_in_flight"]),
            ray_warm_runners=int(spec["ray_warm_runners"]),
        ),
    )


def _answer_channel() -> Any:
    """The pipe to the gateway, taken off stdout: from here on stdout is stderr, so nothing
    Ray prints (worker logs, say) can corrupt the answer or fill the pipe."""
    sys.stdout.flush()
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return channel


def _answer(channel: Any, message: dict[str, Any]) -> None:
    channel.write(json.dumps(message) + "\n")
    channel.close()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from service.engines.ray_ import start_ray
    from service.engines.ray_dispatcher import (
        ANSWER_TIMEOUT_S,
        START_TIMEOUT_S,
        ensure_dispatcher,
    )

    channel = _answer_channel()
    settings = settings_of(json.loads(sys.stdin.readline()))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def until_gateway_gone() -> None:
        # End of file on stdin: the gateway is gone (even by kill -9), so is its keeper.
        sys.stdin.read()
        stop.set()

    threading.Thread(target=until_gateway_gone, daemon=True).start()

    # Short and our own: Ray's socket paths must stay under the 107-byte limit.
    temp_dir = None
    if not settings.engines.ray_address:
        temp_dir = tempfile.mkdtemp(prefix="cf-ray-", dir="/tmp")
    try:
        try:
            dashboard = start_ray(settings.engines, temp_dir or tempfile.gettempdir())
            ensure_dispatcher(settings, START_TIMEOUT_S)
        except Exception as exc:
            _answer(channel, {"error": f"{type(exc).__name__}: {exc}"})
            return 1
        _answer(channel, {"dashboard": dashboard})
        while not stop.wait(KEEP_DISPATCHER_S):
            try:
                # Also restarts a dispatcher lost with its node.
                ensure_dispatcher(settings, ANSWER_TIMEOUT_S)
            except Exception:  # a Ray error: tried again next time
                log.exception("could not reach Ray's dispatcher")
        return 0
    finally:
        import ray

        # A local Ray stops with its keeper, dispatcher and running jobs included; their
        # entries stay pending and run again once Ray is back.
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
