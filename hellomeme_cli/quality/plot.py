"""`eval --plot`: one picture of an evaluation: a strip of output frames, then per-frame curves of
pose error, expression error, identity and frame change (the output's and the driving clip's),
the sampler's window seams marked on each. Drawn with OpenCV, which the tracker needs anyway."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from hellomeme_cli.media.video import read_frames, write_image
from hellomeme_cli.quality.evaluate import Evaluation

WIDTH = 1200
STRIP_FRAMES = 8
PANEL_HEIGHT = 170
MARGIN = (70, 30, 28, 26)  # left, right, top, bottom of each panel's axes
INK, GRID, SEAM, BACKGROUND = (30, 30, 30), (225, 225, 225), (120, 170, 255), (255, 255, 255)
COLOURS = ((40, 90, 200), (230, 120, 30))  # RGB: the output's curve, the driving clip's
# Title, the per-frame series drawn, whether the axis starts at zero (errors and changes) or fits the values.
PANELS = (
    ("pose error (degrees)", ("pose_error_deg",), True),
    ("expression error (ARKit, mean |difference|)", ("expression_error",), True),
    ("identity (cosine to the reference)", ("identity",), False),
    ("frame change", ("frame_change", "driving_change"), True),
)


def plot(evaluation: Evaluation, video: Path, path: Path, *, force: bool = False) -> Path:
    """Write the picture of `evaluation` (of the clip `video`) to `path` (PNG)."""
    strip = _strip(video, len(evaluation.frames["frame_change"]))
    panels = [_panel(title, [evaluation.frames[name] for name in names], evaluation.seams, zero) for title, names, zero in PANELS]
    picture = np.vstack([strip, *panels])
    return write_image(picture, Path(path), force=force)


def _strip(video: Path, count: int) -> np.ndarray:
    """STRIP_FRAMES output frames evenly spaced over the clip, side by side, each with its number."""
    wanted = sorted({round(i * (count - 1) / max(STRIP_FRAMES - 1, 1)) for i in range(STRIP_FRAMES)})
    tile = WIDTH // STRIP_FRAMES
    tiles = []
    for number, frame in enumerate(read_frames(video)):
        if number in wanted:
            small = cv2.resize(frame, (tile, tile * frame.shape[0] // frame.shape[1]), interpolation=cv2.INTER_AREA)
            cv2.putText(small, str(number), (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(small)
        if number >= wanted[-1]:
            break
    height = max(t.shape[0] for t in tiles)
    row = np.full((height, WIDTH, 3), 255, np.uint8)
    for index, small in enumerate(tiles):
        row[: small.shape[0], index * tile : index * tile + small.shape[1]] = small
    return row


def _panel(title: str, series: list[list[float | None]], seams: list[int], from_zero: bool) -> np.ndarray:
    """One chart: the series (None: a gap) over the frames, the seams as vertical lines."""
    canvas = np.full((PANEL_HEIGHT, WIDTH, 3), BACKGROUND, np.uint8)
    left, right, top, bottom = MARGIN
    width, height = WIDTH - left - right, PANEL_HEIGHT - top - bottom
    count = max(len(values) for values in series)
    known = [value for values in series for value in values if value is not None]
    low, high = (min(known), max(known)) if known else (0.0, 1.0)
    if from_zero:
        low = min(low, 0.0)
    if math.isclose(low, high):
        low, high = low - 0.5, high + 0.5

    def x(frame: int) -> int:
        return left + round(frame * width / max(count - 1, 1))

    def y(value: float) -> int:
        return top + round((high - value) * height / (high - low))

    for fraction in (0.0, 0.5, 1.0):
        value = low + fraction * (high - low)
        cv2.line(canvas, (left, y(value)), (left + width, y(value)), GRID, 1)
        cv2.putText(canvas, f"{value:.3g}", (4, y(value) + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, INK, 1, cv2.LINE_AA)
    for seam in seams:
        cv2.line(canvas, (x(seam), top), (x(seam), top + height), SEAM, 1)
    for colour, values in zip(COLOURS, series):
        run: list[tuple[int, int]] = []
        for frame, value in enumerate([*values, None]):
            if value is None:
                if len(run) > 1:
                    cv2.polylines(canvas, [np.array(run, np.int32)], False, colour, 2, cv2.LINE_AA)
                elif run:
                    cv2.circle(canvas, run[0], 2, colour, -1)
                run = []
            else:
                run.append((x(frame), y(value)))
    cv2.rectangle(canvas, (left, top), (left + width, top + height), INK, 1)
    cv2.putText(canvas, title if known else f"{title}: no face in the output", (left, top - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, INK, 1, cv2.LINE_AA)
    if len(series) > 1:  # which curve is which
        for number, (colour, label) in enumerate(zip(COLOURS, ("output", "driving clip"))):
            cv2.putText(canvas, label, (left + width - 220 + 110 * number, top - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1, cv2.LINE_AA)
    for frame in range(0, count, max(1, round(count / 10))):
        cv2.putText(canvas, str(frame), (x(frame) - 6, top + height + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.38, INK, 1, cv2.LINE_AA)
    return canvas
