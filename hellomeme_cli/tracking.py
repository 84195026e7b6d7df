"""Face tracking over a clip with MediaPipe Face Landmarker: one subject, every frame, gaps filled."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class FaceTrack:
    """Per-frame face data for one subject; frame i of the clip is row i of every array.

    landmarks: (N, 478, 3) float32; x, y in pixels of the source frame, z in the same pixel scale
    blendshapes: (N, 52) float32 scores in MediaPipe's category order (`BLENDSHAPE_NAMES`)
    matrices: (N, 4, 4) float32 facial transformation matrices as MediaPipe returns them
    filled: (N,) bool, True where no face was detected and the row was interpolated
    fps: frames per second of the source; size: (width, height) of the source frames
    """

    landmarks: np.ndarray
    blendshapes: np.ndarray
    matrices: np.ndarray
    filled: np.ndarray
    fps: float
    size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.landmarks)
