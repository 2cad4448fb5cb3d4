"""Starts the whole Parley platform as local processes (`make run`, integration tests, benchmarks)."""

from .launch import Platform, PlatformConfig, delete_broker_names, start_service

__all__ = ["Platform", "PlatformConfig", "delete_broker_names", "start_service"]
