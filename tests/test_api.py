"""The gateway's HTTP API against a real Redis and the embedded io worker."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Gateway, wait_state


async def test_io_sleep_returns_its_seconds(gateway: Gateway) -> None:
    """io.sleep runs on the io worker and its result is the seconds slept."""
    job = await gateway.submit("io.sleep", 0.05)
    assert job["state"] == "queued" and job["engine"] == "asyncio" and job["queue"] == "io"
    assert job["links"]["self"] == f"/v1/jobs/{job['id']}"
    done = await gateway.wait(job["id"])
    assert done["state"] == "succeeded" and done["result"] == 0.05 and done["attempts"] == 1
    assert done["started_at"] and done["finished_at"] and done["error"] is None


async def test_io_echo_returns_its_value(gateway: Gateway) -> None:
    """io.echo returns any JSON value unchanged."""
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": "d"}}
    job = await gateway.submit("io.echo", value)
    assert (await gateway.wait(job["id"]))["result"] == value


@pytest.fixture
async def web_server() -> AsyncIterator[str]:
    async def page(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 12345, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/page", page)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/page"))
    await server.close()


async def test_io_http_get_reports_status_headers_and_length(
    gateway: Gateway, web_server: str
) -> None:
    """io.http_get fetches a local page and reports its status, headers and body length."""
    job = await gateway.submit("io.http_get", web_server, 5)
    done = await gateway.wait(job["id"])
    assert done["state"] == "succeeded", done
    result = done["result"]
    assert result["status"] == 200 and result["body_length"] == 12345
    assert result["headers"]["content-type"].startswith("text/plain")
    assert result["elapsed_s"] >= 0


async def test_a_raising_task_fails_with_its_own_error(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """A task's exception becomes error {type, message}; no traceback reaches the client,
    while the worker's log has it, so that the failing line can be found."""
    with caplog.at_level(logging.INFO, logger="corefleet.runner"):
        done = await gateway.wait((await gateway.submit("test.boom", "kaput"))["id"])
    assert done["state"] == "failed"
    assert done["error"] == {"type": "ValueError", "message": "kaput"}
    logged = [r for r in caplog.records if done["id"] in r.getMessage()]
    assert logged and logged[0].exc_text and "in boom" in logged[0].exc_text, caplog.text


async def test_a_task_past_its_time_limit_fails(gateway: Gateway) -> None:
    """A task that outlives its timeout_s fails with TimeLimitExceeded."""
    done = await gateway.wait((await gateway.submit("test.slow"))["id"])
    assert done["state"] == "failed" and done["error"]["type"] == "TimeLimitExceeded"


async def test_a_per_job_timeout_overrides_the_task(gateway: Gateway) -> None:
    """options.timeout_s limits a job below its task's default."""
    job = await gateway.submit("io.sleep", 5, timeout_s=0.1)
    assert job["timeout_s"] == 0.1  # the record shows the limit it runs under
    done = await gateway.wait(job["id"])
    assert done["state"] == "failed" and done["error"]["type"] == "TimeLimitExceeded"
    pi = await gateway.submit("heavy.pi", 100, delay_s=3600)  # its task's limit; not run here
    assert pi["timeout_s"] == 3600
    await gateway.call("DELETE", f"/v1/jobs/{pi['id']}")


@pytest.mark.parametrize("task", ["test.unserialisable", "test.not_a_number", "test.too_deep"])
async def test_an_unserialisable_result_fails_clearly(gateway: Gateway, task: str) -> None:
    """A result JSON cannot carry (a set; NaN; lists nested past what a listing can encode)
    fails the job instead of storing something else: a stored NaN would make every page of
    jobs holding it unreadable."""
    done = await gateway.wait((await gateway.submit(task))["id"])
    assert done["state"] == "failed" and "JSON" in done["error"]["message"]
    assert "result" not in done or done["result"] is None


async def test_a_task_raising_cancelled_error_itself_fails_with_it(gateway: Gateway) -> None:
    """Only a cancel from outside (the job's, a stopping worker's) is a cancel: a task that
    raises CancelledError fails with it, rather than staying running until redelivered."""
    done = await gateway.wait((await gateway.submit("test.raises_cancelled"))["id"])
    assert done["state"] == "failed", done
    assert done["error"] == {"type": "CancelledError", "message": "the task's own"}


