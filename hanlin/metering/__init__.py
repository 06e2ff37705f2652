"""API keys and usage metering in SQLite (the default) or PostgreSQL."""

from hanlin.metering.store import (
    DEFAULT_DB,
    STATUSES,
    KeyInfo,
    MeteringStore,
    UsageRecord,
    UsageTotal,
)
from hanlin.metering.writer import UsageWriter

__all__ = ["DEFAULT_DB", "STATUSES", "KeyInfo", "MeteringStore", "UsageRecord", "UsageTotal", "UsageWriter"]
