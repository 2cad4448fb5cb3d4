"""Alembic environment: the kit runs the auth migrations against the URL it is given."""

from parley_auth.models import Base
from parley_kit.db import run_alembic_env

run_alembic_env(Base.metadata)
