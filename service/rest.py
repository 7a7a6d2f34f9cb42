"""REST API (FastAPI): `POST /v1/score`, `POST /v1/score:batch`, `POST /v1/explain`, `GET /v1/models`,
`/healthz`, `/readyz`, `/metrics`, and the web page at `/` (`service/static/`).

Routes are module-level `APIRouter`s; what they need (the scoring core, its settings, the API keys)
comes through FastAPI dependencies from `app.state`, which `create_app` fills. REST knows nothing of
gRPC: `service/app.py`, the composition root, runs both over one core.

Every error has one JSON shape, `{"error": {"code", "message"}}`, and a 4xx status for anything
the client can fix (429 and 503 carry `Retry-After`); `service/errors.py` gives each code its status. Bodies are read up to the configured limit
and refused beyond it (413) without buffering the rest.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import importlib.metadata
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import ClientDisconnect

from service.core import ExplainResult, ScoreResult, ScoringCore
from service.errors import ScoringError
from service.metrics import ServiceMetrics
from service.security import ApiKeys, check_api_key
from service.settings import ServiceSettings


class Timings(BaseModel):
    decode_s: float
    pack_s: float
    queue_s: float
    infer_s: float


class ScoreResponse(BaseModel):
    score: float = Field(examples=[62.4])
    model: str = Field(examples=["musiq-clive-small"])
    model_version: str = Field(examples=["1"])
    tokens: int = Field(
        description="tokens packed for the image (all scales, padding rows included)", examples=[449]
    )
    timings: Timings
    distribution: list[float] | None = Field(
        None, description="10-bin heads only: the opinion-score distribution"
    )


class ScaleExplanationModel(BaseModel):
    scale_id: int
    longer_side: int | None = Field(description="the resized scale's longer side; null for the native scale")
    height: int = Field(description="the image height the model saw at this scale")
    width: int
    grid_h: int
    grid_w: int
    share: float = Field(description="this scale's part of the whole rollout (all scales sum to 1)")
    weights: list[list[float | None]] = Field(
        description="rollout weight of each patch, [grid_h][grid_w]; null where no token was packed"
    )
    heatmap_png: str = Field(description="base64 PNG: the weights drawn over the image")


class ExplainTimings(Timings):
    rollout_s: float = Field(description="the explanation graph's inference")
    render_s: float = Field(description="drawing the heatmaps")


class ExplainResponse(ScoreResponse):
    timings: ExplainTimings
    scales: list[ScaleExplanationModel] = Field(description="one per scale, in packing order")


class BatchItem(BaseModel):
    model_config = ConfigDict(strict=True)  # as the schema says: no "5" or false for a number

    id: str = Field(description="the client's id, echoed in the result", examples=["img-001"])
    image: str = Field(
        description="the image file, base64-encoded",
        json_schema_extra={"contentEncoding": "base64", "contentMediaType": "image/*"},
    )


class BatchRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    items: list[BatchItem]
    model: str | None = None
    max_native_tokens: int | None = Field(None, ge=0, strict=False)

    @field_validator("max_native_tokens", mode="before")
    @classmethod
    def json_integer(cls, value: Any) -> Any:
        """A JSON integer, 5.0 included (JSON Schema says so); not "5" nor false."""
        if isinstance(value, bool | str):
            raise ValueError("must be an integer")
        return value


class ItemError(BaseModel):
    code: str
    message: str


class BatchResult(BaseModel):
    id: str
    score: float | None = None
    model: str | None = None
    model_version: str | None = None
    tokens: int | None = None
    distribution: list[float] | None = None
    error: ItemError | None = None


class BatchResponse(BaseModel):
    results: list[BatchResult] = Field(description="one per item, in request order")


class ErrorDetail(BaseModel):
    code: str = Field(description="stable and machine-readable", examples=["unsupported_media_type"])
    message: str = Field(description="what went wrong, for a person")


class ErrorResponse(BaseModel):
    """The one shape of every error answer (`error()` below)."""

    error: ErrorDetail


class ReadyResponse(BaseModel):
    status: str = Field(examples=["ready"])
    models: list[str] = Field(examples=[["musiq-clive-small"]])


def package_version() -> str:
    try:
        return importlib.metadata.version("musiq-service")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
}
STATUS_TEXT = {
    400: "a bad request (parameter out of range, empty body, truncated or corrupt image, bad multipart)",
    401: "no valid API key (only where MUSIQ_API_KEYS / MUSIQ_API_KEYS_FILE configure keys)",
    404: "unknown model",
    408: "the body did not arrive within MUSIQ_BODY_TIMEOUT_S",
    413: "body, image or token count too large",
    415: "a Content-Type not accepted, or bytes in no recognised image format",
    429: "overloaded or queue full; see Retry-After",
    503: "not ready, shutting down, or the model failed; see Retry-After",
    504: "the deadline passed before the score",
}


def error_responses(*statuses: int, texts: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, each with the error schema; `texts` replace
    the default descriptions."""
    return {
        status: {
            "model": ErrorResponse,
            "description": (texts or {}).get(status, STATUS_TEXT[status]),
            **({"headers": RETRY_AFTER} if status in (429, 503) else {}),
        }
        for status in statuses
    }


