from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VectorDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VECTOR_DTYPE_UNSPECIFIED: _ClassVar[VectorDtype]
    VECTOR_DTYPE_FLOAT32: _ClassVar[VectorDtype]
    VECTOR_DTYPE_FLOAT16: _ClassVar[VectorDtype]

class Combiner(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMBINER_UNSPECIFIED: _ClassVar[Combiner]
    COMBINER_SUM: _ClassVar[Combiner]
    COMBINER_MEAN: _ClassVar[Combiner]
    COMBINER_SQRTN: _ClassVar[Combiner]
VECTOR_DTYPE_UNSPECIFIED: VectorDtype
VECTOR_DTYPE_FLOAT32: VectorDtype
VECTOR_DTYPE_FLOAT16: VectorDtype
COMBINER_UNSPECIFIED: Combiner
COMBINER_SUM: Combiner
COMBINER_MEAN: Combiner
COMBINER_SQRTN: Combiner

class TableQuery(_message.Message):
    __slots__ = ("table", "keys", "key_list", "row_splits", "weights", "combiner", "max_norm")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    KEY_LIST_FIELD_NUMBER: _ClassVar[int]
    ROW_SPLITS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    COMBINER_FIELD_NUMBER: _ClassVar[int]
    MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    table: str
    keys: bytes
    key_list: _containers.RepeatedScalarFieldContainer[int]
    row_splits: bytes
    weights: bytes
    combiner: Combiner
    max_norm: float
    def __init__(self, table: _Optional[str] = ..., keys: _Optional[bytes] = ..., key_list: _Optional[_Iterable[int]] = ..., row_splits: _Optional[bytes] = ..., weights: _Optional[bytes] = ..., combiner: _Optional[_Union[Combiner, str]] = ..., max_norm: _Optional[float] = ...) -> None: ...

class PackedQuery(_message.Message):
    __slots__ = ("tables", "keys", "counts")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedScalarFieldContainer[str]
    keys: bytes
    counts: bytes
    def __init__(self, tables: _Optional[_Iterable[str]] = ..., keys: _Optional[bytes] = ..., counts: _Optional[bytes] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("model", "queries", "dtype", "request_id", "packed", "prefetch")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    queries: _containers.RepeatedCompositeFieldContainer[TableQuery]
    dtype: VectorDtype
    request_id: str
    packed: PackedQuery
    prefetch: PackedQuery
    def __init__(self, model: _Optional[str] = ..., queries: _Optional[_Iterable[_Union[TableQuery, _Mapping]]] = ..., dtype: _Optional[_Union[VectorDtype, str]] = ..., request_id: _Optional[str] = ..., packed: _Optional[_Union[PackedQuery, _Mapping]] = ..., prefetch: _Optional[_Union[PackedQuery, _Mapping]] = ...) -> None: ...

class TableResult(_message.Message):
    __slots__ = ("table", "vectors", "rows", "dim", "dtype", "found")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    table: str
    vectors: bytes
    rows: int
    dim: int
    dtype: VectorDtype
    found: bytes
    def __init__(self, table: _Optional[str] = ..., vectors: _Optional[bytes] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[VectorDtype, str]] = ..., found: _Optional[bytes] = ...) -> None: ...

class PackedResult(_message.Message):
    __slots__ = ("tables", "counts", "dims", "vectors", "dtype", "found")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedScalarFieldContainer[str]
    counts: bytes
    dims: bytes
    vectors: bytes
    dtype: VectorDtype
    found: bytes
    def __init__(self, tables: _Optional[_Iterable[str]] = ..., counts: _Optional[bytes] = ..., dims: _Optional[bytes] = ..., vectors: _Optional[bytes] = ..., dtype: _Optional[_Union[VectorDtype, str]] = ..., found: _Optional[bytes] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("model", "results", "request_id", "packed")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    model: str
    results: _containers.RepeatedCompositeFieldContainer[TableResult]
    request_id: str
    packed: PackedResult
    def __init__(self, model: _Optional[str] = ..., results: _Optional[_Iterable[_Union[TableResult, _Mapping]]] = ..., request_id: _Optional[str] = ..., packed: _Optional[_Union[PackedResult, _Mapping]] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("model", "table", "keys", "vectors")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    model: str
    table: str
    keys: bytes
    vectors: bytes
    def __init__(self, model: _Optional[str] = ..., table: _Optional[str] = ..., keys: _Optional[bytes] = ..., vectors: _Optional[bytes] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    def __init__(self, rows: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("model", "table", "keys")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    model: str
    table: str
    keys: bytes
    def __init__(self, model: _Optional[str] = ..., table: _Optional[str] = ..., keys: _Optional[bytes] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    def __init__(self, rows: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[str]] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("name", "dim", "rows", "default_value", "max_keys_per_request")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_KEYS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    rows: int
    default_value: float
    max_keys_per_request: int
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., rows: _Optional[int] = ..., default_value: _Optional[float] = ..., max_keys_per_request: _Optional[int] = ...) -> None: ...

class DescribeModelResponse(_message.Message):
    __slots__ = ("model", "tables", "levels", "writes_refused", "version", "table_versions")
    class TableVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    WRITES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    levels: _containers.RepeatedScalarFieldContainer[str]
    writes_refused: str
    version: str
    table_versions: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., levels: _Optional[_Iterable[str]] = ..., writes_refused: _Optional[str] = ..., version: _Optional[str] = ..., table_versions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model_config",)
    MODEL_CONFIG_FIELD_NUMBER: _ClassVar[int]
    model_config: str
    def __init__(self, model_config: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: DescribeModelResponse
    def __init__(self, model: _Optional[_Union[DescribeModelResponse, _Mapping]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ("model", "version", "table_versions", "model_config")
    class TableVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    table_versions: _containers.ScalarMap[str, str]
    model_config: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., table_versions: _Optional[_Mapping[str, str]] = ..., model_config: _Optional[str] = ...) -> None: ...

class ReloadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: DescribeModelResponse
    def __init__(self, model: _Optional[_Union[DescribeModelResponse, _Mapping]] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("model", "packed")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    model: str
    packed: PackedQuery
    def __init__(self, model: _Optional[str] = ..., packed: _Optional[_Union[PackedQuery, _Mapping]] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: int
    def __init__(self, keys: _Optional[int] = ...) -> None: ...
