"""The benchmark runner: ``python -m bench <benchmark> [options]`` (or ``python bench/run.py``).

Each benchmark is a module with ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> dict``; the runner prints its table (the module does) and saves the dict
as JSON under ``bench/results/``. To add one (Celery, Ray, a process pool, GPU), write
the module and list it in ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: Benchmark modules, in the order ``all`` runs them.
BENCHMARKS = ("bench.submit", "bench.io_e2e", "bench.cpu", "bench.ray_pi", "bench.ray_roundtrip")
#: Benchmarks that need hardware not every host has: named, never run by ``all``.
ON_REQUEST = ("bench.gpu",)


def _modules() -> list[ModuleType]:
    return [importlib.import_module(name) for name in (*BENCHMARKS, *ON_REQUEST)]


def build_parser(modules: Sequence[ModuleType]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for module in modules:
        module.add_arguments(sub.add_parser(module.NAME, help=module.HELP))
    sub.add_parser("all", help="run every benchmark with its default options")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from bench.common import save_results

    modules = _modules()
    parser = build_parser(modules)
    args = parser.parse_args(argv)
    everyday = [m for m in modules if m.__name__ in BENCHMARKS]
    chosen = (
        everyday if args.benchmark == "all" else [m for m in modules if args.benchmark == m.NAME]
    )
    for module in chosen:
        module_args = args
        if args.benchmark == "all":
            module_args = parser.parse_args([module.NAME])
        print(f"== {module.NAME}: {module.HELP}", flush=True)
        result = module.run(module_args)
        path = save_results(module.NAME, result)
        print(f"saved {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
