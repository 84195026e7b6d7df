"""Progress reporting: the library calls a callback, the CLI draws the bars."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    """`task` advanced to `completed` of `total` units (`total` None when unknown); `detail`: a few
    words to show beside it that change as it goes (a batch's counts, a worker's current stage)."""

    task: str
    completed: int
    total: int | None = None
    unit: str = "B"
    detail: str = ""


ProgressCallback = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    """The default callback: report nothing."""
