"""Parley's shared kit: the cross-cutting code every service uses once.

Modules: `settings`, `logs`, `tracing`, `metrics`, `health`, `errors`, `http` (outbound client), `amqp`,
`tokens` (JWT verification), `db` (SQLAlchemy + Alembic), `app` (the common factory steps), `cli`, `ids`,
`testing` (pytest fixtures for real backing services and service processes).
"""
