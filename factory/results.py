"""What jobs hand each other, and how a job says it failed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class StageError(Exception):
    """A job failed for a reason its stage can say in one line."""


@dataclass(frozen=True)
class Output:
    """What a finished job hands to the jobs that depend on it."""

    path: Path | None = None
    info: Mapping[str, Any] = field(default_factory=dict)
