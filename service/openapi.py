"""The OpenAPI 3.1 document of the gateway; a test walks the router to keep it true."""

from __future__ import annotations

from typing import Any

from service.auth import OPEN_PATHS
from service.jobs import JobState
from service.webhooks import MAX_URL_LENGTH
from tasks import DEFAULT_PRIORITY, MAX_RESOURCE, PRIORITIES, RESOURCE_NAMES
from tasks.context import MAX_DELAY_S, MAX_TIMEOUT_S


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _header(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "schema": schema}


_RETRY_AFTER = _header("Seconds to wait before trying again", {"type": "integer"})
#: The headers an error answer carries besides its JSON body, by status.
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": _header("The scheme to use: Bearer", {"type": "string"})},
    405: {"Allow": _header("The methods the path takes", {"type": "string"})},
    429: {"Retry-After": _RETRY_AFTER},
    503: {"Retry-After": _RETRY_AFTER},
}


def _errors(*statuses: int) -> dict[str, Any]:
    words = {
        400: "Bad request",
        401: "No valid API token (where the deployment has tokens)",
        403: "A read token asked to change something",
        404: "Not found",
        405: "The path does not take this method",
        408: "The body did not arrive within 60 s",
        409: "Conflict",
        413: "Body too large",
        429: "The job's queue is full (back-pressure); try again after Retry-After",
        500: "An error of the gateway's own (its log has the details)",
        503: "An engine or the job store (Redis) is unavailable; try again after Retry-After",
    }
    responses = {}
    for status in statuses:
        response = _json(_ref("Error"), words[status])
        if status in _ERROR_HEADERS:
            response["headers"] = _ERROR_HEADERS[status]
        responses[str(status)] = response
    return responses


_JOB_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-7][0-9A-HJKMNP-TV-Z]{25}$"},
}

_SUBMIT = {
    "type": "object",
    "required": ["task"],
    "additionalProperties": False,
    "properties": {
        "task": {"type": "string", "examples": ["io.sleep"]},
        "args": {"type": "array", "items": {}},
        "kwargs": {"type": "object"},
        "options": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_S},
                "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100},
                "queue": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"},
                "require_worker": {"type": "boolean"},
                "priority": {
                    "enum": list(PRIORITIES),
                    "default": DEFAULT_PRIORITY,
                    "description": "Of the jobs waiting on a queue, workers take high first",
                },
                "webhook": {
                    "type": "string",
                    "format": "uri",
                    "maxLength": MAX_URL_LENGTH,
                    "description": "POST the finished record here (a host of "
                    "COREFLEET_WEBHOOK_HOSTS)",
                },
                "delay_s": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": MAX_DELAY_S,
                    "description": "Queue the job this many seconds from now",
                },
                "resources": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        name: {"type": "number", "minimum": 0, "maximum": MAX_RESOURCE}
                        for name in RESOURCE_NAMES
                    },
                },
            },
        },
    },
}

_JOB = {
    "type": "object",
    "required": ["id", "task", "kind", "engine", "queue", "state", "attempts", "created_at"],
    "properties": {
        "id": {"type": "string"},
        "task": {"type": "string"},
        "kind": {"type": "string", "enum": ["io", "cpu", "heavy", "gpu"]},
        "engine": {"type": "string", "enum": ["asyncio", "celery", "ray", "dask"]},
        "queue": {"type": "string"},
        "args": {"type": "array"},
        "kwargs": {"type": "object"},
        "options": {"type": "object"},
        "state": {"type": "string", "enum": [s.value for s in JobState]},
        "attempts": {"type": "integer"},
        "max_attempts": {"type": "integer"},
        "timeout_s": {
            "type": ["number", "null"],
            "description": "Its time limit, its own or its task's; null: the engine's default "
            "(cpu/gpu: COREFLEET_DEFAULT_TIME_LIMIT_S; io and heavy: none)",
        },
        "result": {},
        "error": {
            "type": ["object", "null"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": {"type": ["string", "null"], "format": "date-time"},
        "finished_at": {"type": ["string", "null"], "format": "date-time"},
        "run_at": {
            "type": ["string", "null"],
            "format": "date-time",
            "description": "When a delayed job, or one waiting to be retried, is due",
        },
        "progress": {
            "type": ["object", "null"],
            "description": "The running attempt's last ctx.progress report",
            "properties": {
                "fraction": {"type": "number", "minimum": 0, "maximum": 1},
                "message": {"type": "string"},
            },
        },
        "links": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "detail": {"type": "object"},
            },
        }
    },
}

_OBJECT = {"type": "object"}


def _submitted(response: dict[str, Any]) -> dict[str, Any]:
    """A submit's answer, with where the job is and whether this was a resend."""
    response["headers"] = {
        "Location": _header("The job's URL", {"type": "string"}),
        "Idempotent-Replayed": _header(
            "true when an Idempotency-Key resend was answered with its job", {"type": "string"}
        ),
    }
    return response


def openapi_document() -> dict[str, Any]:
    document = _document()
    for path, operations in document["paths"].items():
        for operation in operations.values():
            # Any path answers another method with a 405, and anything may meet a 500.
            operation["responses"].update(_errors(405, 500))
        # Where the deployment has tokens, every path but the open ones answers 401 without
        # one, and a read token gets 403 for anything but reading.
        if path in OPEN_PATHS or path.startswith("/dashboard/"):
            continue
        for method, operation in operations.items():
            operation["responses"].update(_errors(401, *(() if method == "get" else (403,))))
    return document


