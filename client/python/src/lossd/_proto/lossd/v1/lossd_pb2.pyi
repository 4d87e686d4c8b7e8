from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]

class Reduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCTION_UNSPECIFIED: _ClassVar[Reduction]
    REDUCTION_NONE: _ClassVar[Reduction]
    REDUCTION_MEAN: _ClassVar[Reduction]
    REDUCTION_SUM: _ClassVar[Reduction]
    REDUCTION_PER_SAMPLE_MEAN: _ClassVar[Reduction]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_DEFAULT: _ClassVar[Precision]
    PRECISION_CORRECTLY_ROUNDED: _ClassVar[Precision]

class Device(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_AUTO: _ClassVar[Device]
    DEVICE_CPU: _ClassVar[Device]
    DEVICE_CUDA: _ClassVar[Device]

class RegionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REGION_KIND_UNSPECIFIED: _ClassVar[RegionKind]
    REGION_KIND_SYSTEM: _ClassVar[RegionKind]
    REGION_KIND_CUDA_IPC: _ClassVar[RegionKind]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
REDUCTION_UNSPECIFIED: Reduction
REDUCTION_NONE: Reduction
REDUCTION_MEAN: Reduction
REDUCTION_SUM: Reduction
REDUCTION_PER_SAMPLE_MEAN: Reduction
PRECISION_DEFAULT: Precision
PRECISION_CORRECTLY_ROUNDED: Precision
DEVICE_AUTO: Device
DEVICE_CPU: Device
DEVICE_CUDA: Device
REGION_KIND_UNSPECIFIED: RegionKind
REGION_KIND_SYSTEM: RegionKind
REGION_KIND_CUDA_IPC: RegionKind

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "ref")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    ref: TensorReference
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., ref: _Optional[_Union[TensorReference, _Mapping]] = ...) -> None: ...

