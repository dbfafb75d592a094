"""Python clients for corefleet: over HTTP (``AsyncClient``, ``Client``)."""

from clients.http import AsyncClient, Client
from service.errors import (
    BadRequest,
    Conflict,
    CorefleetError,
    EngineUnavailable,
    InvalidArguments,
    InvalidBody,
    InvalidJobId,
    InvalidJSON,
    JobFinished,
    JobNotFound,
    NotFound,
    PayloadTooLarge,
    TransportError,
    UnknownTask,
    WaitTimeout,
)
from service.jobs import Job, JobState

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "Conflict",
    "CorefleetError",
    "EngineUnavailable",
    "InvalidArguments",
    "InvalidBody",
    "InvalidJSON",
    "InvalidJobId",
    "Job",
    "JobFinished",
    "JobNotFound",
    "JobState",
    "NotFound",
    "PayloadTooLarge",
    "TransportError",
    "UnknownTask",
    "WaitTimeout",
]
