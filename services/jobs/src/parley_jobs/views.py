"""The Files and Batch API routes: parse, call a service function inside the route's transaction, shape."""

from __future__ import annotations

from flask import Response, current_app, g, request
from flask_openapi3 import APIBlueprint, Tag

from parley_kit.app import model_response
from parley_kit.db import Database
from parley_kit.errors import PayloadTooLarge
from parley_kit.openapi import error_responses
from parley_kit.tokens import Identity, TokenVerifier, authenticate

from . import batches, files
from .schemas import (
    BatchCreate,
    BatchCreateHeaders,
    BatchList,
    BatchObject,
    BatchPath,
    BatchQuery,
    FileDeleted,
    FileList,
    FileObject,
    FilePath,
    FileQuery,
    FileUpload,
)
from .settings import JobsSettings

SECURITY = [{"bearer": []}]
api = APIBlueprint("jobs_api", __name__, url_prefix="/v1", abp_security=SECURITY)
FILES = Tag(name="files", description="OpenAI Files API")
BATCHES = Tag(name="batches", description="OpenAI Batch API")


def _settings() -> JobsSettings:
    return current_app.config["PARLEY_SETTINGS"]


# A file's bytes are returned as stored: the document says so instead of implying JSON.
RAW_CONTENT = {
    "description": "OK",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}


def _db() -> Database:
    return current_app.extensions["parley_db"]


def _identity() -> Identity:
    return g.identity


@api.before_request
def _authenticate() -> None:
    """Every `/v1/` route needs a verified token, checked before the body is parsed (401 before 400)."""
    verifier: TokenVerifier = current_app.extensions["parley_verifier"]
    g.identity = authenticate(request, verifier)
    if request.method == "POST" and request.path == "/v1/files":
        limit = _settings().max_file_bytes
        if request.content_length is not None and request.content_length > limit + 64 * 1024:
            raise PayloadTooLarge(f"files are limited to {limit} bytes", code="file_too_large", param="file")


@api.post("/files", tags=[FILES], responses={200: FileObject, **error_responses(413)})
def upload_file(form: FileUpload) -> Response:
    """Upload a file; `purpose=batch` files must be valid batch request JSONL."""
    settings = _settings()
    content = form.file.stream.read(settings.max_file_bytes + 1)
    if len(content) > settings.max_file_bytes:
        raise PayloadTooLarge(f"files are limited to {settings.max_file_bytes} bytes", code="file_too_large")
    filename = (form.file.filename or "upload.jsonl")[:255]
    with _db().transaction() as session:
        file = files.upload_file(
            session,
            owner=_identity().subject,
            filename=filename,
            purpose=form.purpose,
            content=content,
            max_lines=settings.max_lines,
        )
        return model_response(FileObject.of(file))


@api.get("/files", tags=[FILES], responses={200: FileList})
def list_files(query: FileQuery) -> Response:
    """The caller's files."""
    with _db().transaction() as session:
        rows, has_more = files.list_files(
            session,
            owner=_identity().subject,
            purpose=query.purpose,
            limit=query.limit,
            after=query.after,
            newest_first=query.order == "desc",
        )
        data = [FileObject.of(row) for row in rows]
    return model_response(
        FileList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )
    )


@api.get("/files/<file_id>", tags=[FILES], responses={200: FileObject})
def get_file(path: FilePath) -> Response:
    """One of the caller's files."""
    with _db().transaction() as session:
        return model_response(FileObject.of(files.get_file(session, owner=_identity().subject, file_id=path.file_id)))


@api.delete("/files/<file_id>", tags=[FILES], responses={200: FileDeleted})
def delete_file(path: FilePath) -> Response:
    """Delete one of the caller's files."""
    with _db().transaction() as session:
        file = files.delete_file(session, owner=_identity().subject, file_id=path.file_id)
        return model_response(FileDeleted(id=file.id))


@api.get("/files/<file_id>/content", tags=[FILES], responses={200: RAW_CONTENT})
def file_content(path: FilePath) -> Response:
    """The raw bytes of one of the caller's files."""
    with _db().transaction() as session:
        file = files.get_file(session, owner=_identity().subject, file_id=path.file_id, with_content=True)
        content, filename = file.content, file.filename
    response = Response(content, mimetype="application/octet-stream")
    response.headers["Content-Disposition"] = f'attachment; filename="{filename.replace(chr(34), "")}"'
    return response


@api.post("/batches", tags=[BATCHES], responses={200: BatchObject, **error_responses(404, 409)})
def create_batch(body: BatchCreate, header: BatchCreateHeaders) -> Response:
    """Create a batch from an uploaded `batch` file; its lines are queued for the workers."""
    identity = _identity()
    settings = _settings()
    with _db().transaction() as session:
        batch = batches.create_batch(
            session,
            owner=identity.subject,
            key_id=identity.key_id,
            input_file_id=body.input_file_id,
            endpoint=body.endpoint,
            completion_window=body.completion_window,
            metadata=body.metadata,
            max_lines=settings.max_lines,
            window_seconds=settings.completion_window_seconds,
            idempotency_key=header.idempotency_key,
            body_hash=batches.request_hash(body.model_dump(mode="json")),
        )
        return model_response(BatchObject.of(batch, batches.request_counts(session, [batch])[batch.id]))


@api.get("/batches", tags=[BATCHES], responses={200: BatchList})
def list_batches(query: BatchQuery) -> Response:
    """The caller's batches, newest first (`after` is the last id of the previous page)."""
    with _db().transaction() as session:
        rows, has_more = batches.list_batches(session, owner=_identity().subject, limit=query.limit, after=query.after)
        counts = batches.request_counts(session, rows)
        data = [BatchObject.of(row, counts[row.id]) for row in rows]
    return model_response(
        BatchList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )
    )


@api.get("/batches/<batch_id>", tags=[BATCHES], responses={200: BatchObject})
def get_batch(path: BatchPath) -> Response:
    """One of the caller's batches with live request counts."""
    with _db().transaction() as session:
        batch = batches.get_batch(session, owner=_identity().subject, batch_id=path.batch_id)
        return model_response(BatchObject.of(batch, batches.request_counts(session, [batch])[batch.id]))


@api.post("/batches/<batch_id>/cancel", tags=[BATCHES], responses={200: BatchObject, **error_responses(409)})
def cancel_batch(path: BatchPath) -> Response:
    """Cancel a batch: unstarted lines are skipped; it ends `cancelled` with partial output."""
    owner = _identity().subject
    with _db().transaction() as session:
        batches.cancel_batch(session, owner=owner, batch_id=path.batch_id)
    # In its own transaction, after the cancel committed (see finalize_if_done).
    with _db().transaction() as session:
        batches.finalize_if_done(session, batch_id=path.batch_id)
    with _db().transaction() as session:
        batch = batches.get_batch(session, owner=owner, batch_id=path.batch_id)
        return model_response(BatchObject.of(batch, batches.request_counts(session, [batch])[batch.id]))
