from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_DELETED: _ClassVar[Outcome]
    OUTCOME_NOTHING_TO_DELETE: _ClassVar[Outcome]
    OUTCOME_INVALID_ARGUMENT: _ClassVar[Outcome]
    OUTCOME_UNAVAILABLE: _ClassVar[Outcome]
    OUTCOME_INTERNAL: _ClassVar[Outcome]
    OUTCOME_INCOMPLETE: _ClassVar[Outcome]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_DELETED: Outcome
OUTCOME_NOTHING_TO_DELETE: Outcome
OUTCOME_INVALID_ARGUMENT: Outcome
OUTCOME_UNAVAILABLE: Outcome
OUTCOME_INTERNAL: Outcome
OUTCOME_INCOMPLETE: Outcome

class DeleteImageRequest(_message.Message):
    __slots__ = ("model_id", "validate_only")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    validate_only: bool
    def __init__(self, model_id: _Optional[str] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class DeleteImageResponse(_message.Message):
    __slots__ = ("success", "message", "outcome", "deleted_images", "deleted_files", "model_id", "file_bytes")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DELETED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    DELETED_FILES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    outcome: Outcome
    deleted_images: int
    deleted_files: int
    model_id: str
    file_bytes: int
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., deleted_images: _Optional[int] = ..., deleted_files: _Optional[int] = ..., model_id: _Optional[str] = ..., file_bytes: _Optional[int] = ...) -> None: ...

class DeleteImagesRequest(_message.Message):
    __slots__ = ("model_ids", "validate_only")
    MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    model_ids: _containers.RepeatedScalarFieldContainer[str]
    validate_only: bool
    def __init__(self, model_ids: _Optional[_Iterable[str]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class DeleteImagesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DeleteImageResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[DeleteImageResponse, _Mapping]]] = ...) -> None: ...
