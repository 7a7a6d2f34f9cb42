"""Python client for the MUSIQ scoring service: REST (sync and async) and gRPC.

Needs only httpx (and grpcio with protobuf for gRPC; the generated stubs ship in musiq_client/gen):
no torch, no numpy, not the server package. Retries 429 and 503 (gRPC RESOURCE_EXHAUSTED /
UNAVAILABLE) with exponential backoff, honouring the server's Retry-After (gRPC: its retry pushback).

    from musiq_client import Client
    client = Client("http://localhost:8000")
    client.score("photo.jpg").score
    results = client.score_many(paths, concurrency=8)   # in order; failures are MusiqError values
    client.explain("photo.jpg").scales[2].heatmap_png   # PNG bytes: where the model looked
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

__all__ = [
    "AsyncClient",
    "Client",
    "Explanation",
    "GrpcClient",
    "MusiqError",
    "ScaleExplanation",
    "ScoreResult",
]

ImageInput = str | os.PathLike[str] | bytes
RETRYABLE_HTTP = {429, 503}


@dataclass(frozen=True)
class ScoreResult:
    score: float
    model: str
    model_version: str
    tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    distribution: tuple[float, ...] | None = None
    id: str = ""


@dataclass(frozen=True)
class ScaleExplanation:
    """One scale's CLS attention rollout: weights on its patch grid (None: patch not packed)."""

    scale_id: int
    longer_side: int | None  # None for the native scale
    height: int
    width: int
    grid_h: int
    grid_w: int
    share: float
    weights: list[list[float | None]]
    heatmap_png: bytes


@dataclass(frozen=True)
class Explanation:
    result: ScoreResult
    scales: tuple[ScaleExplanation, ...]


class MusiqError(Exception):
    """What the service refused, with its error code (e.g. "image_corrupt") and HTTP-like status."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


R = TypeVar("R")  # what a response parses into


def _read(image: ImageInput) -> bytes:
    return bytes(image) if isinstance(image, bytes | bytearray) else Path(image).read_bytes()


def _delay(attempt: int, backoff_s: float, retry_after_s: float | None) -> float:
    """The server's Retry-After when given, else exponential backoff with jitter."""
    if retry_after_s is not None:
        return retry_after_s
    return backoff_s * (2.0**attempt) * (0.5 + random.random())


def _result(body: dict[str, Any], item_id: str = "") -> ScoreResult:
    dist = body.get("distribution")
    return ScoreResult(
        score=float(body["score"]),
        model=body["model"],
        model_version=body["model_version"],
        tokens=int(body["tokens"]),
        timings=dict(body.get("timings") or {}),
        distribution=tuple(dist) if dist else None,
        id=item_id,
    )


def _explanation(body: dict[str, Any]) -> Explanation:
    scales = tuple(
        ScaleExplanation(
            **{k: v for k, v in scale.items() if k != "heatmap_png"},
            heatmap_png=base64.b64decode(scale["heatmap_png"]),
        )
        for scale in body["scales"]
    )
    return Explanation(_result(body), scales)


