"""Alembic environment: the kit runs the migrations against the URL `migrate` passes in."""

from parley_jobs.models import Base
from parley_kit.db import run_alembic_env

run_alembic_env(Base.metadata)
