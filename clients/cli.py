"""The ``corefleet`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from service.errors import CorefleetError
from service.settings import Settings, SettingsError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corefleet", description="Every core, machine and GPU behind one HTTP door."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("up", help="run the whole stack on this machine (Ctrl-C stops it)")
    gateway = sub.add_parser("gateway", help="run the HTTP gateway")
    gateway.add_argument("--host", help="address to listen on (COREFLEET_HOST)")
    gateway.add_argument("--port", type=int, help="port to listen on (COREFLEET_PORT)")
    io = sub.add_parser("io-worker", help="run an asyncio worker for io jobs")
    io.add_argument("--queues", help="comma-separated io queues (COREFLEET_IO_QUEUES)")
    io.add_argument("--concurrency", type=int, help="jobs at once (COREFLEET_IO_CONCURRENCY)")

    worker = sub.add_parser("worker", help="run a Celery prefork worker for cpu (or gpu) jobs")
    worker.add_argument("--queues", help="comma-separated queues (COREFLEET_WORKER_QUEUES, cpu)")
    worker.add_argument(
        "--concurrency",
        type=int,
        help="child processes (COREFLEET_WORKER_CONCURRENCY, default: cores)",
    )
    worker.add_argument(
        "--max-tasks-per-child", type=int, help="replace a child after this many jobs"
    )
    worker.add_argument(
        "--max-memory-per-child",
        type=int,
        help="replace a child above this many KiB of resident memory",
    )
    worker.add_argument(
        "--gpu", action="store_true", help="consume only the gpu queue, one child per visible GPU"
    )
    flower = sub.add_parser("flower", help="run Flower on the same broker")
    flower.add_argument("--host", help="address (COREFLEET_FLOWER_HOST, 127.0.0.1)")
    flower.add_argument("--port", type=int, help="port (COREFLEET_FLOWER_PORT, 5555)")

    submit = sub.add_parser("submit", help="submit a job and print its record")
    submit.add_argument("task", help="task name, e.g. io.sleep")
    submit.add_argument("args", nargs="*", help="positional arguments, each as JSON")
    submit.add_argument("--kwargs", default=None, help="keyword arguments as a JSON object")
    submit.add_argument("--options", default=None, help="job options as a JSON object")
    submit.add_argument("--wait", action="store_true", help="wait until the job is finished")
    submit.add_argument(
        "--timeout", type=float, default=300.0, help="seconds --wait waits at most (default 300)"
    )
    get = sub.add_parser("get", help="print a job's record")
    get.add_argument("id")
    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("id")
    sub.add_parser("tasks", help="list the registered tasks")
    for cmd in (submit, get, cancel, sub.choices["tasks"]):
        cmd.add_argument(
            "--url",
            default=os.environ.get("COREFLEET_URL"),
            help="gateway URL (COREFLEET_URL, default http://127.0.0.1:8000)",
        )
    return parser


def _json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"corefleet: {what} is not valid JSON: {text!r} ({exc.msg})") from None


def _print(payload: Any) -> None:
    print(json.dumps(payload, indent=2, sort_keys=False))


#: Command-line flags that stand in for a setting, per command.
_FLAG_SETTINGS = {
    "gateway": (("host", "COREFLEET_HOST"), ("port", "COREFLEET_PORT")),
    "io-worker": (("queues", "COREFLEET_IO_QUEUES"), ("concurrency", "COREFLEET_IO_CONCURRENCY")),
    "worker": (
        ("queues", "COREFLEET_WORKER_QUEUES"),
        ("concurrency", "COREFLEET_WORKER_CONCURRENCY"),
        ("max_tasks_per_child", "COREFLEET_WORKER_MAX_TASKS_PER_CHILD"),
        ("max_memory_per_child", "COREFLEET_WORKER_MAX_MEMORY_PER_CHILD_KB"),
    ),
    "flower": (("host", "COREFLEET_FLOWER_HOST"), ("port", "COREFLEET_FLOWER_PORT")),
}


def _settings(args: argparse.Namespace) -> Settings:
    env = dict(os.environ)
    for flag, name in _FLAG_SETTINGS.get(args.command, ()):
        value = getattr(args, flag, None)
        if value is not None:
            env[name] = str(value)
    return Settings.from_env(env)


def _client_command(args: argparse.Namespace) -> int:
    from clients.http import DEFAULT_URL, Client
    from service.jobs import JobState

    # The token comes from the environment only: a command-line argument shows in `ps`.
    token = os.environ.get("COREFLEET_TOKEN") or None
    try:
        client = Client(args.url or DEFAULT_URL, token=token)
    except ValueError as exc:  # a malformed --url or COREFLEET_URL: a usage error
        raise SettingsError(str(exc)) from exc
    with client:
        if args.command == "tasks":
            for spec in client.tasks():
                params = ", ".join(p["name"] for p in spec["parameters"])
                print(f"{spec['name']:<24} {spec['kind']:<6} {spec['engine']:<8} ({params})")
            return 0
        if args.command == "submit":
            kwargs = _json_arg(args.kwargs, "--kwargs") if args.kwargs else None
            options = _json_arg(args.options, "--options") if args.options else None
            positional = [_json_arg(a, f"argument {a!r}") for a in args.args]
            job = client.submit(args.task, *positional, kwargs=kwargs, options=options)
            if args.wait:
                # Said first: a wait cut short (Ctrl-C, --timeout) leaves the job running,
                # and its id is how to look at it or cancel it.
                print(f"corefleet: submitted {job.id}; waiting", file=sys.stderr, flush=True)
                job = client.wait(job.id, timeout_s=args.timeout)
        elif args.command == "get":
            job = client.get(args.id)
        else:
            job = client.cancel(args.id)
        _print(job.to_api())
        # Non-zero for a job that ended without a result; a cancel that did cancel is fine.
        unfinished = {JobState.FAILED, JobState.DEAD, JobState.CANCELLED}
        if args.command == "cancel":
            unfinished.discard(JobState.CANCELLED)
        return 1 if job.state in unfinished else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "submit" and not any(item.startswith("--") for item in extra):
        # A task's arguments after an option (`submit io.sleep --wait 30`): argparse takes
        # positionals in one run, so those left over are the task's too, in their order.
        args.args += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "worker" and args.gpu and (args.queues, args.concurrency) != (None, None):
        # Said, rather than overridden: a gpu worker has one child per GPU, on `gpu`.
        parser.error(
            "--gpu consumes the gpu queue with one child per GPU: no --queues or --concurrency"
        )
    try:
        if args.command in ("submit", "get", "cancel", "tasks"):
            return _client_command(args)
        settings = _settings(args)
        if args.command == "up":
            from service.up import run_up

            return run_up(settings)
        if args.command == "gateway":
            from service.serve import run_gateway

            run_gateway(settings)
            return 0
        if args.command == "worker":
            # Before Celery is imported (billiard reads it then): SIGTERM puts running
            # jobs back on their queue after a grace (see _stop_by_putting_back).
            os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
            from service.engines.celery_worker import run_worker

            queues = ("gpu",) if args.gpu else settings.celery.queues
            run_worker(
                settings,
                queues=queues,
                concurrency=settings.celery.concurrency,
                max_tasks_per_child=settings.celery.max_tasks_per_child,
                max_memory_per_child_kb=settings.celery.max_memory_per_child_kb,
                gpu=args.gpu,
            )
            return 0
        if args.command == "flower":
            from service.flower import run_flower

            run_flower(settings)
            return 0
        if args.command == "io-worker":
            from service.serve import run_io_worker

            run_io_worker(settings)
            return 0
    except SettingsError as exc:
        print(f"corefleet: {exc}", file=sys.stderr)
        return 2
    except CorefleetError as exc:
        print(f"corefleet: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