BINARY = {"type": "string", "format": "binary"}
# The routes read the body themselves (bounded, see `read_body`), so FastAPI cannot infer it:
# declared here, so that /docs can send an image and a generated client can call the API.
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "the image file as the raw body, or as multipart field `image`",
        "content": {
            "image/*": {"schema": BINARY},
            "application/octet-stream": {"schema": BINARY},
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["image"], "properties": {"image": BINARY}},
                "encoding": {"image": {"contentType": "image/*"}},
            },
        },
    }
}


# maxItems (the configured limit) is added by `openapi_document`.
BATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/BatchRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {"images": {"type": "array", "items": BINARY, "minItems": 1}},
                    "description": "one image file per part, under any field name; its file name is "
                    "the id (a part without a file name is a form field, not an image)",
                },
            },
        },
    }
}


def error(status: int, code: str, message: str, retry_after_s: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, up to `limit` bytes, within the configured body timeout (a slow client gets 408)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ScoringError("body_too_large", f"request body of {declared} bytes exceeds the limit of {limit}")
    timeout_s = request.app.state.core.settings.body_timeout_s
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ScoringError("body_too_large", f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise ScoringError(
            "body_timeout",
            f"the request body was not received within {timeout_s:g} s ({size} bytes came)",
        ) from None
    except ClientDisconnect:
        # The client left mid-upload: nobody reads the answer, but uncaught this would be logged as
        # "Exception in ASGI application" and counted as a 500. It is counted as client_closed (499).
        raise ScoringError(
            "client_closed", f"the client closed the connection during the upload ({size} bytes came)"
        ) from None
    return b"".join(chunks)


async def parse_form(request: Request, body: bytes, max_files: int) -> Any:
    """Multipart parsing with bounded parts and field sizes (from the settings), after `read_body`."""
    settings = request.app.state.core.settings
    boundary = request.headers.get("content-type", "").partition("boundary=")[2].split(";")[0].strip('" ')
    if boundary and f"--{boundary}--".encode() not in body:
        # The parser would silently drop an unterminated last part: say what is wrong instead.
        raise ScoringError("bad_multipart", "multipart body does not end with its closing boundary")
    try:
        return await Request(request.scope, receive=_receive_from(body)).form(
            max_files=max_files,
            max_fields=settings.max_form_fields + max_files,
            max_part_size=settings.max_form_field_bytes,
        )
    except Exception as exc:  # malformed multipart, too many parts, a field too large
        raise ScoringError(
            "bad_multipart", f"malformed multipart body ({type(exc).__name__}: {exc})"
        ) from exc


async def image_bytes(request: Request, limit: int) -> bytes:
    """The image from a raw `image/*` / octet-stream body, or from multipart field `image`."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype.startswith("multipart/form-data"):
        body = await read_body(request, limit)  # bounded before the parser sees it
        form = await parse_form(request, body, max_files=1)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ScoringError("missing_image", "multipart body has no file field named 'image'")
        data: bytes = await upload.read()
        return data
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return await read_body(request, limit)
    raise ScoringError(
        "unsupported_media_type",
        f"Content-Type {ctype or '(none)'} is not accepted: send the image as image/*, "
        "application/octet-stream or multipart/form-data field 'image'",
    )


def _receive_from(body: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


T = TypeVar("T")
STATIC = Path(__file__).parent / "static"


async def unless_disconnected(request: Request, work: Awaitable[T], poll_s: float = 0.05) -> T:
    """Runs `work`, cancelling it if the client goes away: its queued image then costs nothing."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ScoringError("client_closed", "the client closed the connection")
    finally:
        if not task.done():
            task.cancel()


def to_response(result: ScoreResult) -> ScoreResponse:
    return ScoreResponse(
        score=result.score,
        model=result.model,
        model_version=result.model_version,
        tokens=result.tokens,
        timings=Timings(
            **{k: result.timings.get(k, 0.0) for k in ("decode_s", "pack_s", "queue_s", "infer_s")}
        ),
        distribution=list(result.distribution) if result.distribution is not None else None,
    )


def to_explain_response(explained: ExplainResult) -> ExplainResponse:
    scales = [
        ScaleExplanationModel(
            scale_id=s.scale_id,
            longer_side=s.longer_side,
            height=s.height,
            width=s.width,
            grid_h=s.grid_h,
            grid_w=s.grid_w,
            share=s.share,
            weights=[[None if math.isnan(v) else v for v in row] for row in s.weights.tolist()],
            heatmap_png=base64.b64encode(s.heatmap_png).decode("ascii"),
        )
        for s in explained.scales
    ]
    base = to_response(explained.result).model_dump()
    t = explained.result.timings
    base["timings"] = ExplainTimings(**base["timings"], rollout_s=t["rollout_s"], render_s=t["render_s"])
    return ExplainResponse(**base, scales=scales)


class RequestMetrics:
    """Counts and times every HTTP request by route template and final status code.

    Pure ASGI rather than `BaseHTTPMiddleware`: that one hides the client's disconnect from the
    handlers, and abandoned requests must be noticed to drop their queued images.
    """

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "other")  # the template: bounded cardinality
            self.metrics.requests.labels("http", route, str(status[0])).inc()
            self.metrics.request_seconds.labels("http", route).observe(time.perf_counter() - start)


# --- dependencies: what a route needs, read from the app the composition root built -------------


def core_of(app: FastAPI) -> ScoringCore:
    core: ScoringCore = app.state.core
    return core


# The dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency
# in a worker thread, a hop that cost 0.2-1.1 ms of server CPU per request (bench/data_plane.py);
# these only read attributes, so they run on the event loop.


async def get_core(request: Request) -> ScoringCore:
    return core_of(request.app)


async def get_settings(request: Request) -> ServiceSettings:
    return core_of(request.app).settings


Core = Annotated[ScoringCore, Depends(get_core)]
Settings = Annotated[ServiceSettings, Depends(get_settings)]


async def api_key(request: Request) -> None:
    """App-wide: runs before the body is read, so a refused client sends none."""
    check_api_key(request.app.state.api_keys, request)


@dataclass(frozen=True)
class ScoreParams:
    model: str | None
    max_native_tokens: int | None


async def score_params(
    settings: Settings,
    model: Annotated[str | None, Query(description="model name (default: the server's default)")] = None,
    max_native_tokens: Annotated[
        int | None,
        Query(ge=0, description="cap on native-resolution tokens (a model's own cap may be lower: 400)"),
    ] = None,
) -> ScoreParams:
    """The query of /v1/score and /v1/explain; the configured cap is the schema's `maximum`
    (`openapi_document`), checked here as FastAPI would."""
    cap = settings.max_native_tokens
    if max_native_tokens is not None and 0 <= cap < max_native_tokens:
        raise ScoringError(
            "bad_request", f"query.max_native_tokens: Input should be less than or equal to {cap}"
        )
    return ScoreParams(model, max_native_tokens)


Params = Annotated[ScoreParams, Depends(score_params)]


# --- error answers -------------------------------------------------------------------------------


async def scoring_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ScoringError)
    core_of(request.app).metrics.rejected.labels(exc.code).inc()
    return error(exc.http_status, exc.code, exc.message, exc.retry_after_s)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    core_of(request.app).metrics.rejected.labels("bad_request").inc()
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return error(400, "bad_request", f"{where}: {first.get('msg', 'invalid request')}")


