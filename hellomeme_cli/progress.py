"""Progress reporting: the library calls a callback, the CLI draws the bars."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    """`task` advanced to `completed` of `total` units (`total` None when unknown)."""

    task: str
    completed: int
    total: int | None = None
    unit: str = "B"


ProgressCallback = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    """The default callback: report nothing."""
