from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("id", "image", "model", "max_native_tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_NATIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: bytes
    model: str
    max_native_tokens: int
    def __init__(self, id: _Optional[str] = ..., image: _Optional[bytes] = ..., model: _Optional[str] = ..., max_native_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_s", "pack_s", "queue_s", "infer_s")
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    PACK_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    INFER_S_FIELD_NUMBER: _ClassVar[int]
    decode_s: float
    pack_s: float
    queue_s: float
    infer_s: float
    def __init__(self, decode_s: _Optional[float] = ..., pack_s: _Optional[float] = ..., queue_s: _Optional[float] = ..., infer_s: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ScoreReply(_message.Message):
    __slots__ = ("id", "score", "model", "model_version", "tokens", "timings", "distribution", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    model: str
    model_version: str
    tokens: int
    timings: Timings
    distribution: _containers.RepeatedScalarFieldContainer[float]
    error: Error
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., tokens: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., distribution: _Optional[_Iterable[float]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ScoreBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreRequest, _Mapping]]] = ...) -> None: ...

class ScoreBatchReply(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreReply]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreReply, _Mapping]]] = ...) -> None: ...

class ScaleExplanation(_message.Message):
    __slots__ = ("scale_id", "longer_side", "height", "width", "grid_h", "grid_w", "weights", "share", "heatmap_png")
    SCALE_ID_FIELD_NUMBER: _ClassVar[int]
    LONGER_SIDE_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    GRID_H_FIELD_NUMBER: _ClassVar[int]
    GRID_W_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    scale_id: int
    longer_side: int
    height: int
    width: int
    grid_h: int
    grid_w: int
    weights: _containers.RepeatedScalarFieldContainer[float]
    share: float
    heatmap_png: bytes
    def __init__(self, scale_id: _Optional[int] = ..., longer_side: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., grid_h: _Optional[int] = ..., grid_w: _Optional[int] = ..., weights: _Optional[_Iterable[float]] = ..., share: _Optional[float] = ..., heatmap_png: _Optional[bytes] = ...) -> None: ...

class ExplainReply(_message.Message):
    __slots__ = ("score", "scales")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    score: ScoreReply
    scales: _containers.RepeatedCompositeFieldContainer[ScaleExplanation]
    def __init__(self, score: _Optional[_Union[ScoreReply, _Mapping]] = ..., scales: _Optional[_Iterable[_Union[ScaleExplanation, _Mapping]]] = ...) -> None: ...