# --- routes --------------------------------------------------------------------------------------

# What scoring one image can answer besides 200 (core, body reading, media types, API keys).
SCORING_ERRORS = (400, 401, 404, 408, 413, 415, 429, 503, 504)

scoring = APIRouter(prefix="/v1")


@scoring.post(
    "/score",
    response_model=ScoreResponse,
    summary="Score one image",
    description="Send the image as the raw body (Content-Type image/* or application/octet-stream) "
    "or as multipart field `image`.",
    responses=error_responses(*SCORING_ERRORS),
    openapi_extra=IMAGE_BODY,
)
async def score(request: Request, core: Core, params: Params) -> ScoreResponse:
    data = await image_bytes(request, core.settings.max_body_bytes)
    work = core.score(data, model=params.model, max_native_tokens=params.max_native_tokens)
    return to_response(await unless_disconnected(request, work))


@scoring.post(
    "/explain",
    response_model=ExplainResponse,
    summary="Score one image and show where the model looked",
    description="Same body forms as /v1/score. Adds, for each scale, the CLS attention rollout on "
    "that scale's patch grid and a PNG heatmap of it over the image. Needs the model's explanation "
    "graph (NAME.rollout.onnx beside NAME.onnx); bounded apart from scoring (MUSIQ_EXPLAIN_*).",
    responses=error_responses(
        *SCORING_ERRORS,
        texts={
            404: "unknown model, or the model has no explanation graph",
            429: "overloaded, or too many explanations waiting; see Retry-After",
        },
    ),
    openapi_extra=IMAGE_BODY,
)
async def explain(request: Request, core: Core, params: Params) -> ExplainResponse:
    data = await image_bytes(request, core.settings.max_body_bytes)
    work = core.explain(data, model=params.model, max_native_tokens=params.max_native_tokens)
    return to_explain_response(await unless_disconnected(request, work))


