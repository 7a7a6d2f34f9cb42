"""Optional API keys (REST and gRPC) and TLS / mutual TLS for gRPC, all configured in one place.

Keys come from `MUSIQ_API_KEYS` (a JSON list) and/or `MUSIQ_API_KEYS_FILE` (one key per line, `#`
comments); with neither set, authentication is off. A client sends its key as `X-API-Key: <key>`
or `Authorization: Bearer <key>` (gRPC: the same names, lower-case, as call metadata). Keys are
compared as SHA-256 digests with `hmac.compare_digest` against every configured key, so the
timing shows neither which key matched nor how long the keys are.

Only the scoring API needs a key: REST paths under `/v1/`, gRPC service `musiq.v1.Quality`.
Liveness, readiness, `/metrics`, the gRPC health service and reflection stay open, because
orchestrators and scrapers probe them without credentials and they reveal no image data.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from fastapi import Request

from service.errors import ScoringError
from service.settings import ServiceSettings

PROTECTED_PREFIX = "/v1/"
PROTECTED_GRPC_SERVICES = ("musiq.v1.Quality",)


class ApiKeys:
    def __init__(self, keys: Iterable[str], *, enabled: bool | None = None) -> None:
        self._digests = [_digest(k) for k in keys if k]
        self.enabled = bool(self._digests) if enabled is None else enabled

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> ApiKeys:
        """A configured key file must hold keys: an empty one would silently open the service."""
        keys = [k.strip() for k in settings.api_keys if k.strip()]
        if settings.api_keys_file is not None:
            try:
                lines = settings.api_keys_file.read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"cannot read MUSIQ_API_KEYS_FILE {settings.api_keys_file}: {exc}") from exc
            from_file = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
            if not from_file:
                raise ValueError(f"MUSIQ_API_KEYS_FILE {settings.api_keys_file} holds no key")
            keys += from_file
        return cls(keys)

    def accepts(self, presented: str | None) -> bool:
        if not self.enabled:
            return True
        if not presented:
            return False
        digest = _digest(presented)
        matched = False
        for known in self._digests:  # no early exit: every key is compared
            matched |= hmac.compare_digest(known, digest)
        return matched


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def presented_key(x_api_key: str | None, authorization: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


def check_api_key(keys: ApiKeys, request: Request) -> None:
    """The REST check (an app-wide dependency in service/rest.py): runs before the body is read,
    so a refused client sends none."""
    if not keys.enabled or not request.url.path.startswith(PROTECTED_PREFIX):
        return
    key = presented_key(request.headers.get("x-api-key"), request.headers.get("authorization"))
    if key is None:
        raise ScoringError("missing_api_key", "send an API key as X-API-Key or Authorization: Bearer")
    if not keys.accepts(key):
        raise ScoringError("invalid_api_key", "the API key is not valid")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no type information: Any
    """Refuses calls to the scoring service without a valid key (UNAUTHENTICATED)."""

    def __init__(self, keys: ApiKeys, protected: Sequence[str] = PROTECTED_GRPC_SERVICES) -> None:
        self.keys = keys
        self.protected = tuple(protected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").split("/")[0]
        if handler is None or not self.keys.enabled or service not in self.protected:
            return handler
        metadata = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        key = presented_key(metadata.get("x-api-key"), metadata.get("authorization"))
        if key is None:
            return _refusing(
                handler, "missing_api_key: send an API key as x-api-key or authorization metadata"
            )
        if not self.keys.accepts(key):
            return _refusing(handler, "invalid_api_key: the API key is not valid")
        return handler


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with UNAUTHENTICATED."""

    async def refuse(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def grpc_server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS when a certificate is configured; mutual TLS (client certificates required) with a client CA."""
    cert, key, ca = settings.grpc_tls_cert, settings.grpc_tls_key, settings.grpc_tls_client_ca
    if cert is None and key is None:
        if ca is not None:
            raise ValueError("MUSIQ_GRPC_TLS_CLIENT_CA needs MUSIQ_GRPC_TLS_CERT and MUSIQ_GRPC_TLS_KEY")
        return None
    if cert is None or key is None:
        raise ValueError("gRPC TLS needs both MUSIQ_GRPC_TLS_CERT and MUSIQ_GRPC_TLS_KEY")
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=ca.read_bytes() if ca is not None else None,
        require_client_auth=ca is not None,
    )
