"""Alembic environment of the kit's migration test: the one line every service's env.py has."""

from kit_models import Base

from parley_kit.db import run_alembic_env

run_alembic_env(Base.metadata)
