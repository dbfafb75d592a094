"""GET /v1/jobs: every job, newest first, a page at a time, filtered by state, task,
engine and queue; stale index entries go as their records expire."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from service import ids, keys, store
from tests.conftest import Gateway


async def _page(gateway: Gateway, query: str = "") -> dict[str, Any]:
    status, body = await gateway.call("GET", f"/v1/jobs{query}")
    assert status == 200, body
    return dict(body)


async def _all(gateway: Gateway, query: str) -> list[str]:
    """Every id a listing yields, following the cursor to its end."""
    found: list[str] = []
    page = await _page(gateway, "?" + query)
    while True:
        found += [job["id"] for job in page["jobs"]]
        if page["next_cursor"] is None:
            return found
        page = await _page(gateway, f"?{query}&cursor={page['next_cursor']}")


def test_ids_made_in_a_row_sort_in_that_order_even_within_a_millisecond() -> None:
    made = [ids.new_id() for _ in range(10_000)]
    assert sorted(made) == made and len(set(made)) == len(made)
    assert all(ids.is_valid(job_id) for job_id in made)


async def test_jobs_are_listed_newest_first_a_page_at_a_time(bare_gateway: Gateway) -> None:
    made = [(await bare_gateway.submit("io.echo", i))["id"] for i in range(7)]
    first = await _page(bare_gateway, "?limit=3")
    assert [job["id"] for job in first["jobs"]] == made[::-1][:3]
    assert first["jobs"][0]["args"] == [6] and first["jobs"][0]["state"] == "queued"
    assert await _all(bare_gateway, "limit=3") == made[::-1]
    last = await _page(bare_gateway, f"?limit=7&cursor={made[-1]}")
    assert [job["id"] for job in last["jobs"]] == made[::-1][1:]
    assert last["next_cursor"] is None


async def test_filters_pick_jobs_by_state_task_engine_and_queue(
    bare_gateway: Gateway,
) -> None:
    echo = [(await bare_gateway.submit("io.echo", i))["id"] for i in range(3)]
    other_queue = (await bare_gateway.submit("io.echo", 9, queue="elsewhere"))["id"]
    slept = (await bare_gateway.submit("io.sleep", 30))["id"]
    status, _ = await bare_gateway.call("DELETE", f"/v1/jobs/{echo[1]}")
    assert status == 200
    everything = [slept, other_queue, *echo[::-1]]
    assert await _all(bare_gateway, "limit=2") == everything
    assert await _all(bare_gateway, "task=io.echo") == [other_queue, echo[2], echo[1], echo[0]]
    assert await _all(bare_gateway, "state=cancelled") == [echo[1]]
    assert await _all(bare_gateway, "state=queued&task=io.echo&queue=io") == [echo[2], echo[0]]
    assert await _all(bare_gateway, "engine=asyncio") == everything
    assert await _all(bare_gateway, "engine=celery") == []


async def test_a_rare_filter_ends_a_page_early_and_says_where_to_go_on(
    bare_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "LIST_BUDGET", 4)  # look at 4 jobs per call
    wanted = (await bare_gateway.submit("io.sleep", 30))["id"]
    for i in range(6):
        await bare_gateway.submit("io.echo", i)
    first = await _page(bare_gateway, "?task=io.sleep")
    assert first["jobs"] == [] and first["next_cursor"] is not None
    assert await _all(bare_gateway, "task=io.sleep") == [wanted]


async def test_expired_jobs_leave_the_listing_and_the_index(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    made = [(await bare_gateway.submit("io.echo", i))["id"] for i in range(5)]
    await redis.delete(keys.job(made[1]), keys.job(made[3]))  # as their TTL would
    assert await _all(bare_gateway, "") == [made[4], made[2], made[0]]
    assert sorted(await redis.zrange(keys.JOBS, 0, -1)) == sorted([made[0], made[2], made[4]])


async def test_new_jobs_sweep_stale_index_entries(
    bare_gateway: Gateway, redis: aioredis.Redis
) -> None:
    """Without any listing, creating jobs samples the index and drops expired entries, so
    the index stays near the number of live jobs."""
    made = [(await bare_gateway.submit("io.echo", i))["id"] for i in range(40)]
    await redis.delete(*(keys.job(job_id) for job_id in made))
    for i in range(80):
        await bare_gateway.submit("io.echo", i)
    assert await redis.zcard(keys.JOBS) < 80 + 40 / 2


@pytest.mark.parametrize(
    ("query", "word"),
    [
        ("?state=sleeping", "state"),
        ("?limit=0", "limit"),
        ("?limit=501", "limit"),
        ("?limit=ten", "limit"),
        ("?cursor=not-an-id", "cursor"),
        (f"?cursor={ids.new_id()}%0A", "cursor"),
        ("?limit=" + "9" * 5000, "limit"),
        ("?task=", "task"),
        ("?colour=red", "unknown"),
    ],
)
async def test_bad_listing_parameters_are_a_400(
    bare_gateway: Gateway, query: str, word: str
) -> None:
    status, body = await bare_gateway.call("GET", f"/v1/jobs{query}")
    assert status == 400 and body["error"]["code"] == "invalid_parameter"
    assert word in body["error"]["message"]
