"""Python clients for corefleet: over HTTP (``AsyncClient``, ``Client``) and straight into
Redis for services that enqueue without HTTP (``AsyncProducer``, ``Producer``); and, for
a service that receives webhooks, ``verify_webhook``."""

from clients.http import AsyncClient, Client, JobPage
from clients.producer import AsyncProducer, Producer
from service.errors import (
    BadRequest,
    ClientError,
    Conflict,
    CorefleetError,
    EngineUnavailable,
    Forbidden,
    IdempotencyKeyReused,
    InvalidArguments,
    InvalidBody,
    InvalidJobId,
    InvalidJSON,
    InvalidParameter,
    JobFinished,
    JobNotFound,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    RequestTimeout,
    StoreUnavailable,
    TransportError,
    Unauthorized,
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
    "ClientError",
    "Conflict",
    "CorefleetError",
    "EngineUnavailable",
    "Forbidden",
    "IdempotencyKeyReused",
    "InvalidArguments",
    "InvalidBody",
    "InvalidJSON",
    "InvalidJobId",
    "InvalidParameter",
    "Job",
    "JobFinished",
    "JobNotFound",
    "JobPage",
    "JobState",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "Producer",
    "QueueFull",
    "RequestTimeout",
    "StoreUnavailable",
    "TransportError",
    "Unauthorized",
    "UnknownTask",
    "WaitTimeout",
    "verify_webhook",
]
