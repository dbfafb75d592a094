"""corefleet's one error tree.

The gateway maps each class to its HTTP status and ``code``; the clients raise the same
classes from the gateway's JSON errors, so callers catch one tree on both sides.
"""

from __future__ import annotations

from typing import Any, ClassVar


class CorefleetError(Exception):
    """Base of every error corefleet raises on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    #: Seconds a client should wait before it tries again (sent as ``Retry-After``), for
    #: errors that pass.
    retry_after_s: ClassVar[int | None] = None

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or {}

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "detail": self.detail}}

    def headers(self) -> dict[str, str]:
        """HTTP headers the error's answer carries besides its JSON body."""
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


class BadRequest(CorefleetError):
    """The request is malformed."""

    status = 400
    code = "bad_request"


class InvalidJSON(BadRequest):
    """The body is not valid JSON."""

    code = "invalid_json"


class InvalidBody(BadRequest):
    """The body is JSON but not the shape the endpoint takes."""

    code = "invalid_body"


class InvalidArguments(BadRequest):
    """The arguments do not fit the task's signature."""

    code = "invalid_arguments"


class InvalidJobId(BadRequest):
    """The job id is not one this service could have issued."""

    code = "invalid_id"


class InvalidParameter(BadRequest):
    """A query parameter has a value the endpoint cannot use."""

    code = "invalid_parameter"


class Unauthorized(CorefleetError):
    """No valid API token came with a request that needs one."""

    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="corefleet"'}


class Forbidden(CorefleetError):
    """The token is valid but may not do this (a read token asked to change something)."""

    status = 403
    code = "forbidden"


class NotFound(CorefleetError):
    """The thing named does not exist."""

    status = 404
    code = "not_found"


class UnknownTask(NotFound):
    """No task is registered under that name."""

    code = "unknown_task"


class JobNotFound(NotFound):
    """No job has that id (or its record has expired)."""

    code = "job_not_found"


class MethodNotAllowed(CorefleetError):
    """The route exists but not with that method."""

    status = 405
    code = "method_not_allowed"

    def headers(self) -> dict[str, str]:
        allowed = self.detail.get("allowed")
        return {"Allow": ", ".join(allowed)} if allowed else {}


class Conflict(CorefleetError):
    """The request conflicts with the job's current state."""

    status = 409
    code = "conflict"


class IdempotencyKeyReused(Conflict):
    """The Idempotency-Key already stands for a different job."""

    code = "idempotency_key_reused"


class JobFinished(Conflict):
    """The job already finished, so it cannot be cancelled."""

    code = "job_finished"


class PayloadTooLarge(CorefleetError):
    """The body is over the size limit."""

    status = 413
    code = "payload_too_large"


class RequestTimeout(CorefleetError):
    """The request's body did not arrive in time."""

    status = 408
    code = "request_timeout"


class EngineUnavailable(CorefleetError):
    """The engine for this job cannot take work now."""

    status = 503
    code = "engine_unavailable"
    retry_after_s = 5  # an unreachable address is tried again this often


class StoreUnavailable(CorefleetError):
    """Redis, where every job lives, does not answer."""

    status = 503
    code = "store_unavailable"
    retry_after_s = 5


class QueueFull(CorefleetError):
    """The job's queue holds as many jobs as this deployment allows (back-pressure)."""

    status = 429
    code = "queue_full"
    retry_after_s = 1


class ClientError(CorefleetError):
    """Raised on the client side only."""

    # Its own code: a gateway's 500 (``internal_error``) must come back as a plain
    # ``CorefleetError``, not as a client-side failure.
    code = "client_error"


class TransportError(ClientError):
    """The gateway could not be reached or answered something that is not corefleet JSON."""

    code = "transport_error"


class WaitTimeout(ClientError):
    """A job did not finish within the time the caller waited."""

    status = 408
    code = "wait_timeout"


def _subclasses(cls: type[CorefleetError]) -> list[type[CorefleetError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_subclasses(sub))
    return found


#: Every error class by its ``code``; the client turns gateway errors back into these.
BY_CODE: dict[str, type[CorefleetError]] = {cls.code: cls for cls in _subclasses(CorefleetError)}
assert len(BY_CODE) == len(_subclasses(CorefleetError)), "two error classes share a code"

_BY_STATUS = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    413: PayloadTooLarge,
    429: QueueFull,
    503: EngineUnavailable,
}


def from_json(status: int, body: Any) -> CorefleetError:
    """The error a gateway response stands for, whatever its shape."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return TransportError(f"gateway answered {status} without a corefleet error body")
    code = str(err.get("code", ""))
    cls = BY_CODE.get(code) or _BY_STATUS.get(status, CorefleetError)
    detail = err.get("detail") if isinstance(err.get("detail"), dict) else {}
    return cls(str(err.get("message", "")), detail)
