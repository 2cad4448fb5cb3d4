"""Request and response bodies of the Files and Batch API, declared once (validation and OpenAPI both)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from flask_openapi3 import FileStorage
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .batches import Counts
from .files import UPLOAD_PURPOSES
from .jsonl import Endpoint
from .models import Batch, File

MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def unix(value: datetime | None) -> int | None:
    """OpenAI timestamps: unix seconds."""
    return int(value.timestamp()) if value is not None else None


class FileUpload(BaseModel):
    """`POST /v1/files` multipart form."""

    file: FileStorage
    # Checked by files.upload_file (its own error code); the enum documents the same list.
    purpose: str = Field(
        description="`batch` for batch input (validated as JSONL requests)",
        json_schema_extra={"enum": list(UPLOAD_PURPOSES)},
    )


class FilePath(BaseModel):
    """A file id in the path."""

    file_id: str = Field(max_length=64)


class FileQuery(BaseModel):
    """`GET /v1/files` filters and cursor."""

    purpose: str | None = None
    limit: int = Field(10_000, ge=1, le=10_000)
    after: str | None = Field(None, max_length=64)
    order: Literal["asc", "desc"] = "desc"


class FileObject(BaseModel):
    """OpenAI's File object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"

    @classmethod
    def of(cls, file: File) -> FileObject:
        """From a row."""
        return cls(
            id=file.id,
            bytes=file.bytes,
            created_at=unix(file.created_at) or 0,
            expires_at=unix(file.expires_at),
            filename=file.filename,
            purpose=file.purpose,
        )


class FileList(BaseModel):
    """A page of files."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    """The answer to a delete."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchCreate(BaseModel):
    """`POST /v1/batches` body."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64)
    endpoint: Endpoint
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
        for key, item in value.items():
            if len(key) > MAX_METADATA_KEY:
                raise ValueError(f"keys are at most {MAX_METADATA_KEY} characters")
            if len(item) > MAX_METADATA_VALUE:
                raise ValueError(f"values are at most {MAX_METADATA_VALUE} characters")
        return value


class BatchCreateHeaders(BaseModel):
    """Optional headers of `POST /v1/batches`."""

    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="A retry with the same key and body returns the same batch; another body under it is a 409",
    )


class BatchPath(BaseModel):
    """A batch id in the path."""

    batch_id: str = Field(max_length=64)


class BatchQuery(BaseModel):
    """`GET /v1/batches` cursor."""

    after: str | None = Field(None, max_length=64)
    limit: int = Field(20, ge=1, le=100)


class RequestCounts(BaseModel):
    """Items of the batch: all, succeeded, failed."""

    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    """Cached part of the input."""

    cached_tokens: int


class OutputTokensDetails(BaseModel):
    """Reasoning part of the output."""

    reasoning_tokens: int


class BatchUsage(BaseModel):
    """Token totals of the succeeded items (set when the batch ends)."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class BatchErrors(BaseModel):
    """File-level validation errors."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]


class BatchObject(BaseModel):
    """OpenAI's Batch object."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    usage: BatchUsage
    metadata: dict[str, str] | None

    @classmethod
    def of(cls, batch: Batch, counts: Counts) -> BatchObject:
        """From a row and its live counts."""
        return cls(
            id=batch.id,
            endpoint=batch.endpoint,
            model=batch.model,
            errors=BatchErrors(data=batch.errors) if batch.errors else None,
            input_file_id=batch.input_file_id,
            completion_window=batch.completion_window,
            status=batch.status,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            created_at=unix(batch.created_at) or 0,
            in_progress_at=unix(batch.in_progress_at),
            expires_at=unix(batch.expires_at),
            finalizing_at=unix(batch.finalizing_at),
            completed_at=unix(batch.completed_at),
            failed_at=unix(batch.failed_at),
            expired_at=unix(batch.expired_at),
            cancelling_at=unix(batch.cancelling_at),
            cancelled_at=unix(batch.cancelled_at),
            request_counts=RequestCounts(total=counts.total, completed=counts.completed, failed=counts.failed),
            usage=BatchUsage(
                input_tokens=batch.input_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=batch.cached_tokens),
                output_tokens=batch.output_tokens,
                output_tokens_details=OutputTokensDetails(reasoning_tokens=batch.reasoning_tokens),
                total_tokens=batch.input_tokens + batch.output_tokens,
            ),
            metadata=batch.batch_metadata,
        )


class BatchList(BaseModel):
    """A page of batches, newest first."""

    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool
