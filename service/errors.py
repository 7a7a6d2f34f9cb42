"""The one error type of the service, and the one table that maps its codes onto both protocols.

Why a table here and not in each adapter: REST and gRPC used to map statuses separately (an HTTP
status per raise in the core, an HTTP->gRPC table in the gRPC server), and the two drifted (issue 16).
The core, the body reader and the API-key check raise `ScoringError(code, message)`; the code alone
decides the HTTP status, the gRPC status and whether a retry may help. `tests/test_contract.py`
checks both transports against `ERRORS`.

Retryable errors carry a Retry-After (REST header; gRPC `grpc-retry-pushback-ms`), 1 s unless the
raiser knows better (the batcher's estimate of when its queue will have room).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from model.decode import ImageDecodeError, ImageTooLargeError


@dataclass(frozen=True)
class ErrorKind:
    http: int
    grpc: grpc.StatusCode
    retryable: bool = False


_BAD = ErrorKind(400, grpc.StatusCode.INVALID_ARGUMENT)
_TOO_LARGE = ErrorKind(413, grpc.StatusCode.RESOURCE_EXHAUSTED)  # the same request is refused again
_BUSY = ErrorKind(429, grpc.StatusCode.RESOURCE_EXHAUSTED, retryable=True)
_DOWN = ErrorKind(503, grpc.StatusCode.UNAVAILABLE, retryable=True)
_UNAUTHENTICATED = ErrorKind(401, grpc.StatusCode.UNAUTHENTICATED)

ERRORS: dict[str, ErrorKind] = {
    # the request (parameters, body, image) is wrong: no retry helps
    "bad_request": _BAD,
    "empty_body": _BAD,
    "empty_batch": _BAD,
    "bad_base64": _BAD,
    "bad_multipart": _BAD,
    "missing_image": _BAD,
    "image_corrupt": _BAD,
    "image_empty": _BAD,
    "image_not_found": _BAD,
    "image_unreadable": _BAD,
    "image_unrecognised": ErrorKind(415, grpc.StatusCode.INVALID_ARGUMENT),
    # a known format in a pixel mode the decoder cannot turn into RGB (model/decode.py `_convert`)
    "image_unsupported_mode": ErrorKind(415, grpc.StatusCode.INVALID_ARGUMENT),
    "unsupported_media_type": ErrorKind(415, grpc.StatusCode.INVALID_ARGUMENT),
    "unknown_model": ErrorKind(404, grpc.StatusCode.NOT_FOUND),
    "no_explanations": ErrorKind(404, grpc.StatusCode.NOT_FOUND),
    "missing_api_key": _UNAUTHENTICATED,
    "invalid_api_key": _UNAUTHENTICATED,
    "body_timeout": ErrorKind(408, grpc.StatusCode.DEADLINE_EXCEEDED),
    "client_closed": ErrorKind(499, grpc.StatusCode.CANCELLED),
    # too large: RESOURCE_EXHAUSTED as overload is, but with a pushback that says not to retry
    "body_too_large": _TOO_LARGE,
    "image_too_large": _TOO_LARGE,
    "too_many_items": _TOO_LARGE,
    "too_many_tokens": _TOO_LARGE,
    # overload: come back after Retry-After
    "overloaded": _BUSY,
    "queue_full": _BUSY,
    # the server (or this replica) cannot answer now: another try, maybe elsewhere, may succeed
    "not_ready": _DOWN,
    "shutting_down": _DOWN,
    "inference_timeout": _DOWN,
    "model_unavailable": _DOWN,
    "inference_failed": _DOWN,
    "decode_failed": _DOWN,  # the decode worker process died (or hung) on this image; it is replaced
    "explain_failed": _DOWN,
    "deadline_exceeded": ErrorKind(504, grpc.StatusCode.DEADLINE_EXCEEDED),
}


class ScoringError(Exception):
    """A refusal or failure with a stable, machine-readable `code` (a key of `ERRORS`).

    Protocol-neutral: whoever raises it names the code; the adapters read `http_status`,
    `grpc_status` and `retry_after_s` from here."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        if code not in ERRORS:  # a new code must be placed in the table, for both protocols
            raise ValueError(f"unknown error code {code!r}: add it to service.errors.ERRORS")
        super().__init__(message)
        self.code = code
        self.message = message
        self.kind = ERRORS[code]
        self.retry_after_s = retry_after_s if retry_after_s is not None or not self.kind.retryable else 1.0

    @property
    def http_status(self) -> int:
        return self.kind.http

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return self.kind.grpc

    @property
    def retryable(self) -> bool:
        return self.kind.retryable

    def __repr__(self) -> str:
        return f"ScoringError({self.code!r}, {self.message!r})"


def decode_error_code(exc: ImageDecodeError) -> str:
    """The code of bytes that are not a usable image: `image_too_large` (refused from its header) or
    `image_<reason>`; one mapping for the server and `musiq bulk`'s error rows."""
    return "image_too_large" if isinstance(exc, ImageTooLargeError) else f"image_{exc.reason}"