async def test_wait_returns_when_the_job_finishes(gateway: Gateway) -> None:
    """?wait holds the request until the job is terminal, not until the wait runs out."""
    job = await gateway.submit("io.sleep", 0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    done = await gateway.wait(job["id"], seconds=20)
    assert done["state"] == "succeeded"
    assert loop.time() - started < 10


async def test_wait_returns_the_current_record_when_time_runs_out(bare_gateway: Gateway) -> None:
    """?wait on a job that stays queued answers with the queued record after the wait."""
    job = await bare_gateway.submit("io.sleep", 0)
    status, body = await bare_gateway.call("GET", f"/v1/jobs/{job['id']}?wait=0.2")
    assert status == 200 and body["state"] == "queued"


async def test_cancel_a_queued_job_means_it_never_runs(
    bare_gateway: Gateway, settings: Any, redis: aioredis.Redis
) -> None:
    """A cancelled queued job ends cancelled and a worker that later reads it skips it."""
    job = await bare_gateway.submit("test.hold", 0)
    status, body = await bare_gateway.call("DELETE", f"/v1/jobs/{job['id']}")
    assert status == 200 and body["state"] == "cancelled" and body["finished_at"]
    # Now a worker consumes the queue; the cancelled job must not start.
    from tests.conftest import start_gateway

    server, session = await start_gateway(settings)
    try:
        marker = await bare_gateway.submit("io.echo", "after")
        gw = Gateway(server, session)
        assert (await gw.wait(marker["id"]))["state"] == "succeeded"
        assert await redis.llen(f"test:started:{job['id']}") == 0
        record = await redis.hgetall(f"cf:job:{job['id']}")
        assert record["state"] == "cancelled" and record["attempts"] == "0"
    finally:
        await session.close()
        await server.close()


async def test_cancel_a_running_job_interrupts_it(gateway: Gateway, redis: aioredis.Redis) -> None:
    """Cancelling a running io job cancels its asyncio task; it ends cancelled."""
    job = await gateway.submit("test.hold", 30)
    await wait_state(redis, job["id"], "running")
    status, body = await gateway.call("DELETE", f"/v1/jobs/{job['id']}")
    assert status == 200 and body["state"] == "cancelled"
    # The worker lets go of it: its stream entry is acknowledged, nothing is pending.
    async with asyncio.timeout(10):
        while (await redis.xpending("cf:stream:io", "corefleet-io"))["pending"]:
            await wait_state(redis, job["id"], "cancelled")
            await asyncio.sleep(0.05)  # sleep-ok: the ack follows the state change
    assert (await gateway.wait(job["id"]))["state"] == "cancelled"


async def test_cancel_of_a_finished_job_is_a_conflict(gateway: Gateway) -> None:
    """DELETE on a succeeded job answers 409 job_finished and changes nothing."""
    job = await gateway.submit("io.echo", 1)
    await gateway.wait(job["id"])
    status, body = await gateway.call("DELETE", f"/v1/jobs/{job['id']}")
    assert status == 409 and body["error"]["code"] == "job_finished"
    assert (await gateway.wait(job["id"]))["state"] == "succeeded"


async def test_batch_submits_every_job(gateway: Gateway) -> None:
    """POST /v1/jobs/batch stores and runs each job."""
    body = {"jobs": [{"task": "io.echo", "args": [i]} for i in range(5)]}
    status, reply = await gateway.call("POST", "/v1/jobs/batch", json=body)
    assert status == 202
    results = [(await gateway.wait(j["id"]))["result"] for j in reply["jobs"]]
    assert results == list(range(5))


async def test_tasks_lists_the_registry(gateway: Gateway) -> None:
    """GET /v1/tasks lists built-in io tasks with their parameters."""
    status, body = await gateway.call("GET", "/v1/tasks")
    assert status == 200
    by_name = {t["name"]: t for t in body["tasks"]}
    assert {"io.sleep", "io.echo", "io.http_get"} <= set(by_name)
    assert [p["name"] for p in by_name["io.http_get"]["parameters"]] == ["url", "timeout_s"]
    assert by_name["io.sleep"]["kind"] == "io" and by_name["io.sleep"]["engine"] == "asyncio"


async def test_health_and_readiness(gateway: Gateway) -> None:
    """/healthz says ok; /readyz checks Redis and every engine."""
    assert (await gateway.call("GET", "/healthz")) == (200, {"status": "ok"})
    status, body = await gateway.call("GET", "/readyz")
    assert status == 200 and body["checks"] == {
        "redis": "ok",
        "asyncio": "ok",
        "celery": "ok",
        "ray": "ok",
        "dask": "ok",
    }


async def test_queues_report_waiting_jobs_and_no_worker(bare_gateway: Gateway) -> None:
    """GET /v1/queues shows waiting io jobs, and no io worker when none consumes."""
    for _ in range(3):
        await bare_gateway.submit("io.sleep", 0)
    status, body = await bare_gateway.call("GET", "/v1/queues")
    assert status == 200
    io = body["engines"]["asyncio"]["queues"]["io"]
    assert (io["waiting"], io["workers"]) == (3, 0)


async def test_queues_count_live_io_workers(gateway: Gateway, redis: aioredis.Redis) -> None:
    """The gateway's embedded io worker checks in and is counted."""
    async with asyncio.timeout(10):
        while not await redis.zcard("cf:consumers:io"):  # noqa: ASYNC110  # another task's write
            await asyncio.sleep(0.05)  # sleep-ok: the worker checks in on start
    _status, body = await gateway.call("GET", "/v1/queues")
    assert body["engines"]["asyncio"]["queues"]["io"]["workers"] == 1


async def test_a_ray_job_may_require_a_worker_before_ray_has_started(
    gateway: Gateway, redis: aioredis.Redis
) -> None:
    """Until Ray's dispatcher runs, the gateway that starts it with the first Ray job checks
    in for Ray's queue, so a Ray job asking for a live worker is taken (it used to be a 503
    until some other Ray job had started Ray); once the gateway stops, it is not."""
    async with asyncio.timeout(10):
        while not await redis.zcard("cf:consumers:heavy"):  # noqa: ASYNC110  # another task's write
            await asyncio.sleep(0.05)  # sleep-ok: the gateway checks in on start
    _status, body = await gateway.call("GET", "/v1/queues")
    assert body["engines"]["ray"]["state"] == "not started"
    assert body["engines"]["ray"]["queues"]["heavy"]["workers"] == 1
    # Delayed, so that it does not start Ray here: the check is made at the submit.
    options = {"require_worker": True, "delay_s": 3600}
    job = await gateway.submit("heavy.pi", 1000, **options)
    status, _ = await gateway.call("DELETE", f"/v1/jobs/{job['id']}")
    assert status == 200
    await gateway.server.close()
    assert not await redis.zcard("cf:consumers:heavy")


async def test_events_stream_every_state_until_the_end(gateway: Gateway) -> None:
    """GET /v1/jobs/{id}/events sends queued/running/succeeded records, then closes."""
    job = await gateway.submit("io.sleep", 0.3)
    states = []
    async with gateway.session.get(f"{gateway.url}/v1/jobs/{job['id']}/events") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            if line.startswith(b"data: "):
                states.append(json.loads(line[6:])["state"])
    assert states[-1] == "succeeded"
    assert states == sorted(set(states), key=states.index)  # each state once, in order
    assert "running" in states or states[0] == "succeeded"


async def test_events_of_an_unknown_job_is_404(gateway: Gateway) -> None:
    """The event stream of an id with no job is a JSON 404, not an empty stream."""
    status, body = await gateway.call("GET", "/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV/events")
    assert (status, body["error"]["code"]) == (404, "job_not_found")


async def test_submit_with_wait_returns_the_result_in_one_trip(gateway: Gateway) -> None:
    """POST /v1/jobs?wait=S answers 200 with the finished record, or 202 if S ran out."""
    status, done = await gateway.call(
        "POST", "/v1/jobs?wait=10", json={"task": "io.echo", "args": ["now"]}
    )
    assert status == 200 and done["state"] == "succeeded" and done["result"] == "now"
    status, pending = await gateway.call(
        "POST", "/v1/jobs?wait=0.1", json={"task": "io.sleep", "args": [5]}
    )
    assert status == 202 and pending["state"] in ("queued", "running")
    status, bad = await gateway.call(
        "POST", "/v1/jobs?wait=nope", json={"task": "io.echo", "args": [1]}
    )
    assert status == 400 and bad["error"]["code"] == "invalid_parameter"
    # Cancelled, so that the gateway's stop does not wait out the sleep.
    assert (await gateway.call("DELETE", f"/v1/jobs/{pending['id']}"))[0] == 200


async def test_a_task_taking_ctx_first_gets_its_arguments(gateway: Gateway) -> None:
    """``ctx`` may come first, as in arq's tasks and Celery's bound tasks: the caller's
    positional arguments fill the parameters after it."""
    job = await gateway.submit("test.ctx_first", 7)
    done = await gateway.wait(job["id"], 30)
    assert (done["state"], done["result"]) == ("succeeded", [1, 7, "-"]), done
    job = await gateway.submit("test.ctx_first", 8, "x")
    assert (await gateway.wait(job["id"], 30))["result"] == [1, 8, "x"]
    status, body = await gateway.call(
        "POST", "/v1/jobs", json={"task": "test.ctx_first", "kwargs": {"n": 9}}
    )
    assert status == 202
    assert (await gateway.wait(body["id"], 30))["result"] == [1, 9, "-"]


async def test_progress_reported_from_a_thread_of_an_async_task_is_stored_at_once(
    gateway: Gateway,
) -> None:
    """An async task that hands work to a thread may report progress from there: the
    report is written before the call returns, and says whether it was recorded. (The
    io worker runs on this test's loop: in debug mode asyncio refuses a task started on
    it from another thread, which is how such a report used to be sent.)"""
    asyncio.get_running_loop().set_debug(True)
    job = await gateway.submit("test.progress_from_a_thread")
    done = await gateway.wait(job["id"], 30)
    assert done["state"] == "succeeded", done
    recorded, stored = done["result"]
    assert recorded is True
    assert stored is not None and json.loads(stored)["fraction"] == 0.5


async def test_tasks_with_defaults_json_has_no_form_for_are_listed(gateway: Gateway) -> None:
    """A default JSON cannot carry (infinity, a timedelta) is shown as its repr; it does
    not break ``GET /v1/tasks`` for every task."""
    status, body = await gateway.call("GET", "/v1/tasks")
    assert status == 200
    odd = next(t for t in body["tasks"] if t["name"] == "test.odd_defaults")
    defaults = {p["name"]: p["default"] for p in odd["parameters"]}
    assert defaults == {"every": "inf", "when": "datetime.timedelta(seconds=5)"}
