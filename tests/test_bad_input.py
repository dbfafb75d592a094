"""Bad input gets a JSON 4xx that says what is wrong, and nothing is written to Redis."""

from __future__ import annotations

import io
import logging
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from service import ids
from service.app import create_app
from service.engines.celery_ import time_limit_ceiling
from service.settings import Settings
from tasks import Registry
from tests.conftest import Gateway


async def _keys(redis: aioredis.Redis) -> set[str]:
    """Every key but the workers' presence, which they refresh on their own."""
    return {
        k
        for k in await redis.keys("*")
        if not k.startswith(("cf:consumers:", "cf:known-queues:")) and k != "cf:worker-info"
    }


GOOD_ARGS = [1, 0.5, "x", True, [1], {"a": 1}]

CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("malformed JSON", {"data": b'{"task": "io.sleep",'}, 400, "invalid_json"),
    ("not UTF-8", {"data": b"\xff\xfe"}, 400, "invalid_json"),
    ("a JSON array", {"json": [1, 2]}, 400, "invalid_body"),
    ("a JSON string", {"json": "io.sleep"}, 400, "invalid_body"),
    ("no task", {"json": {"args": [1]}}, 400, "invalid_body"),
    ("unknown field", {"json": {"task": "io.sleep", "args": [1], "x": 1}}, 400, "invalid_body"),
    ("args not a list", {"json": {"task": "io.sleep", "args": {"s": 1}}}, 400, "invalid_body"),
    ("kwargs not an object", {"json": {"task": "io.echo", "kwargs": [1]}}, 400, "invalid_body"),
    ("unknown task", {"json": {"task": "os.system", "args": ["ls"]}}, 404, "unknown_task"),
    ("too few args", {"json": {"task": "io.sleep", "args": []}}, 400, "invalid_arguments"),
    ("too many args", {"json": {"task": "io.sleep", "args": [1, 2]}}, 400, "invalid_arguments"),
    (
        "unknown kwarg",
        {"json": {"task": "io.sleep", "kwargs": {"secs": 1}}},
        400,
        "invalid_arguments",
    ),
    ("str for float", {"json": {"task": "io.sleep", "args": ["1"]}}, 400, "invalid_arguments"),
    (
        "str in list[int]",
        {"json": {"task": "test.typed", "args": [1, 0.5, "x", True, [1, "2"], {"a": 1}]}},
        400,
        "invalid_arguments",
    ),
    (
        "str value in dict[str, int]",
        {"json": {"task": "test.typed", "args": [1, 0.5, "x", True, [1], {"a": "b"}]}},
        400,
        "invalid_arguments",
    ),
    (
        "io job onto Ray's queue",
        {"json": {"task": "io.echo", "args": [1], "options": {"queue": "heavy"}}},
        400,
        "invalid_body",
    ),
    (
        "Ray job onto a queue no dispatcher reads",
        {"json": {"task": "heavy.pi", "args": [10], "options": {"queue": "nobody-reads"}}},
        400,
        "invalid_body",
    ),
    (
        "less of a CPU than Ray counts",
        {
            "json": {
                "task": "heavy.pi",
                "args": [10],
                "options": {"resources": {"num_cpus": 0.00005}},
            }
        },
        400,
        "invalid_body",
    ),
    (
        "cpu job onto the io queue",
        {"json": {"task": "cpu.count_primes", "args": [10], "options": {"queue": "io"}}},
        400,
        "invalid_body",
    ),
    ("bool for float", {"json": {"task": "io.sleep", "args": [True]}}, 400, "invalid_arguments"),
    (
        "float for int",
        {"json": {"task": "test.typed", "args": [1.5, *GOOD_ARGS[1:]]}},
        400,
        "invalid_arguments",
    ),
    (
        "int for bool",
        {"json": {"task": "test.typed", "args": [1, 0.5, "x", 1, [1], {"a": 1}]}},
        400,
        "invalid_arguments",
    ),
    (
        "dict for list",
        {"json": {"task": "test.typed", "args": [1, 0.5, "x", True, {}, {"a": 1}]}},
        400,
        "invalid_arguments",
    ),
    (
        "str for optional int",
        {"json": {"task": "test.typed", "args": [*GOOD_ARGS, "no"]}},
        400,
        "invalid_arguments",
    ),
    (
        "ctx from the caller",
        {"json": {"task": "test.hold", "args": [1], "kwargs": {"ctx": 1}}},
        400,
        "invalid_arguments",
    ),
    (
        "unknown option",
        {"json": {"task": "io.sleep", "args": [1], "options": {"eval": "x"}}},
        400,
        "invalid_body",
    ),
    (
        "bad timeout",
        {"json": {"task": "io.sleep", "args": [1], "options": {"timeout_s": -1}}},
        400,
        "invalid_body",
    ),
    (
        # Numbers beyond a float: no clock can add them (and NaN passed a "> 0" check).
        "huge timeout",
        {"json": {"task": "io.sleep", "args": [1], "options": {"timeout_s": 10**400}}},
        400,
        "invalid_body",
    ),
    (
        "huge resources",
        {"json": {"task": "heavy.pi", "args": [100], "options": {"resources": {"memory": 1e300}}}},
        400,
        "invalid_body",
    ),
    ("NaN", {"data": b'{"task": "io.echo", "args": [NaN]}'}, 400, "invalid_json"),
    (
        "NaN timeout",
        {"data": b'{"task": "io.sleep", "args": [1], "options": {"timeout_s": NaN}}'},
        400,
        "invalid_json",
    ),
    ("Infinity", {"data": b'{"task": "io.echo", "args": [-Infinity]}'}, 400, "invalid_json"),
    ("1e400", {"data": b'{"task": "io.echo", "args": [1e400]}'}, 400, "invalid_json"),
    # Past Python's 4,300-digit limit for int(), which raises ValueError, not a JSON error.
    (
        "5000 digits",
        {"data": b'{"task": "io.echo", "args": [' + b"1" * 5000 + b"]}"},
        400,
        "invalid_json",
    ),
    ("nested too deep", {"data": b"[" * 100_000 + b"]" * 100_000}, 400, "invalid_json"),
    # Past the nesting a record may have: one deep enough to parse, but past Python's
    # recursion limit once a listing wraps it in three more levels, made every page of
    # jobs holding it a 500.
    (
        "args nested deeper than a record may be",
        {"data": b'{"task": "io.echo", "args": [' + b"[" * 150 + b"]" * 150 + b"]}"},
        400,
        "invalid_arguments",
    ),
    (
        "lone surrogate",
        {"data": b'{"task": "io.echo", "args": ["\\ud800"]}'},
        400,
        "invalid_json",
    ),
    (
        "int too large for float",
        {"json": {"task": "io.sleep", "args": [10**400]}},
        400,
        "invalid_arguments",
    ),
    (
        # A regular expression's $ matches before a final newline.
        "queue with a trailing newline",
        {"json": {"task": "io.echo", "args": [1], "options": {"queue": "io\n"}}},
        400,
        "invalid_body",
    ),
    (
        "bad queue",
        {"json": {"task": "io.sleep", "args": [1], "options": {"queue": "a b"}}},
        400,
        "invalid_body",
    ),
    (
        # A Celery queue is a Redis list of that name: never one of corefleet's own keys.
        "queue on corefleet's keys",
        {"json": {"task": "cpu.count_primes", "args": [10], "options": {"queue": "cf:jobs"}}},
        400,
        "invalid_body",
    ),
    (
        # Nor the keys Celery's transport keeps its state in: a list there stops it.
        "queue on Celery's keys",
        {"json": {"task": "cpu.count_primes", "args": [10], "options": {"queue": "unacked_mutex"}}},
        400,
        "invalid_body",
    ),
    (
        "queue on Celery's bindings",
        {
            "json": {
                "task": "cpu.count_primes",
                "args": [10],
                "options": {"queue": "_kombu.binding.x"},
            }
        },
        400,
        "invalid_body",
    ),
    (
        # Only Ray reads a job's resources: on another engine they would be stored and ignored.
        "resources on a cpu job",
        {"json": {"task": "cpu.count_primes", "args": [10], "options": {"resources": {}}}},
        400,
        "invalid_body",
    ),
    (
        "oversized body",
        {"data": b'{"task": "io.echo", "args": ["' + b"x" * 1024 * 1024 + b'"]}'},
        413,
        "payload_too_large",
    ),
]


