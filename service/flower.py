"""``corefleet flower``: Flower on corefleet's broker, with basic auth off loopback."""

from __future__ import annotations

import os

from service.engines.celery_ import make_celery_app
from service.settings import Settings, SettingsError

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def flower_argv(settings: Settings) -> list[str]:
    flower = settings.flower
    if not flower.basic_auth and flower.host not in _LOOPBACK:
        raise SettingsError(
            f"COREFLEET_FLOWER_BASIC_AUTH (user:password) is required when Flower listens "
            f"on {flower.host}, beyond this machine"
        )
    argv = ["flower", f"--address={flower.host}", f"--port={flower.port}"]
    if flower.basic_auth:
        argv.append(f"--basic_auth={flower.basic_auth}")
    return argv


def run_flower(settings: Settings) -> None:
    argv = flower_argv(settings)
    if not settings.flower.basic_auth:
        # Loopback only: the API is as open as the UI, so scripts on this machine can use it.
        os.environ["FLOWER_UNAUTHENTICATED_API"] = "true"
    make_celery_app(settings).start(argv=argv)
