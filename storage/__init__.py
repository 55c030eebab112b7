"""Persistence for Distillery: runs, metrics and artifacts in SQLite or PostgreSQL.

Knows nothing about training or torch; kd_core talks to it through
:class:`RunSink`, the dashboard through :class:`Store`.
"""

from storage.db import default_db_url
from storage.store import ArtifactRecord, RunRecord, RunSink, Store

__all__ = ["ArtifactRecord", "RunRecord", "RunSink", "Store", "default_db_url"]