class TensorReference(_message.Message):
    __slots__ = ("region", "offset", "byte_size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    byte_size: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class OutputPlacement(_message.Message):
    __slots__ = ("loss", "grad_logits", "grad_targets")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_LOGITS_FIELD_NUMBER: _ClassVar[int]
    GRAD_TARGETS_FIELD_NUMBER: _ClassVar[int]
    loss: TensorReference
    grad_logits: TensorReference
    grad_targets: TensorReference
    def __init__(self, loss: _Optional[_Union[TensorReference, _Mapping]] = ..., grad_logits: _Optional[_Union[TensorReference, _Mapping]] = ..., grad_targets: _Optional[_Union[TensorReference, _Mapping]] = ...) -> None: ...

class BceWithLogits(_message.Message):
    __slots__ = ("pos_weight", "ignore_index", "normalize", "label_smoothing")
    POS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    IGNORE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    pos_weight: Tensor
    ignore_index: int
    normalize: bool
    label_smoothing: float
    def __init__(self, pos_weight: _Optional[_Union[Tensor, _Mapping]] = ..., ignore_index: _Optional[int] = ..., normalize: bool = ..., label_smoothing: _Optional[float] = ...) -> None: ...

class SigmoidFocalLoss(_message.Message):
    __slots__ = ("alpha", "gamma")
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    alpha: float
    gamma: float
    def __init__(self, alpha: _Optional[float] = ..., gamma: _Optional[float] = ...) -> None: ...

class GradientRequest(_message.Message):
    __slots__ = ("logits", "targets")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    logits: bool
    targets: bool
    def __init__(self, logits: bool = ..., targets: bool = ...) -> None: ...

class WholeRequest(_message.Message):
    __slots__ = ("num_elements", "num_kept")
    NUM_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_KEPT_FIELD_NUMBER: _ClassVar[int]
    num_elements: int
    num_kept: int
    def __init__(self, num_elements: _Optional[int] = ..., num_kept: _Optional[int] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("request_id", "logits", "targets", "weight", "bce_with_logits", "sigmoid_focal_loss", "reduction", "gradients", "device", "reject_nan", "whole", "outputs", "accumulate_slice", "precision")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BCE_WITH_LOGITS_FIELD_NUMBER: _ClassVar[int]
    SIGMOID_FOCAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REJECT_NAN_FIELD_NUMBER: _ClassVar[int]
    WHOLE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATE_SLICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    logits: Tensor
    targets: Tensor
    weight: Tensor
    bce_with_logits: BceWithLogits
    sigmoid_focal_loss: SigmoidFocalLoss
    reduction: Reduction
    gradients: GradientRequest
    device: Device
    reject_nan: bool
    whole: WholeRequest
    outputs: OutputPlacement
    accumulate_slice: AccumulateSlice
    precision: Precision
    def __init__(self, request_id: _Optional[str] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., targets: _Optional[_Union[Tensor, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., bce_with_logits: _Optional[_Union[BceWithLogits, _Mapping]] = ..., sigmoid_focal_loss: _Optional[_Union[SigmoidFocalLoss, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., gradients: _Optional[_Union[GradientRequest, _Mapping]] = ..., device: _Optional[_Union[Device, str]] = ..., reject_nan: bool = ..., whole: _Optional[_Union[WholeRequest, _Mapping]] = ..., outputs: _Optional[_Union[OutputPlacement, _Mapping]] = ..., accumulate_slice: _Optional[_Union[AccumulateSlice, _Mapping]] = ..., precision: _Optional[_Union[Precision, str]] = ...) -> None: ...

class AccumulateSlice(_message.Message):
    __slots__ = ("element_offset",)
    ELEMENT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    element_offset: int
    def __init__(self, element_offset: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ns", "compute_ns", "total_ns", "received_unix_ns", "compute_start_unix_ns", "compute_end_unix_ns", "reply_unix_ns")
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_START_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_END_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    REPLY_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    queue_ns: int
    compute_ns: int
    total_ns: int
    received_unix_ns: int
    compute_start_unix_ns: int
    compute_end_unix_ns: int
    reply_unix_ns: int
    def __init__(self, queue_ns: _Optional[int] = ..., compute_ns: _Optional[int] = ..., total_ns: _Optional[int] = ..., received_unix_ns: _Optional[int] = ..., compute_start_unix_ns: _Optional[int] = ..., compute_end_unix_ns: _Optional[int] = ..., reply_unix_ns: _Optional[int] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("request_id", "loss", "grad_logits", "grad_targets", "device", "timing", "num_elements")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_LOGITS_FIELD_NUMBER: _ClassVar[int]
    GRAD_TARGETS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    NUM_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    loss: Tensor
    grad_logits: Tensor
    grad_targets: Tensor
    device: Device
    timing: Timing
    num_elements: int
    def __init__(self, request_id: _Optional[str] = ..., loss: _Optional[_Union[Tensor, _Mapping]] = ..., grad_logits: _Optional[_Union[Tensor, _Mapping]] = ..., grad_targets: _Optional[_Union[Tensor, _Mapping]] = ..., device: _Optional[_Union[Device, str]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., num_elements: _Optional[int] = ...) -> None: ...

class BatchError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EvaluateStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: EvaluateResponse
    error: BatchError
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[EvaluateResponse, _Mapping]] = ..., error: _Optional[_Union[BatchError, _Mapping]] = ...) -> None: ...

class AccumulateResponse(_message.Message):
    __slots__ = ("loss", "num_elements", "num_batches", "reduction", "device", "timing", "num_kept", "partial_state")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    NUM_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    NUM_KEPT_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_STATE_FIELD_NUMBER: _ClassVar[int]
    loss: float
    num_elements: int
    num_batches: int
    reduction: Reduction
    device: Device
    timing: Timing
    num_kept: int
    partial_state: bytes
    def __init__(self, loss: _Optional[float] = ..., num_elements: _Optional[int] = ..., num_batches: _Optional[int] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., device: _Optional[_Union[Device, str]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., num_kept: _Optional[int] = ..., partial_state: _Optional[bytes] = ...) -> None: ...

class MergePartialsRequest(_message.Message):
    __slots__ = ("request_id", "partial_states")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_STATES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    partial_states: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, request_id: _Optional[str] = ..., partial_states: _Optional[_Iterable[bytes]] = ...) -> None: ...

class GetCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("server_version", "losses", "dtypes", "devices", "reductions", "max_message_bytes", "max_elements", "cuda_device_name", "whole_requests", "shared_memory", "shared_memory_prefix", "partial_state_versions", "cuda_ipc", "cuda_device_uuid")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    REDUCTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    CUDA_DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    WHOLE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_STATE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    CUDA_DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    losses: _containers.RepeatedScalarFieldContainer[str]
    dtypes: _containers.RepeatedScalarFieldContainer[DType]
    devices: _containers.RepeatedScalarFieldContainer[Device]
    reductions: _containers.RepeatedScalarFieldContainer[Reduction]
    max_message_bytes: int
    max_elements: int
    cuda_device_name: str
    whole_requests: bool
    shared_memory: bool
    shared_memory_prefix: str
    partial_state_versions: _containers.RepeatedScalarFieldContainer[int]
    cuda_ipc: bool
    cuda_device_uuid: str
    def __init__(self, server_version: _Optional[str] = ..., losses: _Optional[_Iterable[str]] = ..., dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., devices: _Optional[_Iterable[_Union[Device, str]]] = ..., reductions: _Optional[_Iterable[_Union[Reduction, str]]] = ..., max_message_bytes: _Optional[int] = ..., max_elements: _Optional[int] = ..., cuda_device_name: _Optional[str] = ..., whole_requests: bool = ..., shared_memory: bool = ..., shared_memory_prefix: _Optional[str] = ..., partial_state_versions: _Optional[_Iterable[int]] = ..., cuda_ipc: bool = ..., cuda_device_uuid: _Optional[str] = ...) -> None: ...

class RegisterRegionRequest(_message.Message):
    __slots__ = ("name", "kind", "key", "offset", "byte_size", "lease_ms", "cuda_ipc_handle", "cuda_device_uuid")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    CUDA_DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: RegionKind
    key: str
    offset: int
    byte_size: int
    lease_ms: int
    cuda_ipc_handle: bytes
    cuda_device_uuid: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[RegionKind, str]] = ..., key: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ..., lease_ms: _Optional[int] = ..., cuda_ipc_handle: _Optional[bytes] = ..., cuda_device_uuid: _Optional[str] = ...) -> None: ...

class RegisterRegionResponse(_message.Message):
    __slots__ = ("region", "lease_ms")
    REGION_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    region: str
    lease_ms: int
    def __init__(self, region: _Optional[str] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("regions",)
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, regions: _Optional[_Iterable[str]] = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ("unknown", "lease_ms")
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    unknown: _containers.RepeatedScalarFieldContainer[str]
    lease_ms: int
    def __init__(self, unknown: _Optional[_Iterable[str]] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class UnregisterRegionRequest(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: str
    def __init__(self, region: _Optional[str] = ...) -> None: ...

class UnregisterRegionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRegionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RegionInfo(_message.Message):
    __slots__ = ("name", "kind", "key", "offset", "byte_size", "expires_unix_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: RegionKind
    key: str
    offset: int
    byte_size: int
    expires_unix_ms: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[RegionKind, str]] = ..., key: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ...) -> None: ...

class ListRegionsResponse(_message.Message):
    __slots__ = ("regions",)
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[RegionInfo]
    def __init__(self, regions: _Optional[_Iterable[_Union[RegionInfo, _Mapping]]] = ...) -> None: ...
