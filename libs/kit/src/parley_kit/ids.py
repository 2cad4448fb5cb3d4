"""Random public identifiers with a type prefix, as OpenAI's (`file-…`, `batch_…`)."""

from __future__ import annotations

import secrets


def new_id(prefix: str, separator: str = "_") -> str:
    """A 120-bit random id such as `batch_3f…`; unguessable, so it can't be enumerated."""
    return f"{prefix}{separator}{secrets.token_hex(15)}"
