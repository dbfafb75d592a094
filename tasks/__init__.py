"""The task registry: ``@task`` marks a function, a ``Registry`` collects marked functions.

``@task`` only attaches a ``TaskSpec`` to the function; nothing is registered globally.
Each process builds its own ``Registry`` from the built-in modules and the modules named
in ``COREFLEET_TASK_MODULES``, so the gateway and every worker agree on the same list and
tests never have to reset shared state.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import random
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tasks.context import MAX_DELAY_S, MAX_TIMEOUT_S, Retry, TaskContext

__all__ = ["BUILTIN_MODULES", "Registry", "Retry", "TaskContext", "TaskSpec", "task"]

F = TypeVar("F", bound=Callable[..., Any])

#: Modules of built-in tasks; each imports its heavy libraries only inside the tasks.
BUILTIN_MODULES = ("tasks.io", "tasks.cpu", "tasks.gpu", "tasks.heavy")

KINDS = ("io", "cpu", "heavy", "gpu")
DEFAULT_ENGINE = {"io": "asyncio", "cpu": "celery", "heavy": "ray", "gpu": "celery"}
ENGINES = ("asyncio", "celery", "ray", "dask")
#: Dask jobs get a queue of their own: Ray's dispatcher (inside Ray) and Dask's (in the
#: gateway) read different streams, and one stream must carry one engine's jobs.
DASK_QUEUE = "dask"
#: The queue of a task that names none and runs on another engine than its kind's: the one
#: that engine's workers read unless told (a queue carries one engine's jobs).
ENGINE_QUEUE = {"asyncio": "io", "celery": "cpu", "ray": "heavy", "dask": DASK_QUEUE}

#: The resources a Ray job may ask for (a task's ``resources``, a job's option), as Ray's
#: ``.options()`` names them; ``memory`` is in bytes.
RESOURCE_NAMES = ("num_cpus", "num_gpus", "memory")
#: The most of any resource a job may ask for (memory in bytes, 8 EiB).
MAX_RESOURCE = 2**63
#: The least, other than none: Ray counts resources in steps of 1/10,000 and refuses less.
MIN_RESOURCE = 0.0001

#: A job's priority levels, in the order workers take them: of the jobs waiting on a queue,
#: a worker with room for one more takes a ``high`` job first and a ``low`` one last. A
#: job that runs is never interrupted for another.
PRIORITIES = ("high", "normal", "low")
#: The level of a job whose submit and task name none.
DEFAULT_PRIORITY = "normal"

#: The most retries a task may declare (a job's option ``max_attempts`` allows 100).
MAX_RETRIES = 99

#: What a queue may be named: its Redis keys add ``#`` and a priority to the name.
QUEUE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

_MARK = "__corefleet_task__"


def resources_valid(value: Any) -> bool:
    """Whether ``value`` is a resources mapping Ray would take: names from
    ``RESOURCE_NAMES``, each 0 or a number from ``MIN_RESOURCE`` to ``MAX_RESOURCE``."""
    if not isinstance(value, dict) or set(value) - set(RESOURCE_NAMES):
        return False
    return all(
        not isinstance(amount, bool)
        and isinstance(amount, (int, float))
        and 0 <= amount <= MAX_RESOURCE  # NaN and infinity fail this too
        and not 0 < amount < MIN_RESOURCE
        for amount in value.values()
    )


@dataclass(frozen=True)
class TaskSpec:
    name: str
    fn: Callable[..., Any]
    kind: str
    engine: str
    queue: str
    timeout_s: float | None
    max_retries: int
    #: Engine resources (Ray: num_cpus, num_gpus, memory).
    resources: dict[str, float] = field(default_factory=dict)
    #: Exceptions after which a job is run again (while it has attempts left), not failed.
    retry_on: tuple[type[Exception], ...] = ()
    #: The wait before the first retry; it doubles for each one after, up to the maximum.
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 300.0
    #: The priority of its jobs that do not name one (option ``priority``).
    priority: str = DEFAULT_PRIORITY

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1, 2, ...): the backoff for
        that attempt, less a random part of up to half of it, so that jobs failing
        together (a service down) do not all come back at the same moment."""
        # The exponent is capped: 2.0 ** 1100 overflows, and the maximum is reached long
        # before 2 ** 64 anyway.
        doubled = self.retry_backoff_s * 2.0 ** min(max(attempt - 1, 0), 64)
        full = min(self.retry_backoff_max_s, doubled)
        return full / 2 + random.uniform(0, full / 2)

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    @property
    def takes_ctx(self) -> bool:
        return "ctx" in _full_signature(self.fn).parameters

    @property
    def ctx_index(self) -> int | None:
        """Where ``ctx`` sits among the positional parameters (``def f(ctx, n)``: 0), for
        the runner to put it between the caller's positional arguments; None where it can
        only be passed by keyword."""
        return _ctx_index(self.fn)

    @property
    def max_attempts(self) -> int:
        return self.max_retries + 1

    def signature(self) -> inspect.Signature:
        """The signature callers fill in: the function's, without ``ctx``."""
        return _call_signature(self.fn)

    def describe(self) -> dict[str, Any]:
        params = []
        hints = _hints(self.fn)
        for param in self.signature().parameters.values():
            item: dict[str, Any] = {"name": param.name, "kind": param.kind.name.lower()}
            if param.name in hints:
                item["type"] = _type_name(hints[param.name])
            if param.default is not inspect.Parameter.empty:
                item["default"] = _as_json(param.default)
            params.append(item)
        return {
            "name": self.name,
            "kind": self.kind,
            "engine": self.engine,
            "queue": self.queue,
            "timeout_s": self.timeout_s,
            "max_retries": self.max_retries,
            "retry_on": [exc.__name__ for exc in self.retry_on],
            "retry_backoff_s": self.retry_backoff_s,
            "retry_backoff_max_s": self.retry_backoff_max_s,
            "resources": self.resources,
            "priority": self.priority,
            "parameters": params,
            "doc": inspect.getdoc(self.fn) or "",
        }


