"""The numbers, frame by frame, from what the tracker saw in a made clip and in its inputs: no model
runs here, so each metric can be checked on made-up tracks.

- pose error: the rotation between the output head's pose and the pose it was asked for, in degrees
  (the geodesic angle: yaw, pitch and roll at once), and the error of its movement across the frame,
  in face widths (HelloMeme's `trans_ratio` says how much of the driver's movement it follows)
- expression error: mean absolute difference of the 51 ARKit coefficients, all and per face region
- temporal change: mean absolute difference of consecutive frames (grey, [0, 1]); the output's
  against the driving clip's is the flicker, and at the sampler's window boundaries against
  elsewhere the seam score
"""

from __future__ import annotations

import cv2
import numpy as np

from hellomeme_cli.face.signals import ARKIT_BLENDSHAPES, angles_to_rotation

# The face regions of the expression error, by ARKit name.
REGIONS = {
    "eyes": tuple(name for name in ARKIT_BLENDSHAPES if name.startswith("eye")),
    "brows": tuple(name for name in ARKIT_BLENDSHAPES if name.startswith("brow")),
    "mouth": tuple(name for name in ARKIT_BLENDSHAPES if name.startswith(("mouth", "jaw"))),
}


def rotation_error(angles: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(n, 3) head-pose angles (radians) against their target -> (n,) degrees of the rotation between them."""
    relative = angles_to_rotation(angles) @ angles_to_rotation(target).transpose(0, 2, 1)
    cosine = np.clip((np.trace(relative, axis1=1, axis2=2) - 1) / 2, -1.0, 1.0)
    return np.degrees(np.arccos(cosine))


def face_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 478, 2+) landmarks -> the (n, 2) centre of each face's box and the (n,) box widths."""
    low, high = landmarks[:, :, :2].min(axis=1), landmarks[:, :, :2].max(axis=1)
    return (low + high) / 2, high[:, 0] - low[:, 0]


def movement_error(output_landmarks: np.ndarray, driving_landmarks: np.ndarray, ratio: float) -> np.ndarray:
    """How far the output face moved from its first frame, against `ratio` times how far the
    driving face moved from its first, each in widths of its own face -> (n,) face widths."""
    (out_centre, out_width), (drive_centre, drive_width) = face_centres(output_landmarks), face_centres(driving_landmarks)
    moved = (out_centre - out_centre[:1]) / out_width[:1]
    asked = ratio * (drive_centre - drive_centre[:1]) / drive_width[:1]
    return np.linalg.norm(moved - asked, axis=1)


def expression_errors(coefficients: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """(n, 51) ARKit coefficients against their target -> {"all": (n,), each region: (n,)} mean absolute differences."""
    difference = np.abs(coefficients - target)
    errors = {"all": difference.mean(axis=1)}
    for region, names in REGIONS.items():
        errors[region] = difference[:, [ARKIT_BLENDSHAPES.index(name) for name in names]].mean(axis=1)
    return errors


def frame_change(previous: np.ndarray | None, frame: np.ndarray, size: int = 128) -> float | None:
    """Mean absolute difference of two RGB frames, both seen as `size`-pixel grey pictures in [0, 1]
    (so clips of other sizes compare); None for a first frame."""
    if previous is None:
        return None
    return float(np.abs(_grey(frame, size) - _grey(previous, size)).mean())


def _grey(frame: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def seam_frames(windows: list[tuple[int, int]], frame_count: int) -> list[int]:
    """The frames where a window begins or ends inside the clip: a frame whose predecessor came
    from another set of windows (the change into frame i is measured at i)."""
    seams = {start for start, _ in windows if 0 < start < frame_count} | {stop for _, stop in windows if 0 < stop < frame_count}
    return sorted(seams)


def seam_score(changes: np.ndarray, seams: list[int]) -> float | None:
    """The output's mean frame change at the seams against elsewhere: about 1 where windows join
    without a trace, above where the picture jumps at them. None without seams or changes elsewhere."""
    known = ~np.isnan(changes)
    at = np.zeros(len(changes), bool)
    at[seams] = True
    if not (at & known).any() or not (~at & known).any():
        return None
    elsewhere = changes[~at & known].mean()
    return float(changes[at & known].mean() / elsewhere) if elsewhere > 0 else None
