"""Alembic environment of the llm database."""

from parley_kit.db import run_alembic_env
from parley_llm.models import Base

run_alembic_env(Base.metadata)