async def batch_items(
    request: Request, core: ScoringCore
) -> tuple[list[tuple[str, bytes | ScoringError]], Any]:
    """The items of a batch request (id, bytes or the item's own error), and the JSON body's
    parameters (None for multipart)."""
    settings = core.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, settings.max_body_bytes)
    items: list[tuple[str, bytes | ScoringError]] = []
    if ctype == "application/json":
        try:
            parsed = BatchRequest.model_validate_json(body)
        except ValidationError as exc:  # described without echoing the input back
            first = exc.errors(include_input=False, include_url=False)[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            raise ScoringError("bad_request", f"invalid batch JSON: {where}: {first['msg']}") from exc
        for it in parsed.items:
            try:
                items.append((it.id, base64.b64decode(it.image, validate=True)))
            except (binascii.Error, ValueError):
                items.append((it.id, ScoringError("bad_base64", "image is not valid base64")))
        return items, parsed
    if ctype == "multipart/form-data":
        form = await parse_form(request, body, max_files=settings.max_batch_items)
        for key, value in form.multi_items():
            if not isinstance(value, str):
                items.append((value.filename or key, await value.read()))
        return items, None
    raise ScoringError("unsupported_media_type", "send application/json or multipart/form-data")


@scoring.post(
    "/score:batch",
    response_model=BatchResponse,
    summary="Score many images",
    description="JSON `{items: [{id, image: base64}], model?, max_native_tokens?}`, or multipart with "
    "one file per image (the file name is the id). Results come in request order; a bad item gets its "
    "own error and does not fail the others.",
    responses=error_responses(
        400,
        401,
        404,
        408,
        413,
        415,
        texts={
            400: "bad JSON, an empty batch, bad multipart, a parameter out of range",
            413: "body too large, or too many items",
            415: "neither application/json nor multipart/form-data",
        },
    ),
    openapi_extra=BATCH_BODY,
)
async def score_batch(
    request: Request,
    core: Core,
    model: Annotated[str | None, Query(description="model name (multipart requests)")] = None,
    max_native_tokens: Annotated[int | None, Query(ge=0)] = None,
) -> BatchResponse:
    items, parsed = await batch_items(request, core)
    if parsed is not None:
        model = parsed.model or model
        if parsed.max_native_tokens is not None:
            max_native_tokens = parsed.max_native_tokens
    core.check_batch(len(items))
    core.model(model)  # an unknown model fails the whole request (404), not every item

    async def one(data: bytes | ScoringError) -> ScoreResult:
        if isinstance(data, ScoringError):
            raise data
        return await core.score(data, model=model, max_native_tokens=max_native_tokens)

    outcomes = await asyncio.gather(*(one(data) for _, data in items), return_exceptions=True)
    results = []
    for (item_id, _), outcome in zip(items, outcomes, strict=True):
        if isinstance(outcome, ScoringError):
            core.metrics.rejected.labels(outcome.code).inc()
            results.append(
                BatchResult(id=item_id, error=ItemError(code=outcome.code, message=outcome.message))
            )
        elif isinstance(outcome, BaseException):
            results.append(
                BatchResult(id=item_id, error=ItemError(code="internal", message=type(outcome).__name__))
            )
        else:
            r = to_response(outcome)
            results.append(
                BatchResult(
                    id=item_id,
                    score=r.score,
                    model=r.model,
                    model_version=r.model_version,
                    tokens=r.tokens,
                    distribution=r.distribution,
                )
            )
    return BatchResponse(results=results)


@scoring.get("/models", summary="Loaded models and their metadata", responses=error_responses(401))
async def models(core: Core) -> dict[str, Any]:
    return {
        "default": core.default,
        "models": [
            {
                "name": s.runtime.name,
                "path": str(s.runtime.path),
                "providers": s.runtime.providers,
                "metadata": dict(vars(s.runtime.metadata)),
            }
            for s in core.models.values()
        ],
    }


operations = APIRouter()


@operations.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def prometheus(core: Core) -> Response:
    return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@operations.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@operations.get(
    "/readyz",
    summary="Readiness: every model loaded and warmed up",
    responses={
        200: {"model": ReadyResponse},
        **error_responses(503, texts={503: "not ready; see Retry-After"}),
    },
)
async def readyz(core: Core) -> JSONResponse:
    if core.serving:
        return JSONResponse({"status": "ready", "models": sorted(core.models)})
    return error(503, "not_ready", core.not_serving_reason(), retry_after_s=1)


@operations.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The web page: pick or drop images, see scores, heatmaps and a ranking (no CDN, no build)."""
    return FileResponse(STATIC / "index.html")


# --- the app -------------------------------------------------------------------------------------

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


@asynccontextmanager
async def core_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """REST alone: the core starts and stops with the app (`service/app.py` adds gRPC)."""
    core = core_of(app)
    await core.start()
    try:
        yield
    finally:
        await core.stop()


def create_app(
    settings: ServiceSettings | None = None,
    *,
    core: ScoringCore | None = None,
    lifespan: Lifespan | None = None,
) -> FastAPI:
    """The REST app over `core` (default: a new one over `settings`). `lifespan` runs around serving
    (default: start and stop the core); the composition root (`service/app.py`) passes one that also
    runs gRPC. Routes read the core, settings and API keys from `app.state` through dependencies."""
    if core is None:
        core = ScoringCore(settings or ServiceSettings())
    settings = core.settings
    api_keys = ApiKeys.from_settings(settings)
    app = FastAPI(
        title="MUSIQ image quality",
        version=package_version(),
        description="Multi-scale image quality transformer (Ke et al., ICCV 2021), scored at native resolution.",
        lifespan=lifespan or core_lifespan,
        dependencies=[Depends(api_key)],
    )
    app.state.core = core
    app.state.api_keys = api_keys
    app.add_exception_handler(ScoringError, scoring_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(scoring)
    app.include_router(operations)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(RequestMetrics, metrics=core.metrics)

    def openapi() -> dict[str, Any]:
        return app.openapi_schema or openapi_document(app, settings, api_keys)

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema
    return app


def openapi_document(app: FastAPI, settings: ServiceSettings, api_keys: ApiKeys) -> dict[str, Any]:
    """FastAPI's document, completed with what it cannot see: the configured limits (batch items,
    native-token cap), the batch body's models, no 422 (request validation errors are answered 400
    here), and the API key schemes where keys are configured."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    batch = BatchRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(batch.pop("$defs", {}))
    batch["properties"]["items"].update(minItems=1, maxItems=settings.max_batch_items)
    schemas["BatchRequest"] = batch
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    multipart = doc["paths"]["/v1/score:batch"]["post"]["requestBody"]["content"]["multipart/form-data"]
    multipart["schema"]["properties"]["images"]["maxItems"] = settings.max_batch_items
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            operation["responses"].pop("422", None)
            if api_keys.enabled and path.startswith("/v1/"):
                operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
            if path in ("/v1/score", "/v1/explain") and settings.max_native_tokens >= 0:
                for parameter in operation.get("parameters", ()):
                    if parameter["name"] == "max_native_tokens":
                        parameter["schema"]["anyOf"][0]["maximum"] = settings.max_native_tokens
    if api_keys.enabled:
        doc["components"]["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "Bearer": {"type": "http", "scheme": "bearer"},
        }
    app.openapi_schema = doc
    return doc
