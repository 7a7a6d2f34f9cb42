"""All service settings in one object, from `MUSIQ_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.checkpoint import EMBEDDED_DEFAULT
from model.decode import DEFAULT_MAX_PIXELS
from service.batcher import BatcherConfig
from service.runtime import device_defaults

EMBEDDED_ONNX = EMBEDDED_DEFAULT.with_suffix(".onnx")


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MUSIQ_", env_file=None, extra="ignore")

    models: list[Path] = Field(
        default_factory=list, description="ONNX files to serve (default: the embedded model)"
    )
    default_model: str = Field(
        "", description="name of the model used when a request names none (default: the first)"
    )
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = Field(50051, description="gRPC port (0: any free port)")
    grpc_enabled: bool = True
    shutdown_grace_s: float = Field(30.0, description="how long running gRPC calls may finish on shutdown")
    # HTTP/2 keeps one connection per client for as long as it lives, so behind a Kubernetes Service a
    # client stays on the pod it first reached and replicas added later get none of its calls. A maximum
    # age makes the server send GOAWAY: the client reconnects (re-resolving DNS, so it finds new pods)
    # while its running calls finish on the old connection. 5 min (gRPC adds +-10 % jitter) spreads load
    # within minutes of a scale-up, and one reconnect per client every 5 min costs nothing measurable next
    # to one inference (~100 ms on CPU). The grace bounds how long calls may still run on a connection
    # after its GOAWAY; then the connection is cut (the calls fail UNAVAILABLE). A unary call is bounded
    # by request_timeout_s (30 s), but a ScoreStream (GrpcClient.score_many) lasts as long as its images
    # take and a connection's age counts from the connection, not the call: a 30 s grace would cut ranking
    # jobs midway. 10 min lets a stream of ~6,000 images end on a CPU pod (~10 images/s,
    # bench/results/PERFORMANCE.md), far more on a GPU. A connection carrying only unary calls closes as
    # soon as they end, whatever the grace (tests/test_grpc_spread.py), so a long grace does not slow
    # rebalancing.
    grpc_max_connection_age_s: float = Field(
        300.0, description="gRPC connections get GOAWAY after this long, so clients re-balance (0: never)"
    )
    grpc_max_connection_age_grace_s: float = Field(
        600.0, description="after that GOAWAY, how long running gRPC calls may finish before it is cut"
    )
    max_body_bytes: int = Field(32 * 2**20, description="largest accepted request body")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, description="largest accepted image (from its header)")
    request_timeout_s: float = Field(30.0, description="deadline for one image, queue wait included")
    max_batch_items: int = Field(64, description="images in one /v1/score:batch request")
    max_native_tokens: int = Field(512, description="server cap on native-resolution tokens (-1: none)")
    # Batching defaults differ by device (service.runtime.DeviceDefaults says why): null resolves to
    # the CPU or the GPU value once a model's session has its execution provider.
    max_batch_tokens: int | None = Field(
        None, ge=1, description="batch size x padded length per batch (null: 16384 on CPU, 65536 on GPU)"
    )
    max_batch_size: int | None = Field(
        None, ge=1, description="images in one inference batch (null: 4 on CPU, 64 on GPU)"
    )
    max_queue_delay_s: float | None = Field(
        None, ge=0, description="how long the batcher waits to fill a batch (null: 0.004 s CPU, 0.005 s GPU)"
    )
    always_wait_queue_delay: bool = Field(
        False, description="wait the queue delay even when no request is being decoded (none can join)"
    )
    max_queue_items: int = 512
    decode_threads: int = Field(
        2,
        ge=1,
        description="threads that decode and pack when decode_processes is 0; else render explanations",
    )
    # Worker processes do not share the GIL, and a decoder crash kills a worker, not the server: on 2
    # shared cores, 8 REST clients got 1.28-1.33x the images/s of one with threads and 1.34-1.56x with
    # 2 processes in the same runs; c1 is ~3 ms slower (bench/results/DATA_PLANE.md).
    # Set it to the cores the server may spend on decoding (a 16-core host: ~12, leaving the server
    # process its own). A worker holds a 64 MB slab (decode_slab_mb) and its own heap.
    decode_processes: int = Field(
        2, ge=0, description="worker processes that decode and pack (0: threads of the server process)"
    )
    decode_slab_mb: int = Field(
        64,
        ge=1,
        description="shared memory per decode process for its packed result (larger ones go through a pipe)",
    )
    intra_op_threads: int = 0
    split_encoder: bool = Field(
        True,
        description="on a CPU, run NAME.features.onnx + NAME.head.onnx when exported beside the model "
        "(musiq export --split): the patch encoder in cache-sized chunks, one core each",
    )
    encoder_chunk: int = Field(32, ge=1, le=4096, description="patch rows per call of the features half")
    spin_threads: bool = Field(
        False, description="ONNX Runtime threads busy-wait between operators (steals decode/pack cores)"
    )
    heap_keep_mb: int = Field(
        256,
        ge=0,
        le=2047,  # service.heap.MAX_KEEP_MB: glibc's mallopt takes a C int of bytes
        description="freed memory kept for the next request's arrays (0: glibc defaults; service/heap.py)",
    )
    pad_multiple: int | None = Field(
        None, ge=1, description="round padded lengths up to a multiple (null: 1 on CPU, 64 on GPU)"
    )
    io_binding: bool | None = Field(
        None, description="feed batches through IO binding from reused, pinned buffers (null: on GPU only)"
    )
    drop_padding_rows: bool = Field(
        True, description="compute only real patch rows (same score, fewer tokens; model.packing.compact)"
    )
    providers: list[str] = Field(default_factory=list)
    explain_concurrency: int = Field(1, description="attention rollouts (/v1/explain) computed at once")
    explain_max_waiting: int = Field(8, description="explanations allowed to wait; beyond, 429")
    explain_max_tokens: int = Field(1024, description="largest packed image an explanation accepts")
    explain_display_side: int = Field(512, description="longest side of a heatmap PNG, in pixels")

    # Reliability and security (tests/reliability/README.md, docs/security.md).
    max_in_progress: int = Field(
        256, description="requests decoding, queued or running at once; beyond it 429 before any decoding"
    )
    body_timeout_s: float = Field(30.0, description="longest time a client may take to send its body (408)")
    inference_timeout_s: float = Field(
        30.0, description="a batch running longer is a model fault: its requests get 503, readiness drops"
    )
    health_probe_interval_s: float = Field(
        1.0, description="while a model is unhealthy, how often a warm-up inference checks if it recovered"
    )
    max_form_fields: int = Field(8, description="non-file fields in one multipart body")
    max_form_field_bytes: int = Field(64 * 2**10, description="largest non-file multipart field")
    api_keys: list[str] = Field(
        default_factory=list, description="accepted API keys (JSON list); empty with no file: no auth"
    )
    api_keys_file: Path | None = Field(None, description="file of accepted API keys, one per line")
    grpc_tls_cert: Path | None = Field(None, description="PEM certificate chain: gRPC serves TLS")
    grpc_tls_key: Path | None = Field(None, description="PEM private key of grpc_tls_cert")
    grpc_tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle: gRPC requires client certificates it signed (mutual TLS)"
    )

    def model_paths(self) -> list[Path]:
        return list(self.models) or [EMBEDDED_ONNX]

    def batcher_config(self, provider: str = "CPUExecutionProvider") -> BatcherConfig:
        """The batcher's settings for a model whose session runs on `provider` (its first one):
        each batching setting left null takes that device's default."""
        d = device_defaults(provider)
        delay = d.max_queue_delay_s if self.max_queue_delay_s is None else self.max_queue_delay_s
        return BatcherConfig(
            max_batch_tokens=d.max_batch_tokens if self.max_batch_tokens is None else self.max_batch_tokens,
            max_batch_size=d.max_batch_size if self.max_batch_size is None else self.max_batch_size,
            max_queue_delay_s=delay,
            max_queue_items=self.max_queue_items,
            run_timeout_s=self.inference_timeout_s,
        )
