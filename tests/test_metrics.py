"""GET /metrics: job counters kept in Redis by the scripts that change jobs, queue gauges
from the engines, and the gateway's own HTTP metrics, in Prometheus' text format."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from service import keys
from tests.conftest import Gateway, scrape_metrics


async def test_job_counters_count_every_change(gateway: Gateway) -> None:
    for i in range(3):
        await gateway.wait((await gateway.submit("io.echo", i))["id"])
    failed = await gateway.submit("test.boom", "no")
    assert (await gateway.wait(failed["id"]))["state"] == "failed"
    held = await gateway.submit("io.sleep", 30)
    status, _ = await gateway.call("DELETE", f"/v1/jobs/{held['id']}")
    assert status == 200
    got = await scrape_metrics(gateway)
    echo = 'engine="asyncio",task="io.echo"'
    assert got[f"corefleet_jobs_submitted_total{{{echo}}}"] == 3
    assert got[f"corefleet_job_attempts_total{{{echo}}}"] == 3
    assert got[f'corefleet_jobs_finished_total{{state="succeeded",{echo}}}'] == 3
    boom = 'corefleet_jobs_finished_total{state="failed",engine="asyncio",task="test.boom"}'
    assert got[boom] == 1
    cancelled = 'corefleet_jobs_finished_total{state="cancelled",engine="asyncio",task="io.sleep"}'
    assert got[cancelled] == 1


async def test_queue_gauges_follow_the_queues(bare_gateway: Gateway) -> None:
    for i in range(4):
        await bare_gateway.submit("io.echo", i)
    got = await scrape_metrics(bare_gateway)
    assert got['corefleet_queue_waiting{engine="asyncio",queue="io"}'] == 4
    assert got['corefleet_queue_workers{engine="asyncio",queue="io"}'] == 0
    assert got['corefleet_engine_state{engine="asyncio",state="local"}'] == 1


async def test_http_requests_are_counted_by_route_not_by_id(bare_gateway: Gateway) -> None:
    made = [(await bare_gateway.submit("io.echo", i))["id"] for i in range(2)]
    for job_id in made:
        await bare_gateway.call("GET", f"/v1/jobs/{job_id}")
    await bare_gateway.call("GET", "/v1/jobs/not-an-id")
    await bare_gateway.call("GET", "/no/such/route")
    await bare_gateway.call("PROPFIND", "/v1/jobs")  # a method not counted by name
    async with bare_gateway.session.get(f"{bare_gateway.url}/v1/jobs/{made[0]}/events") as feed:
        assert feed.status == 200  # its job is queued: the stream stays open until we leave
    got = await scrape_metrics(bare_gateway)
    requests = "corefleet_http_requests_total"
    assert got[f'{requests}{{method="POST",route="/v1/jobs",status="202"}}'] == 2
    assert got[f'{requests}{{method="GET",route="/v1/jobs/{{id}}",status="200"}}'] == 2
    assert got[f'{requests}{{method="GET",route="/v1/jobs/{{id}}",status="400"}}'] == 1
    assert got[f'{requests}{{method="GET",route="unmatched",status="404"}}'] == 1
    assert got[f'{requests}{{method="other",route="unmatched",status="405"}}'] == 1
    count = 'corefleet_http_request_duration_seconds_count{method="POST",route="/v1/jobs"}'
    inf = 'corefleet_http_request_duration_seconds_bucket{method="POST",route="/v1/jobs",le="+Inf"}'
    assert got[count] == got[inf] == 2
    # An event stream is counted (once its client has left), but lasts as long as its
    # client: no duration for it.
    events = 'route="/v1/jobs/{id}/events"'
    async with asyncio.timeout(10):
        while not [name for name in got if name.startswith(requests) and events in name]:
            await asyncio.sleep(0.05)  # sleep-ok: the stream's end is counted as it unwinds
            got = await scrape_metrics(bare_gateway)
    assert not [name for name in got if "duration" in name and events in name]


async def test_counters_are_shared_through_redis(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """What another gateway or a producer counted shows here too: the numbers are Redis's."""
    await redis.hincrby(keys.STATS, "submitted\tcelery\tcpu.count_primes", 5)
    got = await scrape_metrics(bare_gateway)
    assert got['corefleet_jobs_submitted_total{engine="celery",task="cpu.count_primes"}'] == 5