@pytest.mark.parametrize(
    ("what", "request_kw", "status", "code"), CASES, ids=[case[0] for case in CASES]
)
async def test_bad_submit_is_refused_and_writes_nothing(
    gateway: Gateway,
    redis: aioredis.Redis,
    what: str,
    request_kw: dict[str, Any],
    status: int,
    code: str,
) -> None:
    """Each kind of bad submit gets its status and error code; Redis keys stay as they were."""
    before = await _keys(redis)
    stream_before = await redis.xlen("cf:stream:io")
    if len(request_kw.get("data", b"")) > 65536:  # aiohttp wants big bodies as a stream
        request_kw = {"data": io.BytesIO(request_kw["data"])}
    got, body = await gateway.call("POST", "/v1/jobs", **request_kw)
    assert (got, body["error"]["code"]) == (status, code), body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    assert await _keys(redis) == before
    assert await redis.xlen("cf:stream:io") == stream_before


async def test_a_cpu_time_limit_must_fit_under_the_visibility_timeout(
    gateway: Gateway, redis: aioredis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis hands a Celery message nobody acknowledged within the visibility timeout to
    another worker, running or not: a cpu/gpu job asking for a longer limit is a 400 that
    names the most it may have, and a task declaring one is named as a gateway starts."""
    ceiling = time_limit_ceiling(settings)
    before = await _keys(redis)
    body = {"task": "cpu.count_primes", "args": [10], "options": {"timeout_s": ceiling + 1}}
    status, refused = await gateway.call("POST", "/v1/jobs", json=body)
    assert status == 400 and refused["error"]["code"] == "invalid_body", refused
    assert refused["error"]["detail"] == {"max_timeout_s": ceiling}
    assert "COREFLEET_VISIBILITY_TIMEOUT_S" in refused["error"]["message"]
    assert await _keys(redis) == before
    body["options"] = {"timeout_s": ceiling}
    status, accepted = await gateway.call("POST", "/v1/jobs", json=body)
    assert status == 202, accepted

    registry = Registry.load(settings.task_modules)
    count_primes = registry.get("cpu.count_primes")
    assert count_primes is not None
    registry.add(replace(count_primes, name="test.too_long", timeout_s=ceiling + 1.5))
    with caplog.at_level(logging.WARNING, logger="corefleet.gateway"):
        server = TestServer(create_app(settings, registry), host="127.0.0.1")
        await server.start_server()
        await server.close()
    assert any("test.too_long" in r.getMessage() for r in caplog.records), caplog.text


async def test_a_good_typed_call_is_accepted(gateway: Gateway) -> None:
    """The type checks accept every argument of the right type (the refusals above are real)."""
    job = await gateway.submit("test.typed", *GOOD_ARGS, None)
    assert (await gateway.wait(job["id"]))["result"] == "ok"


async def test_a_bad_batch_stores_none_of_its_jobs(gateway: Gateway, redis: aioredis.Redis) -> None:
    """One bad job in a batch refuses the whole batch: nothing is stored."""
    before = await _keys(redis)
    body = {"jobs": [{"task": "io.echo", "args": [1]}, {"task": "io.sleep", "args": ["x"]}]}
    status, reply = await gateway.call("POST", "/v1/jobs/batch", json=body)
    assert status == 400 and reply["error"]["code"] == "invalid_arguments"
    # It says which job was refused.
    assert reply["error"]["detail"]["index"] == 1
    assert reply["error"]["message"].startswith("jobs[1]: ")
    assert await _keys(redis) == before


async def test_a_batch_job_refused_as_it_is_queued_says_which_it_was(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """Refusals that come as the batch is stored (a resource amount Ray cannot count, an
    engine away, no worker) name their job too, as the checks before do."""
    before = await _keys(redis)
    tiny = {"resources": {"num_cpus": 0.00005}}
    body = {
        "jobs": [
            {"task": "io.echo", "args": [1]},
            {"task": "heavy.pi", "args": [10], "options": tiny},
        ]
    }
    status, reply = await gateway.call("POST", "/v1/jobs/batch", json=body)
    assert status == 400, reply
    assert reply["error"]["detail"]["index"] == 1, reply
    assert reply["error"]["message"].startswith("jobs[1]: "), reply
    assert await _keys(redis) == before


async def test_a_batch_with_fields_beside_its_jobs_is_refused(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """Options for a whole batch are not a thing: refused, not silently dropped."""
    before = await _keys(redis)
    body = {"jobs": [{"task": "io.echo", "args": [1]}], "options": {"priority": 9}}
    status, reply = await gateway.call("POST", "/v1/jobs/batch", json=body)
    assert status == 400 and reply["error"]["code"] == "invalid_body", reply
    assert "options" in reply["error"]["message"]
    assert await _keys(redis) == before


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        (f"/v1/jobs/{ids.new_id()}", 404, "job_not_found"),
        ("/v1/jobs/not-an-id", 400, "invalid_id"),
        ("/v1/jobs/" + "I" * 26, 400, "invalid_id"),
        ("/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV?wait=abc", 400, "invalid_parameter"),
        ("/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV?wait=99999", 400, "invalid_parameter"),
        # float() reads these as 10, 5 and 1; they are not numbers as the API writes them.
        ("/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV?wait=1_0", 400, "invalid_parameter"),
        ("/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV?wait=%EF%BC%95", 400, "invalid_parameter"),
        ("/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV?wait=%201", 400, "invalid_parameter"),
        ("/v1/nothing", 404, "not_found"),
        # Which of the two would count is a guess: refused, whichever comes first.
        ("/v1/jobs?limit=5&limit=abc", 400, "invalid_parameter"),
        ("/v1/jobs?state=queued&state=bogus", 400, "invalid_parameter"),
    ],
)
async def test_bad_reads_get_json_errors(
    gateway: Gateway, path: str, status: int, code: str
) -> None:
    """Unknown and malformed ids, bad parameters and unknown routes answer JSON errors."""
    got, body = await gateway.call("GET", path)
    assert (got, body["error"]["code"]) == (status, code)


async def test_cancel_of_bad_ids(gateway: Gateway, redis: aioredis.Redis) -> None:
    """DELETE with an unknown id is 404, a malformed one 400; neither writes anything."""
    before = await _keys(redis)
    got, body = await gateway.call("DELETE", f"/v1/jobs/{ids.new_id()}")
    assert (got, body["error"]["code"]) == (404, "job_not_found")
    got, body = await gateway.call("DELETE", "/v1/jobs/../../x")
    assert got in (400, 404)
    got, body = await gateway.call("DELETE", "/v1/jobs/lowercase0000000000000000a")
    assert (got, body["error"]["code"]) == (400, "invalid_id")
    assert await _keys(redis) == before


async def test_event_streams_take_no_head(gateway: Gateway) -> None:
    """A stream has no end to answer HEAD with: it is a 405 (it used to write its events
    into a response that must have no body, and never end)."""
    job = await gateway.submit("io.echo", 1)
    for path in ("/v1/events", f"/v1/jobs/{job['id']}/events"):
        async with gateway.session.head(gateway.url + path) as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "GET"


async def test_wrong_method_is_405_json(gateway: Gateway) -> None:
    """A known route with the wrong method answers 405 with the allowed methods."""
    async with gateway.session.put(gateway.url + "/v1/jobs") as resp:
        body = await resp.json()
        assert resp.status == 405 and body["error"]["code"] == "method_not_allowed"
        assert "POST" in body["error"]["detail"]["allowed"]
        # HTTP requires the methods it does take in Allow.
        assert "POST" in resp.headers["Allow"].split(", ")
    # The batch route takes POST only; it is not a job id.
    async with gateway.session.get(gateway.url + "/v1/jobs/batch") as resp:
        body = await resp.json()
        assert resp.status == 405 and body["error"]["code"] == "method_not_allowed"
        assert resp.headers["Allow"] == "POST"
    # Below it, "batch" is what any other word is there: not a job id.
    for method in ("GET", "POST"):
        got, body = await gateway.call(method, "/v1/jobs/batch/events")
        assert (got, body["error"]["code"]) in ((400, "invalid_id"), (405, "method_not_allowed"))
        assert got == 400 or "POST" not in body["error"]["detail"]["allowed"]


async def test_a_queue_named_like_another_programs_key_is_refused(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """A Celery queue is a Redis list of that name: where another program keeps a key of
    another kind under it, the submit is refused before anything is written."""
    await redis.set("bulk", "another program's value")
    before = await _keys(redis)
    # A high job goes onto the list of the queue's very name (kombu's first priority step).
    body = {
        "task": "cpu.count_primes",
        "args": [10],
        "options": {"queue": "bulk", "priority": "high"},
    }
    got, reply = await gateway.call("POST", "/v1/jobs", json=body)
    assert (got, reply["error"]["code"]) == (400, "invalid_body")
    assert "bulk" in reply["error"]["message"]
    assert await _keys(redis) == before
    assert await redis.get("bulk") == "another program's value"


@pytest.mark.parametrize(
    "args",
    [[float("nan")], [float("inf")], [{"x": -float("inf")}], [{1, 2}], [object()]],
    ids=["nan", "infinity", "nested -infinity", "a set", "an object"],
)
async def test_a_producer_refuses_what_the_gateway_would_and_stores_nothing(
    redis_server: Any, redis: aioredis.Redis, args: list[Any]
) -> None:
    """A producer hands Python values straight to the submit path, past the HTTP body's
    strict parser: a non-finite number or a value JSON has no form for is refused there
    too (a stored NaN would make the record, and every listing of it, unreadable)."""
    from clients.producer import AsyncProducer
    from service import errors

    before = await _keys(redis)
    async with AsyncProducer(redis_server.url) as producer:
        with pytest.raises(errors.InvalidArguments, match="JSON values"):
            await producer.submit("io.echo", *args)
    assert await _keys(redis) == before


async def test_a_producer_refuses_jobs_of_an_engine_that_does_not_answer(
    redis_server: Any, redis: aioredis.Redis
) -> None:
    """As a gateway does: a Dask address nothing answers at makes Dask jobs an
    ``EngineUnavailable``, rather than jobs stored for a cluster that is not there."""
    from clients.producer import AsyncProducer
    from service import errors
    from tests.procs import free_port

    base = Settings.from_env({"COREFLEET_TASK_MODULES": "tests.fleet_tasks"})
    away = replace(base.engines, dask_address=f"tcp://127.0.0.1:{free_port()}")
    async with AsyncProducer(redis_server.url, settings=replace(base, engines=away)) as producer:
        with pytest.raises(errors.EngineUnavailable, match="unreachable"):
            await producer.submit("heavy.array_stats", 10, 5)
        assert (await producer.submit("io.echo", "still")).state.value == "queued"
    assert len(await redis.keys("cf:job:*")) == 1


async def test_a_blocking_producer_works_where_an_event_loop_runs(redis_server: Any) -> None:
    """``Producer`` is called from code that runs an event loop (a notebook, an async
    framework's sync hook): it has its own loop, on its own thread."""
    from clients.producer import Producer

    with Producer(redis_server.url) as producer:
        job = producer.submit("io.echo", "from a running loop")
        got = producer.get(job.id)
    assert got is not None and got.args == ["from a running loop"]
