"""The task registry: marking, loading, describing and argument checking."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from service.settings import Settings, SettingsError
from tasks import Registry, bind_arguments, task


def test_load_collects_builtin_and_extra_modules() -> None:
    """Registry.load finds the built-in io tasks and those of COREFLEET_TASK_MODULES."""
    registry = Registry.load(["tests.fleet_tasks"])
    names = {spec.name for spec in registry}
    assert {"io.sleep", "io.echo", "io.http_get", "test.hold"} <= names


def test_two_tasks_with_one_name_are_refused() -> None:
    """A second function registered under a taken name is an error, not a silent override."""
    module = types.ModuleType("m")

    @task("dup.x", kind="io")
    async def one() -> None: ...

    @task("dup.x", kind="io")
    async def two() -> None: ...

    one.__module__ = two.__module__ = "m"
    module.one, module.two = one, two  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"dup\.x"):
        Registry().add_module(module)


def test_bad_declarations_are_refused() -> None:
    """Unknown kinds and engines fail at import time, where the author sees them."""
    with pytest.raises(ValueError, match="kind"):
        task(kind="quantum")
    with pytest.raises(ValueError, match="engine"):
        task(kind="cpu", engine="spark")


def test_declared_limits_are_checked_where_the_author_sees_them() -> None:
    """A time limit, retry count or backoff no job could live with fails at import time,
    as the same values do as a submit's options."""
    for timeout in (0, -3, float("nan"), "30", True):
        with pytest.raises(ValueError, match="timeout_s"):
            task(kind="io", timeout_s=timeout)  # type: ignore[arg-type]
    for retries in (-1, 100, 2.5):
        with pytest.raises(ValueError, match="max_retries"):
            task(kind="io", max_retries=retries)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retry_backoff_s"):
        task(kind="io", retry_backoff_s=1e9, retry_backoff_max_s=1e10)

    @task("limits.ok", kind="io", max_retries=99, retry_backoff_s=1, retry_backoff_max_s=60)
    async def ok() -> None: ...

    spec = Registry([ok.__corefleet_task__]).get("limits.ok")  # type: ignore[attr-defined]
    assert spec is not None and 30 <= spec.retry_delay(99) <= 60
    assert spec.retry_delay(5000) <= 60  # no OverflowError from 2.0 ** 4999


def test_resources_are_checked_where_the_author_sees_them() -> None:
    """Resources Ray would not take, or on a task that does not run on Ray (nothing would
    read them), fail at import time rather than being dropped."""
    for bad in ({"num_gpu": 1}, {"num_cpus": -1}, {"num_cpus": 0.00001}, {"memory": "1G"}):
        with pytest.raises(ValueError, match="resources"):
            task(kind="heavy", resources=bad)  # type: ignore[arg-type]
    for kind, engine in (("cpu", None), ("gpu", None), ("io", None), ("heavy", "dask")):
        with pytest.raises(ValueError, match="Ray tasks only"):
            task(kind=kind, engine=engine, resources={"num_cpus": 1})


def test_a_task_on_another_engine_than_its_kinds_gets_that_engines_queue() -> None:
    """A gpu task run on Ray (as the README suggests) travels on Ray's queue, not on the
    Celery queue ``gpu`` of the built-in gpu tasks, which would refuse the mix."""

    @task("mine.gpu_on_ray", kind="gpu", engine="ray", resources={"num_gpus": 1})
    def on_ray() -> None: ...

    @task("mine.cpu_on_dask", kind="cpu", engine="dask")
    def on_dask() -> None: ...

    registry = Registry.load()
    for fn in (on_ray, on_dask):
        registry.add(fn.__corefleet_task__)  # type: ignore[attr-defined]
    assert [registry.get(name).queue for name in ("mine.gpu_on_ray", "mine.cpu_on_dask")] == [  # type: ignore[union-attr]
        "heavy",
        "dask",
    ]
    assert registry.engine_of_queue("gpu") == "celery"


def test_an_annotation_that_does_not_resolve_leaves_the_others_checked() -> None:
    """A name imported for type checkers only (``if TYPE_CHECKING:``) cannot be resolved
    at run time; the other parameters are still checked."""

    @task("hints.partial", kind="io")
    async def partial(n: int, client: NotImportedHere) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    spec = Registry([partial.__corefleet_task__]).get("hints.partial")  # type: ignore[attr-defined]
    assert spec is not None
    problem = bind_arguments(spec, ["x", None], {})
    assert problem is not None and "'n' must be int, not str" in problem
    assert bind_arguments(spec, [1, {"any": "thing"}], {}) is None


def test_binding_names_the_problem() -> None:
    """Argument errors say which argument and which type."""
    spec = Registry.load().get("io.http_get")
    assert spec is not None
    assert bind_arguments(spec, ["http://x"], {}) is None
    problem = bind_arguments(spec, [5], {})
    assert problem is not None and "'url' must be str, not int" in problem
    problem = bind_arguments(spec, [], {})
    assert problem is not None and "url" in problem


def test_settings_reject_bad_values() -> None:
    """A malformed COREFLEET_* value names the variable instead of failing later."""
    with pytest.raises(SettingsError, match="COREFLEET_PORT"):
        Settings.from_env({"COREFLEET_PORT": "eighty"})
    with pytest.raises(SettingsError, match="COREFLEET_EMBEDDED_IO_WORKER"):
        Settings.from_env({"COREFLEET_EMBEDDED_IO_WORKER": "maybe"})
    settings = Settings.from_env({"COREFLEET_IO_QUEUES": "a, b", "COREFLEET_PORT": "9"})
    assert settings.io.queues == ("a", "b") and settings.gateway.port == 9
    # NaN passes a "not below the minimum" check; neither it nor infinity is a setting.
    for odd in ("nan", "inf", "-inf"):
        with pytest.raises(SettingsError, match="COREFLEET_IO_LEASE_S must be a finite number"):
            Settings.from_env({"COREFLEET_IO_LEASE_S": odd})
    # A wait longer than the gateway's deadline makes room for would end as a false 503.
    with pytest.raises(SettingsError, match="COREFLEET_MAX_WAIT_S must be at most 3600"):
        Settings.from_env({"COREFLEET_MAX_WAIT_S": "7200"})
    assert Settings.from_env({"COREFLEET_MAX_WAIT_S": "3600"}).gateway.max_wait_s == 3600


def test_importing_the_service_imports_no_engine() -> None:
    """`import service.app` loads no ray, dask, numba, cupy or celery."""
    code = (
        "import sys, service.app, clients, tasks; "
        "print(sorted(m for m in ('ray','dask','numba','cupy','celery') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
