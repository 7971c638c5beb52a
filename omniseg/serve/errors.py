"""Errors of the web service, each with the HTTP status it is answered with."""

from __future__ import annotations

from omniseg.errors import OmnisegError


class ServiceError(OmnisegError):
    """A request the service refuses; ``status`` is the HTTP status of the answer.

    Attributes:
        message: what went wrong, in plain words, for the client.
    """

    status = 400

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class BadParameterError(ServiceError):
    """A missing, malformed or out-of-range request parameter (400)."""

    status = 400


class UnknownModelError(ServiceError):
    """The request names a model the service has not loaded (404)."""

    status = 404


class PayloadTooLargeError(ServiceError):
    """The request body is larger than the service accepts (413)."""

    status = 413


class UnsupportedMediaTypeError(ServiceError):
    """The request body is neither ``multipart/form-data`` nor JSON (415)."""

    status = 415


class ServiceBusyError(ServiceError):
    """Every worker is busy and the queue is full (503); the client may retry later."""

    status = 503


class InferenceError(ServiceError):
    """Segmentation failed for a reason that is not the request's fault (500); the
    details are in the server's log, not in the answer."""

    status = 500
