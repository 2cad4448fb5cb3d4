"""Files: uploads (batch input, validated before they are stored) and the output files batches write."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, undefer

from parley_kit.db import utcnow
from parley_kit.errors import BadRequest, NotFound
from parley_kit.ids import new_id

from .jsonl import parse_batch_file
from .models import File

BATCH = "batch"
BATCH_OUTPUT = "batch_output"
UPLOAD_PURPOSES = (BATCH, "user_data", "assistants", "fine-tune", "vision", "evals")
RETENTION = timedelta(days=30)  # OpenAI: "files with purpose=batch expire after 30 days"


def new_file(*, owner: str, filename: str, purpose: str, content: bytes) -> File:
    """A File row (not yet added to a session) with its id, size and expiry."""
    now = utcnow()
    return File(
        id=new_id("file", "-"),
        owner=owner,
        filename=filename,
        purpose=purpose,
        bytes=len(content),
        content=content,
        created_at=now,
        expires_at=now + RETENTION if purpose in (BATCH, BATCH_OUTPUT) else None,
        deleted=False,
    )


def upload_file(session: Session, *, owner: str, filename: str, purpose: str, content: bytes, max_lines: int) -> File:
    """Store an uploaded file; a batch input must be valid JSONL requests or it is refused whole."""
    if purpose not in UPLOAD_PURPOSES:
        raise BadRequest(
            f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}", code="invalid_purpose", param="purpose"
        )
    if purpose == BATCH:
        parse_batch_file(content, max_lines=max_lines)
    file = new_file(owner=owner, filename=filename, purpose=purpose, content=content)
    session.add(file)
    session.flush()
    return file


def get_file(session: Session, *, owner: str, file_id: str, with_content: bool = False) -> File:
    """The caller's file, or 404 (also for another user's file: its existence is not revealed)."""
    query = select(File).where(File.id == file_id, File.owner == owner, File.deleted.is_(False))
    if with_content:
        query = query.options(undefer(File.content))
    file = session.scalars(query).one_or_none()
    if file is None:
        raise NotFound("No such File object.", code="file_not_found", param="file_id")  # no echo: may be a secret
    return file


def list_files(
    session: Session, *, owner: str, purpose: str | None, limit: int, after: str | None, newest_first: bool
) -> tuple[list[File], bool]:
    """A page of the caller's files and whether more follow."""
    query = select(File).where(File.owner == owner, File.deleted.is_(False))
    if purpose:
        query = query.where(File.purpose == purpose)
    if after:
        cursor = session.scalars(
            select(File).where(File.id == after, File.owner == owner, File.deleted.is_(False))
        ).one_or_none()
        if cursor is None:
            raise BadRequest(f"after: no such file {after}", code="invalid_cursor", param="after")
        if newest_first:
            query = query.where(
                (File.created_at < cursor.created_at) | ((File.created_at == cursor.created_at) & (File.id < cursor.id))
            )
        else:
            query = query.where(
                (File.created_at > cursor.created_at) | ((File.created_at == cursor.created_at) & (File.id > cursor.id))
            )
    order = (File.created_at.desc(), File.id.desc()) if newest_first else (File.created_at.asc(), File.id.asc())
    rows = list(session.scalars(query.order_by(*order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_file(session: Session, *, owner: str, file_id: str) -> File:
    """Mark the caller's file deleted and drop its bytes (batches made from it keep their own copy of each line)."""
    file = get_file(session, owner=owner, file_id=file_id)
    file.deleted = True
    file.content = b""
    return file
