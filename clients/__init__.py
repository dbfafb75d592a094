"""Python clients for corefleet: over HTTP (``AsyncClient``, ``Client``) and straight into
Redis for services that enqueue without HTTP (``AsyncProducer``, ``Producer``); and, for
a service that receives webhooks, ``verify_webhook``."""

from clients.http import AsyncClient, Client
from clients.producer import AsyncProducer, Producer
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
from service.webhooks import verify_webhook

__all__ = [
    "AsyncClient",
    "AsyncProducer",
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
    "Producer",
    "TransportError",
    "UnknownTask",
    "WaitTimeout",
    "verify_webhook",
]