def task(
    name: str | None = None,
    *,
    kind: str = "cpu",
    engine: str | None = None,
    queue: str | None = None,
    timeout_s: float | None = None,
    max_retries: int = 2,
    resources: dict[str, float] | None = None,
    retry_on: tuple[type[Exception], ...] = (),
    retry_backoff_s: float = 1.0,
    retry_backoff_max_s: float = 300.0,
    priority: str = DEFAULT_PRIORITY,
) -> Callable[[F], F]:
    """Mark a function as a corefleet task.

    A job gets ``max_retries + 1`` attempts. It is run again when its worker was lost, and
    when the task raised one of ``retry_on`` or ``Retry``: after a backoff that starts at
    ``retry_backoff_s`` and doubles up to ``retry_backoff_max_s``, less up to half at random. Any
    other exception fails the job at once. Once the attempts are spent the job is ``dead``.
    ``priority`` (high, normal or low) is that of its jobs that do not name one.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    chosen_engine = engine or DEFAULT_ENGINE[kind]
    if chosen_engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {chosen_engine!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int):
        raise ValueError(f"max_retries must be a whole number, not {max_retries!r}")
    if not 0 <= max_retries <= MAX_RETRIES:
        raise ValueError(f"max_retries must be from 0 to {MAX_RETRIES}")
    if timeout_s is not None and (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not 0 < timeout_s <= MAX_TIMEOUT_S  # NaN fails this too
    ):
        raise ValueError(f"timeout_s must be None or seconds above 0, at most {MAX_TIMEOUT_S}")
    if not all(isinstance(exc, type) and issubclass(exc, Exception) for exc in retry_on):
        raise ValueError("retry_on must be a tuple of exception classes")
    if not 0 <= retry_backoff_s <= retry_backoff_max_s <= MAX_DELAY_S:  # NaN fails this too
        raise ValueError(
            f"retry_backoff_s must be from 0 to retry_backoff_max_s, at most {MAX_DELAY_S}"
        )
    if queue is not None and not QUEUE_NAME.fullmatch(queue):
        raise ValueError(f"queue must be 1 to 64 letters, digits or _.:-, not {queue!r}")
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
    if resources and chosen_engine != "ray":
        raise ValueError(f"resources apply to Ray tasks only; this one runs on {chosen_engine}")
    if resources is not None and not resources_valid(resources):
        raise ValueError(
            f"resources must map {', '.join(RESOURCE_NAMES)} to 0 or a number from "
            f"{MIN_RESOURCE} to 2**63, not {resources!r}"
        )
    if queue is None:
        queue = kind if chosen_engine == DEFAULT_ENGINE[kind] else ENGINE_QUEUE[chosen_engine]

    def mark(fn: F) -> F:
        spec = TaskSpec(
            name=name or f"{fn.__module__}.{fn.__qualname__}",
            fn=fn,
            kind=kind,
            engine=chosen_engine,
            queue=queue,
            timeout_s=timeout_s,
            max_retries=max_retries,
            resources=dict(resources or {}),
            retry_on=tuple(retry_on),
            retry_backoff_s=float(retry_backoff_s),
            retry_backoff_max_s=float(retry_backoff_max_s),
            priority=priority,
        )
        setattr(fn, _MARK, spec)
        return fn

    return mark


class Registry:
    """The tasks one process knows, by name."""

    def __init__(self, specs: Iterable[TaskSpec] = ()) -> None:
        self._specs: dict[str, TaskSpec] = {}
        #: Per queue a task declares, the first such task: every other's engine must match.
        self._queue_owners: dict[str, TaskSpec] = {}
        #: Modules ``load_available`` could not import, with why.
        self.import_errors: dict[str, Exception] = {}
        for spec in specs:
            self.add(spec)

    @classmethod
    def load(cls, extra_modules: Iterable[str] = ()) -> Registry:
        """The built-in tasks plus every ``@task`` in ``extra_modules``."""
        registry = cls()
        for module_name in (*BUILTIN_MODULES, *extra_modules):
            registry.add_module(importlib.import_module(module_name))
        return registry

    @classmethod
    def load_available(cls, extra_modules: Iterable[str] = ()) -> Registry:
        """Like ``load``, but a module that fails to import is left out and remembered in
        ``import_errors``: a cluster worker serves many gateways' jobs, and one gateway's
        bad module must not fail the others' jobs."""
        registry = cls.load()
        for module_name in extra_modules:
            try:
                registry.add_module(importlib.import_module(module_name))
            except Exception as exc:
                registry.import_errors[module_name] = exc
        return registry

    def add_module(self, module: types.ModuleType) -> None:
        for value in vars(module).values():
            spec = getattr(value, _MARK, None)
            if isinstance(spec, TaskSpec) and spec.fn.__module__ == module.__name__:
                self.add(spec)

    def add(self, spec: TaskSpec) -> None:
        existing = self._specs.get(spec.name)
        if existing is not None and existing.fn is not spec.fn:
            raise ValueError(f"two tasks are named {spec.name!r}")
        other = self._queue_owners.setdefault(spec.queue, spec)
        # Each engine reads its own queues: a shared one would hand jobs to the wrong one.
        if other.engine != spec.engine:
            raise ValueError(
                f"queue {spec.queue!r} would carry both {other.engine} jobs ({other.name}) "
                f"and {spec.engine} jobs ({spec.name}); give one of them another queue"
            )
        self._specs[spec.name] = spec

    def get(self, name: str) -> TaskSpec | None:
        return self._specs.get(name)

    def engine_of_queue(self, queue: str) -> str | None:
        """The engine whose jobs ``queue`` carries (a kind's default queue, or one a task
        declares); None for a queue no task names."""
        owner = self._queue_owners.get(queue)
        if owner is not None:
            return owner.engine
        return DEFAULT_ENGINE.get(queue) or ("dask" if queue == DASK_QUEUE else None)

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(sorted(self._specs.values(), key=lambda s: s.name))

    def __len__(self) -> int:
        return len(self._specs)


