"""The preview video `hellomeme track --preview` writes, for a person to check a track at a glance
(the clip crop, landmarks, the pose square, expression bars); the template itself is driving.py's."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

from hellomeme_cli.progress import ProgressCallback, no_progress
from hellomeme_cli.face.signals import POSE_EDGES, SquareCrop, clip_crop, crop_track, head_pose, pose_square
from hellomeme_cli.face.tracking import BLENDSHAPE_NAMES, FaceTrack
from hellomeme_cli.media.video import write_video

# The scores drawn as bars: the ones that move most in speech and memes.
PREVIEW_SCORES = ("jawOpen", "eyeBlinkLeft", "eyeBlinkRight", "mouthSmileLeft", "mouthSmileRight", "browInnerUp", "mouthPucker")
_BAR_WIDTH, _BAR_HEIGHT, _MARGIN = 150, 12, 8


def write_preview(
    track: FaceTrack,
    frames: Iterable[np.ndarray],
    path: Path,
    *,
    audio_from: Path | None = None,
    size: int = 512,
    force: bool = False,
    protect: Iterable[Path] = (),
    progress: ProgressCallback = no_progress,
) -> Path:
    """The clip as the model will see it (`preview_frames`), with the clip's audio."""
    return write_video(
        preview_frames(track, frames, size), path, track.fps, audio_from=audio_from, force=force, protect=protect, progress=progress, total=len(track)
    )


def preview_frames(track: FaceTrack, frames: Iterable[np.ndarray], size: int = 512) -> Iterator[np.ndarray]:
    """Each frame cropped to the clip's square (`size` pixels), with the landmarks, the pose square
    of the condition image, the main expression scores, and filled frames marked."""
    crop = clip_crop(track, size)
    working = crop_track(track, crop)
    angles, translations = head_pose(working)
    for index, frame in zip(range(len(track)), frames):
        yield _draw(crop, frame, working, index, angles[index], translations[index])


def _draw(crop: SquareCrop, frame: np.ndarray, track: FaceTrack, index: int, angles: np.ndarray, translation: np.ndarray) -> np.ndarray:
    image = np.ascontiguousarray(crop.apply(frame))
    for x, y in track.landmarks[index, :, :2].astype(np.int32):
        cv2.circle(image, (int(x), int(y)), 1, (255, 255, 255), -1, cv2.LINE_AA)
    corners = pose_square(angles, translation, crop.size).astype(np.int32)
    for colour, start, end in POSE_EDGES:
        cv2.line(image, tuple(corners[start].tolist()), tuple(corners[end].tolist()), colour, 3, cv2.LINE_AA)
    for row, name in enumerate(PREVIEW_SCORES):
        _bar(image, row, name, float(track.blendshapes[index, BLENDSHAPE_NAMES.index(name)]))
    degrees = np.degrees(angles)
    _label(image, f"frame {index}  pitch {degrees[0]:+.0f}  yaw {degrees[1]:+.0f}  roll {degrees[2]:+.0f}", crop.size - _MARGIN)
    if track.filled[index]:
        _label(image, "NO FACE: filled from neighbours", crop.size - 3 * _MARGIN, colour=(255, 64, 64))
    return image


def _bar(image: np.ndarray, row: int, name: str, score: float) -> None:
    top = _MARGIN + row * (_BAR_HEIGHT + 4)
    left = _MARGIN
    cv2.rectangle(image, (left, top), (left + _BAR_WIDTH, top + _BAR_HEIGHT), (40, 40, 40), -1)
    cv2.rectangle(image, (left, top), (left + round(_BAR_WIDTH * min(max(score, 0.0), 1.0)), top + _BAR_HEIGHT), (255, 200, 0), -1)
    cv2.putText(image, f"{name} {score:.2f}", (left + _BAR_WIDTH + 6, top + _BAR_HEIGHT - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)


def _label(image: np.ndarray, text: str, baseline: int, colour: tuple[int, int, int] = (255, 255, 255)) -> None:
    cv2.putText(image, text, (_MARGIN, baseline), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(image, text, (_MARGIN, baseline), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)

