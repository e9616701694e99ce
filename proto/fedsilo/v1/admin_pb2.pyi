from fedsilo.v1 import federation_pb2 as _federation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Neighbouring(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NEIGHBOURING_UNSPECIFIED: _ClassVar[Neighbouring]
    NEIGHBOURING_RECORD: _ClassVar[Neighbouring]
    NEIGHBOURING_SILO: _ClassVar[Neighbouring]

class Accountant(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCOUNTANT_UNSPECIFIED: _ClassVar[Accountant]
    ACCOUNTANT_RDP: _ClassVar[Accountant]
    ACCOUNTANT_PLD: _ClassVar[Accountant]
NEIGHBOURING_UNSPECIFIED: Neighbouring
NEIGHBOURING_RECORD: Neighbouring
NEIGHBOURING_SILO: Neighbouring
ACCOUNTANT_UNSPECIFIED: Accountant
ACCOUNTANT_RDP: Accountant
ACCOUNTANT_PLD: Accountant

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SiloStatus(_message.Message):
    __slots__ = ("name", "joined", "last_seen_unix_ms", "rounds_contributed", "num_train_examples", "retired_from_round", "retired_reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_CONTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    RETIRED_FROM_ROUND_FIELD_NUMBER: _ClassVar[int]
    RETIRED_REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    joined: bool
    last_seen_unix_ms: int
    rounds_contributed: int
    num_train_examples: int
    retired_from_round: int
    retired_reason: str
    def __init__(self, name: _Optional[str] = ..., joined: _Optional[bool] = ..., last_seen_unix_ms: _Optional[int] = ..., rounds_contributed: _Optional[int] = ..., num_train_examples: _Optional[int] = ..., retired_from_round: _Optional[int] = ..., retired_reason: _Optional[str] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("run_id", "state", "open_round", "last_closed_round", "total_rounds", "silos", "message")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OPEN_ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_CLOSED_ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SILOS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: _federation_pb2.RunState
    open_round: int
    last_closed_round: int
    total_rounds: int
    silos: _containers.RepeatedCompositeFieldContainer[SiloStatus]
    message: str
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[_federation_pb2.RunState, str]] = ..., open_round: _Optional[int] = ..., last_closed_round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., silos: _Optional[_Iterable[_Union[SiloStatus, _Mapping]]] = ..., message: _Optional[str] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SiloMetrics(_message.Message):
    __slots__ = ("silo", "metrics")
    SILO_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    silo: str
    metrics: _containers.RepeatedCompositeFieldContainer[_federation_pb2.Metric]
    def __init__(self, silo: _Optional[str] = ..., metrics: _Optional[_Iterable[_Union[_federation_pb2.Metric, _Mapping]]] = ...) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round", "closed", "contributors", "params_shared", "bytes_up", "bytes_down", "seconds", "metrics", "total_weight", "failure", "opened_at_unix_ms", "deadline_unix_ms", "closed_at_unix_ms", "quorum", "quorum_reached", "uploads")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_SHARED_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    OPENED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CLOSED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    QUORUM_REACHED_FIELD_NUMBER: _ClassVar[int]
    UPLOADS_FIELD_NUMBER: _ClassVar[int]
    round: int
    closed: bool
    contributors: _containers.RepeatedScalarFieldContainer[str]
    params_shared: int
    bytes_up: int
    bytes_down: int
    seconds: float
    metrics: _containers.RepeatedCompositeFieldContainer[SiloMetrics]
    total_weight: float
    failure: str
    opened_at_unix_ms: int
    deadline_unix_ms: int
    closed_at_unix_ms: int
    quorum: int
    quorum_reached: bool
    uploads: _containers.RepeatedCompositeFieldContainer[RoundUpload]
    def __init__(self, round: _Optional[int] = ..., closed: _Optional[bool] = ..., contributors: _Optional[_Iterable[str]] = ..., params_shared: _Optional[int] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., seconds: _Optional[float] = ..., metrics: _Optional[_Iterable[_Union[SiloMetrics, _Mapping]]] = ..., total_weight: _Optional[float] = ..., failure: _Optional[str] = ..., opened_at_unix_ms: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., closed_at_unix_ms: _Optional[int] = ..., quorum: _Optional[int] = ..., quorum_reached: _Optional[bool] = ..., uploads: _Optional[_Iterable[_Union[RoundUpload, _Mapping]]] = ...) -> None: ...

class RoundUpload(_message.Message):
    __slots__ = ("silo", "accepted_at_unix_ms", "payload_bytes")
    SILO_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    silo: str
    accepted_at_unix_ms: int
    payload_bytes: int
    def __init__(self, silo: _Optional[str] = ..., accepted_at_unix_ms: _Optional[int] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class ListRoundsResponse(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    def __init__(self, rounds: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ...) -> None: ...

class GetPrivacyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RelationSpend(_message.Message):
    __slots__ = ("relation", "epsilon", "epsilon_rdp", "epsilon_pld", "accountant", "delta", "entries", "last_round")
    RELATION_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    EPSILON_RDP_FIELD_NUMBER: _ClassVar[int]
    EPSILON_PLD_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    relation: Neighbouring
    epsilon: float
    epsilon_rdp: float
    epsilon_pld: float
    accountant: Accountant
    delta: float
    entries: int
    last_round: int
    def __init__(self, relation: _Optional[_Union[Neighbouring, str]] = ..., epsilon: _Optional[float] = ..., epsilon_rdp: _Optional[float] = ..., epsilon_pld: _Optional[float] = ..., accountant: _Optional[_Union[Accountant, str]] = ..., delta: _Optional[float] = ..., entries: _Optional[int] = ..., last_round: _Optional[int] = ...) -> None: ...

class SiloPrivacy(_message.Message):
    __slots__ = ("silo", "has_budget", "budget_epsilon", "budget_delta", "budget_error", "relations", "last_seq")
    SILO_FIELD_NUMBER: _ClassVar[int]
    HAS_BUDGET_FIELD_NUMBER: _ClassVar[int]
    BUDGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    BUDGET_DELTA_FIELD_NUMBER: _ClassVar[int]
    BUDGET_ERROR_FIELD_NUMBER: _ClassVar[int]
    RELATIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    silo: str
    has_budget: bool
    budget_epsilon: float
    budget_delta: float
    budget_error: str
    relations: _containers.RepeatedCompositeFieldContainer[RelationSpend]
    last_seq: int
    def __init__(self, silo: _Optional[str] = ..., has_budget: _Optional[bool] = ..., budget_epsilon: _Optional[float] = ..., budget_delta: _Optional[float] = ..., budget_error: _Optional[str] = ..., relations: _Optional[_Iterable[_Union[RelationSpend, _Mapping]]] = ..., last_seq: _Optional[int] = ...) -> None: ...

class GetPrivacyResponse(_message.Message):
    __slots__ = ("enabled", "plan_delta", "silos")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    PLAN_DELTA_FIELD_NUMBER: _ClassVar[int]
    SILOS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    plan_delta: float
    silos: _containers.RepeatedCompositeFieldContainer[SiloPrivacy]
    def __init__(self, enabled: _Optional[bool] = ..., plan_delta: _Optional[float] = ..., silos: _Optional[_Iterable[_Union[SiloPrivacy, _Mapping]]] = ...) -> None: ...