def _document() -> dict[str, Any]:
    body = {"required": True, "content": {"application/json": {"schema": _ref("SubmitJob")}}}
    batch_schema = {
        "type": "object",
        "required": ["jobs"],
        "properties": {
            "jobs": {"type": "array", "items": _ref("SubmitJob"), "minItems": 1, "maxItems": 1000}
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "corefleet gateway", "version": "1"},
        "paths": {
            "/v1/jobs": {
                "get": {
                    "summary": "Jobs, newest first, a page at a time, optionally filtered",
                    "parameters": [
                        *(
                            {
                                "name": name,
                                "in": "query",
                                "required": False,
                                "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                            }
                            for name in ("task", "engine", "queue")
                        ),
                        {
                            "name": "state",
                            "in": "query",
                            "required": False,
                            "schema": {"enum": [state.value for state in JobState]},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "required": False,
                            "description": "next_cursor of the page before",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["jobs", "next_cursor"],
                                "properties": {
                                    "jobs": {"type": "array", "items": _ref("Job")},
                                    "next_cursor": {"type": ["string", "null"]},
                                },
                            },
                            "A page of jobs; next_cursor is null at the end",
                        ),
                        **_errors(400, 503),
                    },
                },
                "post": {
                    "summary": "Submit one job; with ?wait=S, return when it is terminal",
                    "parameters": [
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "description": "Seconds to hold the request until the job is "
                            "terminal, at most COREFLEET_MAX_WAIT_S (a 400 names it)",
                            "schema": {"type": "number", "minimum": 0},
                        },
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "description": "The same request sent again with this key stores "
                            "nothing and answers with the job the key stands for (marked "
                            "Idempotent-Replayed: true); another request with it is a 409",
                            "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
                        },
                    ],
                    "requestBody": body,
                    "responses": {
                        "200": _submitted(_json(_ref("Job"), "Finished within ?wait")),
                        "202": _submitted(_json(_ref("Job"), "Stored and queued")),
                        **_errors(400, 404, 408, 409, 413, 429, 503),
                    },
                },
            },
            "/v1/jobs/batch": {
                "post": {
                    "summary": "Submit many jobs at once (all or none)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": batch_schema}},
                    },
                    "responses": {
                        "202": _json(
                            {
                                "type": "object",
                                "properties": {"jobs": {"type": "array", "items": _ref("Job")}},
                            },
                            "Stored and queued",
                        ),
                        **_errors(400, 404, 408, 413, 429, 503),
                    },
                }
            },
            "/v1/jobs/{id}": {
                "get": {
                    "summary": "A job's record, optionally waiting until it is terminal",
                    "parameters": [
                        _JOB_ID,
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "description": "Seconds to hold the request until the job is "
                            "terminal, at most COREFLEET_MAX_WAIT_S (a 400 names it)",
                            "schema": {"type": "number", "minimum": 0},
                        },
                    ],
                    "responses": {
                        "200": _json(_ref("Job"), "The record"),
                        **_errors(400, 404, 503),
                    },
                },
                "delete": {
                    "summary": "Cancel a job",
                    "parameters": [_JOB_ID],
                    "responses": {
                        "200": _json(_ref("Job"), "Cancelled"),
                        **_errors(400, 404, 409, 503),
                    },
                },
            },
            "/v1/jobs/{id}/events": {
                "get": {
                    "summary": "Server-Sent Events: the record at each change of state or "
                    "attempt (state) and each progress report (progress), to the end",
                    "parameters": [_JOB_ID],
                    "responses": {
                        "200": {
                            "description": "An event stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_errors(400, 404, 503),
                    },
                }
            },
            "/v1/events": {
                "get": {
                    "summary": "Server-Sent Events for every job: job (each new job, state "
                    "change and progress report) and resync (changes were missed)",
                    "responses": {
                        "200": {
                            "description": "An event stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_errors(503),
                    },
                }
            },
            "/v1/tasks": {
                "get": {
                    "summary": "The task registry",
                    "responses": {"200": _json(_OBJECT, "Every task")},
                }
            },
            "/v1/queues": {
                "get": {
                    "summary": "Engines, queues and workers",
                    "responses": {"200": _json(_OBJECT, "Per engine"), **_errors(503)},
                }
            },
            "/healthz": {
                "get": {"summary": "Liveness", "responses": {"200": _json(_OBJECT, "Up")}}
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: Redis and engines answer",
                    "responses": {
                        "200": _json(_OBJECT, "Ready"),
                        "503": _json(_OBJECT, "Not ready"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Job counters, queue gauges and HTTP metrics for Prometheus",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format, version 0.0.4",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_errors(503),
                    },
                }
            },
            "/dashboard": {
                "get": {
                    "summary": "The ops dashboard (HTML); its script and style lie under it",
                    "responses": {
                        "200": {
                            "description": "The page",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/dashboard/{asset}": {
                "get": {
                    "summary": "The dashboard's script and style",
                    "parameters": [
                        {
                            "name": "asset",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "enum": ["app.js", "style.css"]},
                        }
                    ],
                    "responses": {
                        "200": {"description": "The file"},
                        **_errors(404),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _json(_OBJECT, "OpenAPI 3.1")},
                }
            },
        },
        # Tokens are the deployment's choice (COREFLEET_API_TOKENS): none, or a bearer.
        "security": [{}, {"bearer": []}],
        "components": {
            "schemas": {"SubmitJob": _SUBMIT, "Job": _JOB, "Error": _ERROR},
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token (any request) or a read token (GET only); "
                    "401 without a valid one, 403 for a read token that would change "
                    "something",
                }
            },
        },
    }
