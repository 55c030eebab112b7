"""Persistence for Distillery: runs, metrics and artifacts in SQLite or PostgreSQL.

Knows nothing about training or torch; kd_core talks to it through
:class:`RunSink`, the dashboard through :class:`Store`.
"""

from storage.db import StoreUnavailable, default_db_url, masked_url
from storage.store import ArtifactRecord, RunRecord, RunSink, Store

__all__ = ["ArtifactRecord", "RunRecord", "RunSink", "Store", "StoreUnavailable", "default_db_url", "masked_url"]
