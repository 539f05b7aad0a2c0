from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVManifest(_message.Message):
    __slots__ = ("request_id", "src_worker", "dst_worker", "chunk_index", "layer_start", "layer_end", "token_start", "token_end", "block_size", "dst_block_ids", "num_kv_heads", "head_dim", "dtype", "codec", "checksum", "auth_tag")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_WORKER_FIELD_NUMBER: _ClassVar[int]
    DST_WORKER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    AUTH_TAG_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    src_worker: str
    dst_worker: str
    chunk_index: int
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int
    block_size: int
    dst_block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_kv_heads: int
    head_dim: int
    dtype: str
    codec: str
    checksum: int
    auth_tag: bytes
    def __init__(self, request_id: _Optional[str] = ..., src_worker: _Optional[str] = ..., dst_worker: _Optional[str] = ..., chunk_index: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., block_size: _Optional[int] = ..., dst_block_ids: _Optional[_Iterable[int]] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., codec: _Optional[str] = ..., checksum: _Optional[int] = ..., auth_tag: _Optional[bytes] = ...) -> None: ...

class KVChunkFrame(_message.Message):
    __slots__ = ("manifest", "data")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    manifest: KVManifest
    data: bytes
    def __init__(self, manifest: _Optional[_Union[KVManifest, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class KVAck(_message.Message):
    __slots__ = ("status", "detail")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[KVAck.Status]
        STATUS_OK: _ClassVar[KVAck.Status]
        STATUS_CHECKSUM_MISMATCH: _ClassVar[KVAck.Status]
        STATUS_REJECTED: _ClassVar[KVAck.Status]
    STATUS_UNSPECIFIED: KVAck.Status
    STATUS_OK: KVAck.Status
    STATUS_CHECKSUM_MISMATCH: KVAck.Status
    STATUS_REJECTED: KVAck.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    status: KVAck.Status
    detail: str
    def __init__(self, status: _Optional[_Union[KVAck.Status, str]] = ..., detail: _Optional[str] = ...) -> None: ...