def _error(response: httpx.Response) -> MusiqError:
    try:
        err = response.json()["error"]
        code, message = err["code"], err["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200]
    retry = response.headers.get("Retry-After")
    return MusiqError(
        response.status_code, code, message, float(retry) if retry and retry.isdigit() else None
    )


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is optional
        return None
    return tqdm(total=total, unit="img", desc="scoring")


class _Rest:
    """What the sync and async REST clients share: the request, and what a response means."""

    def __init__(self, base_url: str, retries: int, backoff_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s

    def _request(
        self, data: bytes, model: str | None, max_native_tokens: int | None, route: str = "/v1/score"
    ) -> dict[str, Any]:
        params = {
            k: v for k, v in {"model": model, "max_native_tokens": max_native_tokens}.items() if v is not None
        }
        return {
            "url": f"{self.base_url}{route}",
            "content": data,
            "params": params,
            "headers": {"Content-Type": "application/octet-stream"},
        }

    def _outcome(
        self, response: httpx.Response, attempt: int, parse: Callable[[dict[str, Any]], R]
    ) -> R | float:
        """The parsed result; or, for a retryable refusal with attempts left, the seconds to wait first."""
        if response.status_code == 200:
            return parse(response.json())
        err = _error(response)
        if response.status_code not in RETRYABLE_HTTP or attempt >= self.retries:
            raise err
        return float(_delay(attempt, self.backoff_s, err.retry_after_s))


class Client(_Rest):
    """Synchronous REST client."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        timeout_s: float = 60.0,
        retries: int = 5,
        backoff_s: float = 0.2,
    ) -> None:
        super().__init__(base_url, retries, backoff_s)
        self.http = httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score(
        self, image: ImageInput, *, model: str | None = None, max_native_tokens: int | None = None
    ) -> ScoreResult:
        return self._call(self._request(_read(image), model, max_native_tokens), _result)

    def explain(
        self, image: ImageInput, *, model: str | None = None, max_native_tokens: int | None = None
    ) -> Explanation:
        """The score plus each scale's attention rollout and heatmap (`POST /v1/explain`)."""
        return self._call(self._request(_read(image), model, max_native_tokens, "/v1/explain"), _explanation)

    def _call(self, request: dict[str, Any], parse: Callable[[dict[str, Any]], R]) -> R:
        attempt = 0
        while isinstance(outcome := self._outcome(self.http.post(**request), attempt, parse), float):
            time.sleep(outcome)
            attempt += 1
        return outcome

    def score_many(
        self, images: Sequence[ImageInput], *, concurrency: int = 8, progress: bool = True, **kwargs: Any
    ) -> list[ScoreResult | MusiqError]:
        """Scores every image with `concurrency` requests in flight; results in input order."""
        bar = _progress(len(images), progress)

        def one(image: ImageInput) -> ScoreResult | MusiqError:
            try:
                return self.score(image, **kwargs)
            except MusiqError as exc:
                return exc
            finally:
                if bar is not None:
                    bar.update(1)

        try:
            with ThreadPoolExecutor(max(1, concurrency)) as pool:
                return list(pool.map(one, images))
        finally:
            if bar is not None:
                bar.close()

    def models(self) -> dict[str, Any]:
        models: dict[str, Any] = self.http.get(f"{self.base_url}/v1/models").json()
        return models


class AsyncClient(_Rest):
    """asyncio REST client."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        timeout_s: float = 60.0,
        retries: int = 5,
        backoff_s: float = 0.2,
    ) -> None:
        super().__init__(base_url, retries, backoff_s)
        self.http = httpx.AsyncClient(timeout=timeout_s)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def score(
        self, image: ImageInput, *, model: str | None = None, max_native_tokens: int | None = None
    ) -> ScoreResult:
        data = await asyncio.to_thread(_read, image)
        return await self._call(self._request(data, model, max_native_tokens), _result)

    async def explain(
        self, image: ImageInput, *, model: str | None = None, max_native_tokens: int | None = None
    ) -> Explanation:
        """The score plus each scale's attention rollout and heatmap (`POST /v1/explain`)."""
        data = await asyncio.to_thread(_read, image)
        return await self._call(self._request(data, model, max_native_tokens, "/v1/explain"), _explanation)

    async def _call(self, request: dict[str, Any], parse: Callable[[dict[str, Any]], R]) -> R:
        attempt = 0
        while isinstance(outcome := self._outcome(await self.http.post(**request), attempt, parse), float):
            await asyncio.sleep(outcome)
            attempt += 1
        return outcome

    async def score_many(
        self, images: Sequence[ImageInput], *, concurrency: int = 8, progress: bool = True, **kwargs: Any
    ) -> list[ScoreResult | MusiqError]:
        """Scores every image with at most `concurrency` requests in flight; results in input order."""
        bar = _progress(len(images), progress)
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(image: ImageInput) -> ScoreResult | MusiqError:
            async with gate:
                try:
                    return await self.score(image, **kwargs)
                except MusiqError as exc:
                    return exc
                finally:
                    if bar is not None:
                        bar.update(1)

        try:
            return list(await asyncio.gather(*(one(i) for i in images)))
        finally:
            if bar is not None:
                bar.close()


GRPC_SERVICE = "musiq.v1.Quality"
# The unary methods gRPC retries by itself. A stream is not retried: its replies come back as they
# finish, and a retry would score again the items already answered.
GRPC_RETRIED_METHODS = ("Score", "ScoreBatch", "Explain")
# gRPC caps a retry policy's maxAttempts at 5 (gRFC A6); a larger value is treated as 5.
GRPC_MAX_ATTEMPTS = 5
# gRPC retries a call only while its request fits the per-call retry buffer (256 KiB by default:
# less than most photos). 32 MiB is the server's default request limit (MUSIQ_MAX_BODY_BYTES): a
# larger image, which such a server refuses at its message limit (RESOURCE_EXHAUSTED, no pushback),
# is then sent once, not once per attempt.
GRPC_RETRY_BUFFER_BYTES = 32 * 2**20


def _duration(seconds: float) -> str:
    """A protobuf JSON Duration ("0.2s")."""
    return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"


def grpc_service_config(retries: int = 5, backoff_s: float = 0.2) -> str:
    """The channel's service config: `round_robin` over every address (see GrpcClient), and a retry
    policy for the unary methods. gRPC retries UNAVAILABLE and RESOURCE_EXHAUSTED with exponential
    backoff from `backoff_s`, or after the server's `grpc-retry-pushback-ms` when it sends one: the
    Retry-After of an overload refusal, or a negative value (do not retry) for an image too large,
    which shares RESOURCE_EXHAUSTED. At most min(retries, 4) retries: gRPC's cap of 5 attempts."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    attempts = min(retries + 1, GRPC_MAX_ATTEMPTS)
    if attempts >= 2:  # gRPC rejects a policy of fewer than 2 attempts
        initial = max(backoff_s, 0.001)
        config["methodConfig"] = [
            {
                "name": [{"service": GRPC_SERVICE, "method": m} for m in GRPC_RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": attempts,
                    "initialBackoff": _duration(initial),
                    "maxBackoff": _duration(initial * 2 ** (GRPC_MAX_ATTEMPTS - 2)),
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
                },
            }
        ]
    return json.dumps(config)


GRPC_SERVICE_CONFIG = grpc_service_config()


class GrpcClient:
    """gRPC client (`musiq.v1.Quality`); `score_many` streams through `ScoreStream`.

    The channel balances `round_robin` over every address `target` resolves to, one connection
    each, instead of gRPC's default `pick_first` (one connection to the first address, all calls
    on it). HTTP/2 multiplexes every call over a long-lived connection, so with `pick_first` a
    client stays on one replica however many there are. Give it a name that resolves to every
    replica, e.g. the Helm chart's headless Service
    `dns:///<fullname>-grpc-headless.<namespace>.svc.cluster.local:50051`, or a list,
    `ipv4:10.0.0.1:50051,10.0.0.2:50051`. Replicas added later are found when the name is
    resolved again, which the server's maximum connection age forces every few minutes
    (`MUSIQ_GRPC_MAX_CONNECTION_AGE_S`). A draining replica answers UNAVAILABLE, which `score`
    retries as before; round_robin gives each attempt the next replica in turn and skips one
    whose connection is closed. One `score_many` is one stream, so it stays on one replica;
    `score` calls (from threads, or several clients) spread. A `host:port` that resolves to one
    address behaves as before.

    Retries are gRPC's own (`grpc_service_config`): `score` is retried on UNAVAILABLE and
    RESOURCE_EXHAUSTED, after the server's pushback when it sends one (an overload refusal's
    Retry-After), never when the pushback says no retry helps (an image too large). At most 4
    retries (gRPC's cap), all within `timeout_s`.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout_s: float = 60.0,
        retries: int = 5,
        backoff_s: float = 0.2,
    ) -> None:
        import grpc

        from musiq_client.gen import quality_pb2, quality_pb2_grpc

        self._grpc, self._pb = grpc, quality_pb2
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", 64 * 2**20),
                ("grpc.service_config", grpc_service_config(retries, backoff_s)),
                ("grpc.per_rpc_retry_buffer_size", GRPC_RETRY_BUFFER_BYTES),
            ],
        )
        # generated by grpc_tools without annotations (its .pyi covers the messages only)
        self.stub = quality_pb2_grpc.QualityStub(self.channel)  # type: ignore[no-untyped-call]
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _from_reply(self, reply: Any) -> ScoreResult | MusiqError:
        if reply.HasField("error"):
            return MusiqError(400, reply.error.code, reply.error.message)
        t = reply.timings
        return ScoreResult(
            score=reply.score,
            model=reply.model,
            model_version=reply.model_version,
            tokens=reply.tokens,
            timings={"decode_s": t.decode_s, "pack_s": t.pack_s, "queue_s": t.queue_s, "infer_s": t.infer_s},
            distribution=tuple(reply.distribution) or None,
            id=reply.id,
        )

    def score(
        self, image: ImageInput, *, model: str | None = None, max_native_tokens: int | None = None
    ) -> ScoreResult:
        request = self._pb.ScoreRequest(image=_read(image), model=model or "")
        if max_native_tokens is not None:
            request.max_native_tokens = max_native_tokens
        try:
            reply = self.stub.Score(request, timeout=self.timeout_s)  # retried by gRPC itself
        except self._grpc.RpcError as exc:
            raise _grpc_error(exc) from None
        result = self._from_reply(reply)
        if isinstance(result, MusiqError):
            raise result
        return result

    def score_many(
        self, images: Iterable[ImageInput], *, progress: bool = True, model: str | None = None
    ) -> list[ScoreResult | MusiqError]:
        """Streams every image; replies come back as they finish and are put back in input order."""
        images = list(images)
        bar = _progress(len(images), progress)
        requests = (
            self._pb.ScoreRequest(id=str(i), image=_read(img), model=model or "")
            for i, img in enumerate(images)
        )
        out: list[ScoreResult | MusiqError | None] = [None] * len(images)
        try:
            for reply in self.stub.ScoreStream(requests, timeout=self.timeout_s * max(1, len(images))):
                out[int(reply.id)] = self._from_reply(reply)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [
            r if r is not None else MusiqError(500, "missing_reply", "no reply for this item") for r in out
        ]


def _grpc_error(exc: Any) -> MusiqError:
    """The refusal as REST reports it: the server's `code: message`, and the HTTP status
    (RESOURCE_EXHAUSTED is 429 with a Retry-After, or 413 when its pushback says no retry helps)."""
    name, details = exc.code().name, exc.details() or ""
    code, sep, message = details.partition(": ")
    if not (sep and code.isidentifier() and code.islower()):  # not one of the server's refusals
        code, message = name.lower(), details
    pushback = next((v for k, v in exc.trailing_metadata() or () if k == "grpc-retry-pushback-ms"), None)
    status, retry_after_s = _HTTP_OF.get(name, 500), None
    if pushback is not None and pushback.lstrip("-").isdigit():
        if int(pushback) < 0:
            status = 413 if status == 429 else status
        else:
            retry_after_s = int(pushback) / 1000
    return MusiqError(status, code, message, retry_after_s)


_HTTP_OF: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
