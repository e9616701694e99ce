from fedsilo.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SharePhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARE_PHASE_UNSPECIFIED: _ClassVar[SharePhase]
    SHARE_PHASE_ALL: _ClassVar[SharePhase]
    SHARE_PHASE_LORA_B: _ClassVar[SharePhase]
    SHARE_PHASE_LORA_A: _ClassVar[SharePhase]

class Aggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_UNSPECIFIED: _ClassVar[Aggregation]
    AGGREGATION_PLAIN: _ClassVar[Aggregation]
    AGGREGATION_HE: _ClassVar[Aggregation]

class PayloadEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYLOAD_ENCODING_UNSPECIFIED: _ClassVar[PayloadEncoding]
    PAYLOAD_ENCODING_RAW_TENSORS: _ClassVar[PayloadEncoding]
    PAYLOAD_ENCODING_HE_CIPHERTEXTS: _ClassVar[PayloadEncoding]

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_WAITING_FOR_SILOS: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_FINISHED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_WAIT: _ClassVar[TaskKind]
    TASK_KIND_TRAIN: _ClassVar[TaskKind]
    TASK_KIND_STOP: _ClassVar[TaskKind]

class AgentActivity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_ACTIVITY_UNSPECIFIED: _ClassVar[AgentActivity]
    AGENT_ACTIVITY_IDLE: _ClassVar[AgentActivity]
    AGENT_ACTIVITY_TRAINING: _ClassVar[AgentActivity]
    AGENT_ACTIVITY_UPLOADING: _ClassVar[AgentActivity]
    AGENT_ACTIVITY_EVALUATING: _ClassVar[AgentActivity]
SHARE_PHASE_UNSPECIFIED: SharePhase
SHARE_PHASE_ALL: SharePhase
SHARE_PHASE_LORA_B: SharePhase
SHARE_PHASE_LORA_A: SharePhase
AGGREGATION_UNSPECIFIED: Aggregation
AGGREGATION_PLAIN: Aggregation
AGGREGATION_HE: Aggregation
PAYLOAD_ENCODING_UNSPECIFIED: PayloadEncoding
PAYLOAD_ENCODING_RAW_TENSORS: PayloadEncoding
PAYLOAD_ENCODING_HE_CIPHERTEXTS: PayloadEncoding
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_WAITING_FOR_SILOS: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_FINISHED: RunState
RUN_STATE_FAILED: RunState
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_WAIT: TaskKind
TASK_KIND_TRAIN: TaskKind
TASK_KIND_STOP: TaskKind
AGENT_ACTIVITY_UNSPECIFIED: AgentActivity
AGENT_ACTIVITY_IDLE: AgentActivity
AGENT_ACTIVITY_TRAINING: AgentActivity
AGENT_ACTIVITY_UPLOADING: AgentActivity
AGENT_ACTIVITY_EVALUATING: AgentActivity

