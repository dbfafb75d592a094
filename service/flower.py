"""``corefleet flower``: Flower on corefleet's broker; basic auth required off loopback,
and for its API everywhere."""

from __future__ import annotations

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
    """Flower's UI shows what it shows to whoever reaches it; its API (which can shut
    workers down, revoke and send tasks) takes basic auth. Without credentials it stays
    closed, even on loopback: an open Flower API answers any web page's scripts (it
    sends ``Access-Control-Allow-Origin: *``), so any site the operator visits could
    drive it."""
    make_celery_app(settings).start(argv=flower_argv(settings))
