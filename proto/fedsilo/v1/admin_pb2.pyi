from fedsilo.v1 import federation_pb2 as _federation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
    __slots__ = ("round", "closed", "contributors", "params_shared", "bytes_up", "bytes_down", "seconds", "metrics", "total_weight", "failure")
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
    def __init__(self, round: _Optional[int] = ..., closed: _Optional[bool] = ..., contributors: _Optional[_Iterable[str]] = ..., params_shared: _Optional[int] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., seconds: _Optional[float] = ..., metrics: _Optional[_Iterable[_Union[SiloMetrics, _Mapping]]] = ..., total_weight: _Optional[float] = ..., failure: _Optional[str] = ...) -> None: ...

class ListRoundsResponse(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    def __init__(self, rounds: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ...) -> None: ...