class PrivacyPlan(_message.Message):
    __slots__ = ("record_level", "sample_rate", "steps_per_round", "max_grad_norm", "noise_multiplier", "silo_level", "update_clip_norm", "update_noise_multiplier", "noise_shares", "delta", "resfim_every", "fisher_noise_multiplier", "fisher_clip_norm", "style_noise_multiplier", "style_clip_norm")
    RECORD_LEVEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SILO_LEVEL_FIELD_NUMBER: _ClassVar[int]
    UPDATE_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    NOISE_SHARES_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    RESFIM_EVERY_FIELD_NUMBER: _ClassVar[int]
    FISHER_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    FISHER_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    STYLE_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    STYLE_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    record_level: bool
    sample_rate: float
    steps_per_round: int
    max_grad_norm: float
    noise_multiplier: float
    silo_level: bool
    update_clip_norm: float
    update_noise_multiplier: float
    noise_shares: int
    delta: float
    resfim_every: int
    fisher_noise_multiplier: float
    fisher_clip_norm: float
    style_noise_multiplier: float
    style_clip_norm: float
    def __init__(self, record_level: _Optional[bool] = ..., sample_rate: _Optional[float] = ..., steps_per_round: _Optional[int] = ..., max_grad_norm: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., silo_level: _Optional[bool] = ..., update_clip_norm: _Optional[float] = ..., update_noise_multiplier: _Optional[float] = ..., noise_shares: _Optional[int] = ..., delta: _Optional[float] = ..., resfim_every: _Optional[int] = ..., fisher_noise_multiplier: _Optional[float] = ..., fisher_clip_norm: _Optional[float] = ..., style_noise_multiplier: _Optional[float] = ..., style_clip_norm: _Optional[float] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run_id", "total_rounds", "aggregation", "model_config_json", "training_config_json", "max_chunk_bytes", "key_holder", "he_parameters", "privacy", "method", "task", "method_tables_json")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TRAINING_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEY_HOLDER_FIELD_NUMBER: _ClassVar[int]
    HE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    METHOD_TABLES_JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    total_rounds: int
    aggregation: Aggregation
    model_config_json: str
    training_config_json: str
    max_chunk_bytes: int
    key_holder: str
    he_parameters: bytes
    privacy: PrivacyPlan
    method: str
    task: str
    method_tables_json: str
    def __init__(self, run_id: _Optional[str] = ..., total_rounds: _Optional[int] = ..., aggregation: _Optional[_Union[Aggregation, str]] = ..., model_config_json: _Optional[str] = ..., training_config_json: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ..., key_holder: _Optional[str] = ..., he_parameters: _Optional[bytes] = ..., privacy: _Optional[_Union[PrivacyPlan, _Mapping]] = ..., method: _Optional[str] = ..., task: _Optional[str] = ..., method_tables_json: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("model_fingerprint", "num_train_examples", "shared_tensors", "agent_version", "kem_announcement", "budget_statement")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SHARED_TENSORS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    KEM_ANNOUNCEMENT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_STATEMENT_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    num_train_examples: int
    shared_tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    agent_version: str
    kem_announcement: bytes
    budget_statement: bytes
    def __init__(self, model_fingerprint: _Optional[str] = ..., num_train_examples: _Optional[int] = ..., shared_tensors: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., agent_version: _Optional[str] = ..., kem_announcement: _Optional[bytes] = ..., budget_statement: _Optional[bytes] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("silo_name", "state", "last_closed_round")
    SILO_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_CLOSED_ROUND_FIELD_NUMBER: _ClassVar[int]
    silo_name: str
    state: RunState
    last_closed_round: int
    def __init__(self, silo_name: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., last_closed_round: _Optional[int] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("after_round", "wait_seconds")
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    after_round: int
    wait_seconds: int
    def __init__(self, after_round: _Optional[int] = ..., wait_seconds: _Optional[int] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("kind", "round", "base_round", "deadline_unix_ms", "last_closed_round", "state", "message", "weight_normalizer", "phase")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_ROUND_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_CLOSED_ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_NORMALIZER_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    kind: TaskKind
    round: int
    base_round: int
    deadline_unix_ms: int
    last_closed_round: int
    state: RunState
    message: str
    weight_normalizer: float
    phase: SharePhase
    def __init__(self, kind: _Optional[_Union[TaskKind, str]] = ..., round: _Optional[int] = ..., base_round: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., last_closed_round: _Optional[int] = ..., state: _Optional[_Union[RunState, str]] = ..., message: _Optional[str] = ..., weight_normalizer: _Optional[float] = ..., phase: _Optional[_Union[SharePhase, str]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "weight", "manifest", "encoding", "payload_bytes")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    round: int
    weight: float
    manifest: _tensor_pb2.PayloadManifest
    encoding: PayloadEncoding
    payload_bytes: int
    def __init__(self, round: _Optional[int] = ..., weight: _Optional[float] = ..., manifest: _Optional[_Union[_tensor_pb2.PayloadManifest, _Mapping]] = ..., encoding: _Optional[_Union[PayloadEncoding, str]] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: bytes
    trailer: _tensor_pb2.PayloadTrailer
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ..., trailer: _Optional[_Union[_tensor_pb2.PayloadTrailer, _Mapping]] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("round", "bytes_received", "uploads_in_round")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    UPLOADS_IN_ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    bytes_received: int
    uploads_in_round: int
    def __init__(self, round: _Optional[int] = ..., bytes_received: _Optional[int] = ..., uploads_in_round: _Optional[int] = ...) -> None: ...

class FetchAggregateRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class AggregateHeader(_message.Message):
    __slots__ = ("round", "num_contributors", "total_weight", "manifest", "encoding", "payload_bytes", "weight_normalizer", "failed")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_NORMALIZER_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_contributors: int
    total_weight: float
    manifest: _tensor_pb2.PayloadManifest
    encoding: PayloadEncoding
    payload_bytes: int
    weight_normalizer: float
    failed: str
    def __init__(self, round: _Optional[int] = ..., num_contributors: _Optional[int] = ..., total_weight: _Optional[float] = ..., manifest: _Optional[_Union[_tensor_pb2.PayloadManifest, _Mapping]] = ..., encoding: _Optional[_Union[PayloadEncoding, str]] = ..., payload_bytes: _Optional[int] = ..., weight_normalizer: _Optional[float] = ..., failed: _Optional[str] = ...) -> None: ...

class FetchAggregateResponse(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: AggregateHeader
    chunk: bytes
    trailer: _tensor_pb2.PayloadTrailer
    def __init__(self, header: _Optional[_Union[AggregateHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ..., trailer: _Optional[_Union[_tensor_pb2.PayloadTrailer, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("round", "activity")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    round: int
    activity: AgentActivity
    def __init__(self, round: _Optional[int] = ..., activity: _Optional[_Union[AgentActivity, str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("state", "open_round")
    STATE_FIELD_NUMBER: _ClassVar[int]
    OPEN_ROUND_FIELD_NUMBER: _ClassVar[int]
    state: RunState
    open_round: int
    def __init__(self, state: _Optional[_Union[RunState, str]] = ..., open_round: _Optional[int] = ...) -> None: ...

class Metric(_message.Message):
    __slots__ = ("name", "value", "num_examples")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    num_examples: int
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ..., num_examples: _Optional[int] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("round", "metrics")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    round: int
    metrics: _containers.RepeatedCompositeFieldContainer[Metric]
    def __init__(self, round: _Optional[int] = ..., metrics: _Optional[_Iterable[_Union[Metric, _Mapping]]] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...

class ListKeyRecipientsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeyRecipient(_message.Message):
    __slots__ = ("name", "kem_announcement")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEM_ANNOUNCEMENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    kem_announcement: bytes
    def __init__(self, name: _Optional[str] = ..., kem_announcement: _Optional[bytes] = ...) -> None: ...

class ListKeyRecipientsResponse(_message.Message):
    __slots__ = ("recipients",)
    RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    recipients: _containers.RepeatedCompositeFieldContainer[KeyRecipient]
    def __init__(self, recipients: _Optional[_Iterable[_Union[KeyRecipient, _Mapping]]] = ...) -> None: ...

class WrappedKeyEntry(_message.Message):
    __slots__ = ("recipient", "wrapped")
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_FIELD_NUMBER: _ClassVar[int]
    recipient: str
    wrapped: bytes
    def __init__(self, recipient: _Optional[str] = ..., wrapped: _Optional[bytes] = ...) -> None: ...

class PublishWrappedKeysRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[WrappedKeyEntry]
    def __init__(self, keys: _Optional[_Iterable[_Union[WrappedKeyEntry, _Mapping]]] = ...) -> None: ...

class PublishWrappedKeysResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...

class GetWrappedKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetWrappedKeyResponse(_message.Message):
    __slots__ = ("ready", "wrapped")
    READY_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    wrapped: bytes
    def __init__(self, ready: _Optional[bool] = ..., wrapped: _Optional[bytes] = ...) -> None: ...

class SubmitLedgerEntriesRequest(_message.Message):
    __slots__ = ("entries_json",)
    ENTRIES_JSON_FIELD_NUMBER: _ClassVar[int]
    entries_json: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entries_json: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitLedgerEntriesResponse(_message.Message):
    __slots__ = ("mirrored_through_seq",)
    MIRRORED_THROUGH_SEQ_FIELD_NUMBER: _ClassVar[int]
    mirrored_through_seq: int
    def __init__(self, mirrored_through_seq: _Optional[int] = ...) -> None: ...

class DeclineRoundRequest(_message.Message):
    __slots__ = ("round", "reason", "final")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    round: int
    reason: str
    final: bool
    def __init__(self, round: _Optional[int] = ..., reason: _Optional[str] = ..., final: _Optional[bool] = ...) -> None: ...

class DeclineRoundResponse(_message.Message):
    __slots__ = ("state", "silos_training")
    STATE_FIELD_NUMBER: _ClassVar[int]
    SILOS_TRAINING_FIELD_NUMBER: _ClassVar[int]
    state: RunState
    silos_training: int
    def __init__(self, state: _Optional[_Union[RunState, str]] = ..., silos_training: _Optional[int] = ...) -> None: ...

class PublishSealedRequest(_message.Message):
    __slots__ = ("purpose", "blob")
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    purpose: str
    blob: bytes
    def __init__(self, purpose: _Optional[str] = ..., blob: _Optional[bytes] = ...) -> None: ...

class PublishSealedResponse(_message.Message):
    __slots__ = ("published",)
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    published: int
    def __init__(self, published: _Optional[int] = ...) -> None: ...

class GetSealedRequest(_message.Message):
    __slots__ = ("purpose", "after_silo")
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    AFTER_SILO_FIELD_NUMBER: _ClassVar[int]
    purpose: str
    after_silo: str
    def __init__(self, purpose: _Optional[str] = ..., after_silo: _Optional[str] = ...) -> None: ...

class SealedEntry(_message.Message):
    __slots__ = ("silo", "blob")
    SILO_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    silo: str
    blob: bytes
    def __init__(self, silo: _Optional[str] = ..., blob: _Optional[bytes] = ...) -> None: ...

class GetSealedResponse(_message.Message):
    __slots__ = ("entries", "silos_joined", "more")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SILOS_JOINED_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[SealedEntry]
    silos_joined: int
    more: bool
    def __init__(self, entries: _Optional[_Iterable[_Union[SealedEntry, _Mapping]]] = ..., silos_joined: _Optional[int] = ..., more: _Optional[bool] = ...) -> None: ...

class ReportAggregateFailureRequest(_message.Message):
    __slots__ = ("round", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    reason: str
    def __init__(self, round: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportAggregateFailureResponse(_message.Message):
    __slots__ = ("round_failed", "reports", "needed")
    ROUND_FAILED_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    NEEDED_FIELD_NUMBER: _ClassVar[int]
    round_failed: bool
    reports: int
    needed: int
    def __init__(self, round_failed: _Optional[bool] = ..., reports: _Optional[int] = ..., needed: _Optional[int] = ...) -> None: ...
