"""Persistence for Distillery: runs, metrics and artifacts in SQLite or PostgreSQL.

Knows nothing about training or torch; kd_core talks to it through
:class:`RunSink`, the dashboard through :class:`Store`.
"""

from storage.db import StoreUnavailable, default_db_url, masked_url
from storage.records import ArtifactRecord, RunRecord, SweepRecord
from storage.sink import RunSink
from storage.store import Store

__all__ = ["ArtifactRecord", "RunRecord", "RunSink", "SweepRecord", "Store", "StoreUnavailable", "default_db_url", "masked_url"]