# --- argument checking -------------------------------------------------------------------
# Signatures and hints are worked out once per function: every submit checks against them.


@functools.cache
def _full_signature(fn: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(fn, eval_str=True)
    except NameError:  # an annotation that does not resolve: show it as written
        return inspect.signature(fn)


@functools.cache
def _ctx_index(fn: Callable[..., Any]) -> int | None:
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for index, param in enumerate(_full_signature(fn).parameters.values()):
        if param.kind not in positional:
            return None
        if param.name == "ctx":
            return index
    return None


@functools.cache
def _call_signature(fn: Callable[..., Any]) -> inspect.Signature:
    sig = _full_signature(fn)
    return sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "ctx"])


_SIMPLE: dict[type, tuple[type, ...]] = {
    int: (int,),
    float: (int, float),
    str: (str,),
    bool: (bool,),
    list: (list,),
    dict: (dict,),
}


@functools.cache
def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:
        pass
    # One annotation that does not resolve (a name imported for type checkers only, say)
    # leaves only itself unchecked: each is resolved on its own, as get_type_hints would.
    hints: dict[str, Any] = {}
    names = {**getattr(fn, "__globals__", {}), "TaskContext": TaskContext}
    for name, annotation in getattr(fn, "__annotations__", {}).items():
        if not isinstance(annotation, str):
            hints[name] = annotation
            continue
        try:
            hint = eval(annotation, names)  # the module's own annotation
            if isinstance(hint, str):  # quoted as well: "'int'"
                hint = eval(hint, names)
        except Exception:
            continue
        hints[name] = hint
    return hints


