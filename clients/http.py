"""HTTP clients: ``AsyncClient`` (aiohttp) and ``Client`` (standard library), same methods:
``submit``, ``submit_batch``, ``get``, ``wait``, ``cancel``, ``jobs`` (the listing),
``queues`` and ``tasks``.

Both build requests and read responses with the same helpers; gateway errors come back as
the ``service.errors`` class the gateway raised, so callers catch one error tree.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import selectors
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import aiohttp

from service import errors
from service.jobs import Job, JobState

DEFAULT_URL = "http://127.0.0.1:8000"
# The longest ?wait a client asks for in one request; longer waits loop. A gateway whose
# COREFLEET_MAX_WAIT_S is shorter says its maximum, and the client asks for that instead.
_WAIT_STEP_S = 30.0
# Between polls of a gateway that allows no waiting at all (COREFLEET_MAX_WAIT_S=0).
_POLL_S = 0.5
# How long past a wait's deadline its last long-poll may take to be answered.
_ANSWER_GRACE_S = 2.0


def _bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def _once(idempotency_key: str | None) -> dict[str, str]:
    return {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}


def _submit_body(
    task: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None, options: dict[str, Any] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"task": task, "args": list(args)}
    if kwargs:
        body["kwargs"] = kwargs
    if options:
        body["options"] = options
    return body


@dataclass(frozen=True)
class JobPage:
    """A page of ``GET /v1/jobs``, newest first; ``next_cursor`` (None at the end) asks for
    the next page."""

    jobs: list[Job]
    next_cursor: str | None


def _listing_path(filters: dict[str, Any]) -> str:
    """``/v1/jobs`` with the filters that are set (state, task, engine, queue, limit,
    cursor) as its query."""
    # A JobState is a str Enum, whose str() is its name, not its value.
    query = {
        name: value.value if isinstance(value, JobState) else value
        for name, value in filters.items()
        if value is not None
    }
    return "/v1/jobs" + (f"?{urllib.parse.urlencode(query)}" if query else "")


def _page(payload: Any) -> JobPage:
    if not isinstance(payload, dict) or not isinstance(payload.get("jobs"), list):
        raise errors.TransportError("the gateway answered with something that is not a page")
    return JobPage([_job(job) for job in payload["jobs"]], payload.get("next_cursor"))


def _batch(payload: Any) -> list[Job]:
    if not isinstance(payload, dict) or not isinstance(payload.get("jobs"), list):
        raise errors.TransportError("the gateway answered with something that is not a batch")
    return [_job(job) for job in payload["jobs"]]


def _job(payload: Any) -> Job:
    if not isinstance(payload, dict) or "id" not in payload:
        raise errors.TransportError("the gateway answered with something that is not a job")
    try:
        return Job.from_api(payload)
    except (KeyError, ValueError) as exc:
        raise errors.TransportError(f"the gateway sent a job record without {exc}") from exc


def _decode(status: int, raw: bytes) -> Any:
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = None
    if status >= 400:
        raise errors.from_json(status, payload)
    return payload


class _Wait:
    """One ``wait``: long-polls of at most ``_WAIT_STEP_S`` until terminal or the deadline."""

    def __init__(self, job_id: str, timeout_s: float) -> None:
        self.job_id = job_id
        self.deadline = time.monotonic() + timeout_s
        self.step_s = _WAIT_STEP_S

    def next_request(self) -> tuple[str, float]:
        step = max(0.0, min(self.step_s, self.deadline - time.monotonic()))
        # Rounded down: rounded up, a wait at the gateway's maximum would be over it.
        step = math.floor(step * 1000) / 1000
        return f"/v1/jobs/{urllib.parse.quote(self.job_id)}?wait={step:.3f}", step

    def request_timeout_s(self, step: float, client_timeout_s: float) -> float:
        """How long one long-poll of ``step`` may take: the step, and the client's timeout
        for the answer, but not much past the wait's deadline (a gateway that does not
        answer is a ``TransportError`` soon after ``timeout_s``, not a timeout later)."""
        left = max(0.0, self.deadline - time.monotonic() - step)
        return step + min(client_timeout_s, left + _ANSWER_GRACE_S)

    def shorten(self, refused: errors.InvalidParameter) -> None:
        """Ask for no more than the gateway's maximum from now on; re-raises ``refused``
        when it was not about the wait, or the wait asked for was within the maximum."""
        most = refused.detail.get("max")
        if refused.detail.get("parameter") != "wait" or not isinstance(most, (int, float)):
            raise refused
        if not 0 <= most < self.step_s:
            raise refused
        self.step_s = math.floor(most * 1000) / 1000

    def done(self, job: Job) -> bool:
        """True once ``job`` is terminal; raises ``WaitTimeout`` past the deadline."""
        if job.state.terminal:
            return True
        if time.monotonic() >= self.deadline:
            raise errors.WaitTimeout(
                f"job {self.job_id} is still {job.state.value}", {"state": job.state.value}
            )
        return False

    def pause_s(self) -> float:
        """How long to wait before the next request: nothing while the gateway holds each
        request until the job changes; a poll interval where it allows no wait at all."""
        if self.step_s > 0:
            return 0.0
        return max(0.0, min(_POLL_S, self.deadline - time.monotonic()))


#: How a request is cut off with its socket (the gateway closed a kept-alive socket, or
#: stopped mid-answer): a request that may be sent twice is sent again on a new socket.
_CUT_OFF = (
    http.client.RemoteDisconnected,
    http.client.IncompleteRead,
    BrokenPipeError,
    ConnectionResetError,
)


def _transport_error(method: str, path: str, exc: Exception) -> errors.TransportError:
    return errors.TransportError(f"{method} {path}: {type(exc).__name__}: {exc}")


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether an idle kept-alive socket was closed by the gateway: it has something to
    read (the end of the stream) though no request is out. A selector, not ``select()``,
    which refuses descriptors past 1023."""
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(0))


