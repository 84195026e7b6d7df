"""The animate pipeline: reference and driving clip in, mp4 out, as numbered steps.

1. read and track the driving clip, and the reference picture
2. driving signals: crops, head pose, expression, face-part embeddings
3. the reference net's cache and the prompt (once per clip)
4. the two-stage sampler (stage 1 per frame, stage 2 over overlapping windows)
5. decode and write the mp4 with the driving audio, frames streamed to the encoder
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from pathlib import Path

import numpy as np

from .engine import ModelOptions
from .errors import HellomemeError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")


@dataclasses.dataclass(frozen=True)
class AnimateSettings:
    """Everything a run depends on besides its inputs; the CLI builds it from its options."""

    models: ModelOptions = ModelOptions()
    steps: int = 25
    guidance: float = 2.0
    seed: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    trans_ratio: float = 0.0
    prompt: str = ""
    negative_prompt: str = ""
    window: int = 12
    overlap: int = 4
    crop: bool = True
    face_index: int = 0
    smoothing: bool = True

    def __post_init__(self) -> None:
        problems = [
            (self.steps < 1, f"--steps must be at least 1 (got {self.steps})"),
            (not math.isfinite(self.guidance) or self.guidance < 1, f"--guidance must be at least 1 (got {self.guidance})"),
            (self.fps is not None and not (0 < self.fps <= 240), f"--fps must be in (0, 240] (got {self.fps})"),
            (self.max_frames is not None and self.max_frames < 1, f"--max-frames must be at least 1 (got {self.max_frames})"),
            (not 0 <= self.trans_ratio <= 1, f"--trans-ratio must be in [0, 1] (got {self.trans_ratio})"),
            (self.window < 2, f"--window must be at least 2 (got {self.window})"),
            (not 0 <= self.overlap < self.window, f"--overlap must be in [0, window) = [0, {self.window}) (got {self.overlap})"),
            (self.seed is not None and not 0 <= self.seed < 2**32, f"--seed must be in [0, 2^32) (got {self.seed})"),
            (self.face_index < 0, f"--face-index must be at least 0 (got {self.face_index})"),
        ]
        for bad, message in problems:
            if bad:
                raise HellomemeError(message)

    def with_seed(self) -> "AnimateSettings":
        """The same settings with a seed chosen now if none was given, so it can be reported."""
        return self if self.seed is not None else dataclasses.replace(self, seed=secrets.randbelow(2**32))


def default_output(reference: Path, driving: Path, suffix: str = ".mp4", folder: Path | None = None) -> Path:
    """`<reference>_<driving>.mp4` in the current folder (or `folder`)."""
    return (folder or Path.cwd()) / f"{reference.stem}_{driving.stem}{suffix}"


def resample_indices(frame_count: int, source_fps: float, target_fps: float) -> np.ndarray:
    """Which source frame shows at each output frame when the rate changes: the one on screen at
    that instant (as ffmpeg's fps filter picks), keeping the clip's duration."""
    if frame_count < 1:
        return np.zeros(0, dtype=np.int64)
    duration = frame_count / source_fps
    count = max(1, round(duration * target_fps))
    times = np.arange(count) / target_fps
    return np.minimum(np.floor(times * source_fps + 1e-6).astype(np.int64), frame_count - 1)