def _as_json(value: Any) -> Any:
    """A parameter's default as ``GET /v1/tasks`` shows it: itself where it is plain JSON,
    else its ``repr`` (an enum member, a timedelta)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits ``hint``; None when the hint is not one we check."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_matches(value, arg) for arg in typing.get_args(hint)]
        if any(v is None for v in verdicts):
            return None
        return any(verdicts)
    if hint is type(None) or hint is None:
        return value is None
    base = origin if origin in (list, dict) else hint
    if base not in _SIMPLE:
        return None
    if isinstance(value, bool) and base is not bool:
        return False  # JSON true is not a number
    if not isinstance(value, _SIMPLE[base]):
        return False
    if base is float and isinstance(value, int) and not _fits_float(value):
        return False  # 400 digits are a JSON number, but no float holds them
    # list[X] and dict[str, X]: each item (value) fits X too. JSON keys are strings.
    item_hint = _item_hint(origin, typing.get_args(hint))
    if item_hint is not None:
        container: Any = value  # a list or dict, as just checked
        items: Iterable[Any] = container.values() if base is dict else container
        return not any(_matches(item, item_hint) is False for item in items)
    return True


def _fits_float(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _item_hint(origin: Any, args: tuple[Any, ...]) -> Any:
    if origin is list and len(args) == 1:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def bind_arguments(spec: TaskSpec, args: list[Any], kwargs: dict[str, Any]) -> str | None:
    """Check a call against the task's signature; the problem in words, or None if fine."""
    try:
        bound = spec.signature().bind(*args, **kwargs)
    except TypeError as exc:
        return f"{spec.name}: {exc}"
    hints = _hints(spec.fn)
    params = spec.signature().parameters
    for name, value in bound.arguments.items():
        hint = hints.get(name)
        if hint is None:
            continue
        kind = params[name].kind
        values = (
            value
            if kind is inspect.Parameter.VAR_POSITIONAL
            else value.values()
            if kind is inspect.Parameter.VAR_KEYWORD
            else [value]
        )
        for item in values:
            if _matches(item, hint) is False:
                return (
                    f"{spec.name}: argument {name!r} must be {_type_name(hint)}, "
                    f"not {type(item).__name__}"
                )
    return None
