"""All service settings in one object, from `MUSIQ_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.checkpoint import EMBEDDED_DEFAULT
from model.decode import DEFAULT_MAX_PIXELS
from service.batcher import BatcherConfig

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
    max_body_bytes: int = Field(32 * 2**20, description="largest accepted request body")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, description="largest accepted image (from its header)")
    request_timeout_s: float = Field(30.0, description="deadline for one image, queue wait included")
    max_batch_items: int = Field(64, description="images in one /v1/score:batch request")
    max_native_tokens: int = Field(512, description="server cap on native-resolution tokens (-1: none)")
    max_batch_tokens: int = 16384
    max_batch_size: int = Field(
        4, description="images in one inference batch (CPU: more only adds memory; GPU: raise it, e.g. 32)"
    )
    max_queue_delay_s: float = 0.004
    always_wait_queue_delay: bool = Field(
        False, description="wait the queue delay even when no request is being decoded (none can join)"
    )
    max_queue_items: int = 512
    decode_threads: int = 2
    intra_op_threads: int = 0
    spin_threads: bool = Field(
        False, description="ONNX Runtime threads busy-wait between operators (steals decode/pack cores)"
    )
    heap_keep_mb: int = Field(
        256,
        description="freed memory kept for the next request's arrays (0: glibc defaults; service/heap.py)",
    )
    pad_multiple: int = 1
    drop_padding_rows: bool = Field(
        True, description="compute only real patch rows (same score, fewer tokens; model.packing.compact)"
    )
    providers: list[str] = Field(default_factory=list)
    explain_concurrency: int = Field(1, description="attention rollouts (/v1/explain) computed at once")
    explain_max_waiting: int = Field(8, description="explanations allowed to wait; beyond, 429")
    explain_max_tokens: int = Field(1024, description="largest packed image an explanation accepts")
    explain_display_side: int = Field(512, description="longest side of a heatmap PNG, in pixels")

    # Reliability and security (tests/reliability/README.md, README "Security").
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

    def batcher_config(self) -> BatcherConfig:
        return BatcherConfig(
            max_batch_tokens=self.max_batch_tokens,
            max_batch_size=self.max_batch_size,
            max_queue_delay_s=self.max_queue_delay_s,
            max_queue_items=self.max_queue_items,
            run_timeout_s=self.inference_timeout_s,
        )
