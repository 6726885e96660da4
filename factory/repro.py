"""Reproducibility helpers: the cell's clock and the seeds that replace randomness.

Every job of a cell carries `epoch` (SOURCE_DATE_EPOCH) in its params; what a tool would
draw at random (UUIDs, serials, CIDs) is derived from the job's content key instead, so
the same inputs give the same bytes on every run and machine.
"""

from __future__ import annotations

import hashlib
import uuid

_NAMESPACE = uuid.UUID("3c1f4f5e-0d6b-4d8e-b3f2-5b9a1f6e2c47")


def seeded_uuid(key: str, label: str) -> uuid.UUID:
    """A UUID that stands for `label` of the thing with content key `key`."""
    return uuid.uuid5(_NAMESPACE, f"{label}:{key}")


def seeded_bytes(key: str, label: str, n: int) -> bytes:
    """`n` bytes (up to 32) that stand for `label` of the thing with content key `key`."""
    return hashlib.sha256(f"{label}:{key}".encode()).digest()[:n]


def source_date_env(epoch: int) -> dict[str, str]:
    """The environment that makes tools honour the cell's clock."""
    return {"SOURCE_DATE_EPOCH": str(epoch), "E2FSPROGS_FAKE_TIME": str(epoch)}