class AsyncClient:
    """``async with AsyncClient() as client: job = await client.submit("io.sleep", 1)``."""

    def __init__(
        self, base_url: str = DEFAULT_URL, *, timeout_s: float = 60.0, token: str | None = None
    ) -> None:
        """``token``: an API token, for a gateway that wants one (COREFLEET_API_TOKENS)."""
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout_s
        self._auth = _bearer(token)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._auth)
        timeout = aiohttp.ClientTimeout(total=timeout_s or self._timeout)
        try:
            async with self._session.request(
                method, self.base_url + path, json=body, timeout=timeout, headers=headers
            ) as resp:
                return _decode(resp.status, await resp.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__  # aiohttp's timeout says nothing itself
            raise errors.TransportError(f"{method} {path}: {reason}") from exc

    async def submit(
        self,
        task: str,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Submit one job. ``idempotency_key``: the same call made again with it (say, after
        a transport error) creates no second job and returns the one the key stands for."""
        body = _submit_body(task, args, kwargs, options)
        return _job(await self._request("POST", "/v1/jobs", body, headers=_once(idempotency_key)))

    async def submit_batch(self, jobs: list[dict[str, Any]]) -> list[Job]:
        """Submit up to 1,000 jobs in one request, each ``{"task", "args", "kwargs",
        "options"}`` as ``POST /v1/jobs`` takes it: all are accepted, or none is."""
        return _batch(await self._request("POST", "/v1/jobs/batch", {"jobs": jobs}))

    async def get(self, job_id: str) -> Job:
        return _job(await self._request("GET", f"/v1/jobs/{urllib.parse.quote(job_id)}"))

    async def jobs(
        self,
        *,
        state: str | JobState | None = None,
        task: str | None = None,
        engine: str | None = None,
        queue: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> JobPage:
        """A page of jobs, newest first, filtered as ``GET /v1/jobs`` filters."""
        filters = {"state": state, "task": task, "engine": engine, "queue": queue}
        path = _listing_path({**filters, "limit": limit, "cursor": cursor})
        return _page(await self._request("GET", path))

    async def queues(self) -> dict[str, Any]:
        """Each engine's state and its queues' depth and workers (``GET /v1/queues``)."""
        return dict(await self._request("GET", "/v1/queues"))

    async def wait(self, job_id: str, timeout_s: float = 60.0) -> Job:
        """The job once it is terminal; ``WaitTimeout`` if that takes over ``timeout_s``."""
        waiting = _Wait(job_id, timeout_s)
        while True:
            path, step = waiting.next_request()
            try:
                timeout_s = waiting.request_timeout_s(step, self._timeout)
                job = _job(await self._request("GET", path, timeout_s=timeout_s))
            except errors.InvalidParameter as refused:
                waiting.shorten(refused)
                continue
            if waiting.done(job):
                return job
            await asyncio.sleep(waiting.pause_s())

    async def cancel(self, job_id: str) -> Job:
        return _job(await self._request("DELETE", f"/v1/jobs/{urllib.parse.quote(job_id)}"))

    async def tasks(self) -> list[dict[str, Any]]:
        return list((await self._request("GET", "/v1/tasks"))["tasks"])


class Client:
    """The blocking twin of ``AsyncClient`` (standard library only, kept-alive sockets).

    Threads may share one: each request in flight has a socket of its own (a thread's long
    ``wait`` holds up nobody else's submit), and up to ``MAX_IDLE`` stay open between them.
    """

    MAX_IDLE = 8

    def __init__(
        self, base_url: str = DEFAULT_URL, *, timeout_s: float = 60.0, token: str | None = None
    ) -> None:
        """``token`` as in ``AsyncClient``."""
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port], not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._parts = parts
        self._timeout = timeout_s
        self._auth = _bearer(token)
        # Sockets not in use. One request at a time on each: http.client sends a second
        # request before the first is answered otherwise, or hands one thread another's
        # answer. The lock guards the list only, never a request.
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle sockets (one in use closes as its request ends, or is kept)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take_connection(self, timeout_s: float) -> http.client.HTTPConnection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                cls = (
                    http.client.HTTPSConnection
                    if self._parts.scheme == "https"
                    else http.client.HTTPConnection
                )
                return cls(self._parts.hostname or "", self._parts.port, timeout=timeout_s)
            sock = conn.sock
            if sock is not None and _closed_by_peer(sock):
                # An idle kept-alive socket has nothing to read unless the gateway closed
                # it: take another rather than send a request into a closed one.
                conn.close()
                continue
            conn.timeout = timeout_s
            if sock is not None:
                sock.settimeout(timeout_s)
            return conn

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {**self._auth, **(headers or {})}
        if data is not None:
            headers["Content-Type"] = "application/json"
        prefix = self._parts.path.rstrip("/")
        # Once more on a kept-alive socket that was closed under the request, if sending it
        # twice does no harm: a POST may have been stored before the answer was lost, and
        # only its Idempotency-Key makes a second one safe.
        tries = 2 if method in ("GET", "DELETE") or "Idempotency-Key" in headers else 1
        for attempt in range(1, tries + 1):
            conn = self._take_connection(timeout_s or self._timeout)
            try:
                conn.request(method, prefix + path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except _CUT_OFF as exc:
                conn.close()
                if attempt == tries:
                    raise _transport_error(method, path, exc) from exc
                continue
            except (OSError, http.client.HTTPException) as exc:
                # Not an HTTP answer at all (a garbled status line, say): no resend.
                conn.close()
                raise _transport_error(method, path, exc) from exc
            except BaseException:
                conn.close()  # interrupted mid-request: the socket is in no state to reuse
                raise
            self._give_back(conn)
            return _decode(resp.status, raw)
        raise AssertionError("unreachable")

    def submit(
        self,
        task: str,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Submit one job; ``idempotency_key`` as in ``AsyncClient.submit``."""
        body = _submit_body(task, args, kwargs, options)
        return _job(self._request("POST", "/v1/jobs", body, headers=_once(idempotency_key)))

    def submit_batch(self, jobs: list[dict[str, Any]]) -> list[Job]:
        """As ``AsyncClient.submit_batch``."""
        return _batch(self._request("POST", "/v1/jobs/batch", {"jobs": jobs}))

    def get(self, job_id: str) -> Job:
        return _job(self._request("GET", f"/v1/jobs/{urllib.parse.quote(job_id)}"))

    def jobs(
        self,
        *,
        state: str | JobState | None = None,
        task: str | None = None,
        engine: str | None = None,
        queue: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> JobPage:
        """As ``AsyncClient.jobs``."""
        filters = {"state": state, "task": task, "engine": engine, "queue": queue}
        return _page(
            self._request("GET", _listing_path({**filters, "limit": limit, "cursor": cursor}))
        )

    def queues(self) -> dict[str, Any]:
        """As ``AsyncClient.queues``."""
        return dict(self._request("GET", "/v1/queues"))

    def wait(self, job_id: str, timeout_s: float = 60.0) -> Job:
        """The job once it is terminal; ``WaitTimeout`` if that takes over ``timeout_s``."""
        waiting = _Wait(job_id, timeout_s)
        while True:
            path, step = waiting.next_request()
            try:
                timeout_s = waiting.request_timeout_s(step, self._timeout)
                job = _job(self._request("GET", path, timeout_s=timeout_s))
            except errors.InvalidParameter as refused:
                waiting.shorten(refused)
                continue
            if waiting.done(job):
                return job
            time.sleep(waiting.pause_s())

    def cancel(self, job_id: str) -> Job:
        return _job(self._request("DELETE", f"/v1/jobs/{urllib.parse.quote(job_id)}"))

    def tasks(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/tasks")["tasks"])
