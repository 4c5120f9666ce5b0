import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Reading(_message.Message):
    __slots__ = ("sequence", "code", "system", "value", "unit", "effective_time", "components")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_TIME_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    code: str
    system: str
    value: float
    unit: str
    effective_time: _timestamp_pb2.Timestamp
    components: _containers.RepeatedCompositeFieldContainer[ReadingComponent]
    def __init__(self, sequence: _Optional[int] = ..., code: _Optional[str] = ..., system: _Optional[str] = ..., value: _Optional[float] = ..., unit: _Optional[str] = ..., effective_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., components: _Optional[_Iterable[_Union[ReadingComponent, _Mapping]]] = ...) -> None: ...

class ReadingComponent(_message.Message):
    __slots__ = ("code", "system", "value", "unit")
    CODE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    code: str
    system: str
    value: float
    unit: str
    def __init__(self, code: _Optional[str] = ..., system: _Optional[str] = ..., value: _Optional[float] = ..., unit: _Optional[str] = ...) -> None: ...

class DeviceStatus(_message.Message):
    __slots__ = ("battery_percent", "signal_quality")
    BATTERY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_QUALITY_FIELD_NUMBER: _ClassVar[int]
    battery_percent: float
    signal_quality: float
    def __init__(self, battery_percent: _Optional[float] = ..., signal_quality: _Optional[float] = ...) -> None: ...

class ReadingBatch(_message.Message):
    __slots__ = ("device_id", "patient_id", "readings", "device_status")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    PATIENT_ID_FIELD_NUMBER: _ClassVar[int]
    READINGS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_STATUS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    patient_id: str
    readings: _containers.RepeatedCompositeFieldContainer[Reading]
    device_status: DeviceStatus
    def __init__(self, device_id: _Optional[str] = ..., patient_id: _Optional[str] = ..., readings: _Optional[_Iterable[_Union[Reading, _Mapping]]] = ..., device_status: _Optional[_Union[DeviceStatus, _Mapping]] = ...) -> None: ...

class BatchAck(_message.Message):
    __slots__ = ("device_id", "first_sequence", "last_sequence", "reading_count", "duplicate")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    READING_COUNT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    first_sequence: int
    last_sequence: int
    reading_count: int
    duplicate: bool
    def __init__(self, device_id: _Optional[str] = ..., first_sequence: _Optional[int] = ..., last_sequence: _Optional[int] = ..., reading_count: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class StreamReadingsRequest(_message.Message):
    __slots__ = ("batch",)
    BATCH_FIELD_NUMBER: _ClassVar[int]
    batch: ReadingBatch
    def __init__(self, batch: _Optional[_Union[ReadingBatch, _Mapping]] = ...) -> None: ...

class StreamReadingsResponse(_message.Message):
    __slots__ = ("ack",)
    ACK_FIELD_NUMBER: _ClassVar[int]
    ack: BatchAck
    def __init__(self, ack: _Optional[_Union[BatchAck, _Mapping]] = ...) -> None: ...

class UploadReadingsRequest(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[ReadingBatch]
    def __init__(self, batches: _Optional[_Iterable[_Union[ReadingBatch, _Mapping]]] = ...) -> None: ...

class UploadReadingsResponse(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[BatchAck]
    def __init__(self, acks: _Optional[_Iterable[_Union[BatchAck, _Mapping]]] = ...) -> None: ...
