"""Driving signals: from MediaPipe face tracks to the tensors HelloMeme's control nets take.

The official code gets landmarks, head pose and blendshapes from its own ONNX models; we
derive the same quantities from MediaPipe and convert them to the official conventions
(docs/signals.md derives every constant). Per driving frame we keep only compact data
(pose, 51 coefficients, embeddings); condition images are rendered per frame range on
demand, so a long clip never holds full-resolution data for all its frames.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress
from hellomeme_cli.face.tracking import BLENDSHAPE_NAMES, FaceTrack

if TYPE_CHECKING:
    from transformers import CLIPVisionModelWithProjection

    from hellomeme_cli.models import FanEncoder

WORKING_SIZE = 512

# --- crop (official `crop_and_resize`) -------------------------------------------------

CROP_FACE_SCALE = 3.0  # side of the clip's square = 3 x the mean face size
CROP_LIFT = 0.115  # the square's centre moves up by this fraction of its side
# A 68-point-style subset (jaw line, brows, nose, eyes, lips): the extent the official
# 222-point landmarks cover. The whole MediaPipe mesh also covers the forehead, which would
# make faces ~15 % smaller in the working frame than the official crop makes them.
FACE_EXTENT_LANDMARKS = (
    162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,
    71, 63, 105, 66, 107, 336, 296, 334, 293, 301,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181, 78, 82, 13, 312, 308, 317, 14, 87,
)  # fmt: skip

# --- head pose ---------------------------------------------------------------------------

MEDIAPIPE_VERTICAL_FOV_DEGREES = 63.0  # the perspective camera of MediaPipe's face geometry
OFFICIAL_FOCAL_LENGTH = 4828.598903609935  # pixels, whatever the image size (hello_3dmm)
OFFICIAL_UNITS_PER_CM = 0.01  # the official 3DMM works in metres, MediaPipe's face model in cm
POSE_SQUARE_HALF_SIDE = 0.05  # the drawn square, and the factor the official code shrinks depth and focal by
POSE_LINE_WIDTH = 15
# (RGB colour, corner a, corner b) in drawing order; corners of the square (x, y) in units
# of POSE_SQUARE_HALF_SIDE, y up: left edge green, top blue, right red, bottom magenta.
POSE_SQUARE_CORNERS = np.array([[-1, -1, 0], [-1, 1, 0], [1, 1, 0], [1, -1, 0]], dtype=np.float64)
POSE_EDGES = (((0, 255, 0), 0, 1), ((0, 0, 255), 1, 2), ((255, 0, 0), 2, 3), ((255, 0, 255), 3, 0))

# --- expression coefficients ---------------------------------------------------------------

# The 51 expression coefficients every control net takes (`drive_coeff`): Apple's ARKit
# blendshapes (ARFaceAnchor.BlendShapeLocation, in the order Apple documents) without
# tongueOut, as the official predictor (hello_arkit_blendshape.onnx) gives 51. Its order is not
# published: change this table if the weights say otherwise. Ours come from MediaPipe, which
# scores the same 51 (and `_neutral`).
ARKIT_BLENDSHAPES = (
    "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft", "eyeSquintLeft",
    "eyeWideLeft", "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight", "eyeLookOutRight", "eyeLookUpRight",
    "eyeSquintRight", "eyeWideRight", "jawForward", "jawLeft", "jawRight", "jawOpen", "mouthClose",
    "mouthFunnel", "mouthPucker", "mouthLeft", "mouthRight", "mouthSmileLeft", "mouthSmileRight",
    "mouthFrownLeft", "mouthFrownRight", "mouthDimpleLeft", "mouthDimpleRight", "mouthStretchLeft",
    "mouthStretchRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthPressLeft", "mouthPressRight", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthUpperUpLeft",
    "mouthUpperUpRight", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft",
    "browOuterUpRight", "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "noseSneerLeft",
    "noseSneerRight",
)  # fmt: skip

# --- face parts (official `get_face_parts`) and the PD-FGC crop (`warp_face_pd_fgc`) ------

# The official 5-point template, as fractions of the frame, and the MediaPipe landmarks we put
# on it: nose bridge at eye level, image-left and image-right outer eye corners, image-right
# and image-left mouth corners.
FACE_TEMPLATE = np.array(
    [[0.50951539, 0.40128625], [0.29259476, 0.40203411], [0.72196212, 0.40857479], [0.63420714, 0.71678643], [0.38437035, 0.71723224]]
)
FACE_TEMPLATE_LANDMARKS = (6, 33, 263, 291, 61)
# The three parts, in the official order: the image-left eye with its brow, the image-right
# eye with its brow, the outer lip contour.
FACE_PART_LANDMARKS = (
    (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173, 46, 53, 52, 65, 55, 70, 63, 105, 66, 107),
    (263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398, 276, 283, 282, 295, 285, 300, 293, 334, 296, 336),
    (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409),
)  # fmt: skip
FACE_PART_SIZE = 256
FACE_PART_MARGIN = 1.2  # the square around a part's box over the whole clip is 1.2 x its longer side
CLIP_INPUT_SIZE = 224
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
# PD-FGC template (fractions of the 224 crop): image-left and image-right eye centres, nose
# tip, image-left and image-right mouth corners; MediaPipe's iris centres are the eye centres.
PDFGC_TEMPLATE = np.array([[0.3843, 0.27], [0.62, 0.2668], [0.503, 0.4185], [0.406, 0.5273], [0.5977, 0.525]])
PDFGC_TEMPLATE_LANDMARKS = (468, 473, 1, 61, 291)
PDFGC_SIZE = 224


# ========================================================================================
# Crop
# ========================================================================================


@dataclasses.dataclass(frozen=True)
class SquareCrop:
    """The region [left, left + width) x [top, top + height) of a source frame, resized to
    size x size: a source point (x, y) lands at ((x - left) * size / width, (y - top) * size / height).
    Parts of the region outside the frame (letterbox margins) are black."""

    left: int
    top: int
    width: int
    height: int
    size: int

    @property
    def scale(self) -> np.ndarray:
        return np.array([self.size / self.width, self.size / self.height])

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """(..., 2) or (..., 3) source pixels -> working pixels; a depth column scales with x."""
        mapped = np.array(points, dtype=np.float64)
        mapped[..., 0] = (mapped[..., 0] - self.left) * self.scale[0]
        mapped[..., 1] = (mapped[..., 1] - self.top) * self.scale[1]
        if mapped.shape[-1] > 2:
            mapped[..., 2] *= self.scale[0]
        return mapped

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """A source RGB frame -> the size x size working frame (bicubic, as the official resize)."""
        height, width = frame.shape[:2]
        region = frame[max(self.top, 0) : min(self.top + self.height, height), max(self.left, 0) : min(self.left + self.width, width)]
        margins = (
            max(-self.top, 0),
            max(self.top + self.height - height, 0),
            max(-self.left, 0),
            max(self.left + self.width - width, 0),
        )
        if any(margins):
            region = cv2.copyMakeBorder(region, *margins, cv2.BORDER_CONSTANT, value=0)
        return cv2.resize(region, (self.size, self.size), interpolation=cv2.INTER_CUBIC)


def clip_crop(track: FaceTrack, size: int = WORKING_SIZE) -> SquareCrop:
    """One square for the whole clip, as the official `crop_and_resize(crop=True)`: side 3 x the
    mean (over frames) of the longer side of each frame's face box, centred on the box around
    all frames' faces and lifted by 0.115 x side, then pushed inside the frame."""
    if len(track) == 0:
        raise ValueError("clip_crop needs a track with at least one frame")
    width, height = track.size
    points = track.landmarks[:, FACE_EXTENT_LANDMARKS, :2].astype(np.float64)
    lows, highs = points.min(axis=1), points.max(axis=1)
    side = min((highs - lows).mean(axis=0).max() * CROP_FACE_SCALE, min(width, height) - 1)
    centre = (lows.min(axis=0) + highs.max(axis=0)) * 0.5
    centre[1] -= side * CROP_LIFT
    low, high = centre - side * 0.5, centre + side * 0.5
    below = np.minimum(low, 0.0)
    low, high = low - below, high - below
    frame_end = np.array([width, height], dtype=np.float64)
    beyond = np.where(high >= frame_end, high - (frame_end - 1), 0.0)
    low, high = low - beyond, high - beyond
    centre, square = (low + high) * 0.5, np.floor(high - low).min()
    top_left = (centre - square * 0.5).astype(int)
    bottom_right = (centre + square * 0.5).astype(int)
    (left, top), (right, bottom) = top_left, bottom_right
    return SquareCrop(int(left), int(top), int(right - left), int(bottom - top), size)


def whole_frame(frame_size: tuple[int, int], size: int = WORKING_SIZE) -> SquareCrop:
    """The whole frame letterboxed (centred, black margins) to a square, so faces keep their
    shape; for square frames this is the official `crop=False` resize."""
    width, height = frame_size
    side = max(width, height)
    return SquareCrop((width - side) // 2, (height - side) // 2, side, side, size)


def crop_track(track: FaceTrack, crop: SquareCrop) -> FaceTrack:
    """The track as seen in the working frame. Landmarks are mapped by the crop. Each matrix is
    re-expressed for MediaPipe's camera on the working frame: the head keeps its pixel position
    (mapped by the crop), its apparent size (depth scaled) and its rotation relative to the line
    of sight; `head_pose` of the result is the pose the official 3DMM would see there."""
    focal = _mediapipe_focal(track.size[1])
    rotation, translation = track.matrices[:, :3, :3].astype(np.float64), track.matrices[:, :3, 3].astype(np.float64)
    depth = -translation[:, 2]
    centre = np.array(track.size, dtype=np.float64) * 0.5
    pixel = centre + focal * translation[:, :2] / depth[:, None] * (1, -1)
    working_pixel = crop.map_points(pixel)
    working_focal = _mediapipe_focal(crop.size)
    working_depth = depth * working_focal / (focal * crop.scale.mean())
    working_translation = np.empty_like(translation)
    working_translation[:, :2] = (working_pixel - crop.size * 0.5) * (1, -1) * (working_depth / working_focal)[:, None]
    working_translation[:, 2] = -working_depth
    matrices = np.zeros_like(track.matrices)
    matrices[:, :3, :3] = _line_of_sight(working_translation) @ _line_of_sight(translation).transpose(0, 2, 1) @ rotation
    matrices[:, :3, 3] = working_translation
    matrices[:, 3, 3] = 1
    return dataclasses.replace(track, landmarks=crop.map_points(track.landmarks).astype(np.float32), matrices=matrices, size=(crop.size, crop.size))


# ========================================================================================
# Face patches: what the crops are cut from, kept while the clip is decoded once
# ========================================================================================

# The square kept around each frame's face: 2.5 x the face size (the PD-FGC crop, the widest,
# spans about 2 face sizes below the eyes, turned up to 45 degrees), stored at 448 pixels, which
# is finer than the working frame at any working size up to 512 (3 face sizes in 512 pixels).
PATCH_FACE_SCALE = 2.5
PATCH_SIZE = 448


def face_patch_box(landmarks: np.ndarray | None, frame_size: tuple[int, int]) -> np.ndarray:
    """(left, top, side) in source pixels of the square kept around a face: PATCH_FACE_SCALE x the
    longer side of its box, centred on it; the whole frame (letterboxed) where no face is known."""
    if landmarks is None:
        width, height = frame_size
        side = float(max(width, height))
        return np.array([(width - side) * 0.5, (height - side) * 0.5, side])
    points = landmarks[FACE_EXTENT_LANDMARKS, :2].astype(np.float64)
    low, high = points.min(axis=0), points.max(axis=0)
    side = max((high - low).max() * PATCH_FACE_SCALE, 1.0)
    centre = (low + high) * 0.5
    return np.array([centre[0] - side * 0.5, centre[1] - side * 0.5, side])


def cut_patch(frame: np.ndarray, box: np.ndarray, size: int = PATCH_SIZE) -> np.ndarray:
    """The box of a source RGB frame resized to size x size (bicubic, black outside the frame),
    sampled as `SquareCrop.apply` samples (pixel centres)."""
    left, top, side = box
    step = side / size
    matrix = np.array([[step, 0.0, left + 0.5 * step - 0.5], [0.0, step, top + 0.5 * step - 0.5]])
    return cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP, borderValue=0)


@dataclasses.dataclass
class FacePatches:
    """Per driving frame the square around the face (`face_patch_box`, `cut_patch`): all the
    face-part and PD-FGC crops need of a frame, so the clip is decoded once, while it is tracked,
    before the clip's crop square is known. `order` picks and repeats frames (output timing)
    without copying `pixels`, which may be a memory-mapped file."""

    pixels: np.ndarray  # (n, PATCH_SIZE, PATCH_SIZE, 3) uint8
    boxes: np.ndarray  # (n, 3) float64: left, top, side in source pixels
    order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes) if self.order is None else len(self.order)

    def select(self, indices: np.ndarray) -> FacePatches:
        indices = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(self, order=indices if self.order is None else self.order[indices])

    def working(self, square: SquareCrop) -> Iterator[np.ndarray]:
        """Each frame as `square.apply` would give it, around the face (black beyond the patch)."""
        for index in range(len(self.boxes)) if self.order is None else self.order.tolist():
            yield self.working_frame(index, square)

    def working_frame(self, index: int, square: SquareCrop) -> np.ndarray:
        patch = np.asarray(self.pixels[index])
        left, top, side = self.boxes[index]
        to_patch = len(patch) / side
        step_x, step_y = square.width / square.size, square.height / square.size
        matrix = np.array(
            [
                [step_x * to_patch, 0.0, (square.left - left + 0.5 * step_x) * to_patch - 0.5],
                [0.0, step_y * to_patch, (square.top - top + 0.5 * step_y) * to_patch - 0.5],
            ]
        )
        flags = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
        return cv2.warpAffine(patch, matrix, (square.size, square.size), flags=flags, borderValue=0)


# ========================================================================================
# Head pose and condition images
# ========================================================================================


def _mediapipe_focal(frame_height: int) -> float:
    return frame_height * 0.5 / math.tan(math.radians(MEDIAPIPE_VERTICAL_FOV_DEGREES) * 0.5)


def _line_of_sight(translation: np.ndarray) -> np.ndarray:
    """(n, 3) head positions -> (n, 3, 3) the smallest rotations turning the camera's axis
    (0, 0, -1) towards each head: a camera pointed at the head, as an aligned face crop is."""
    forward = np.array([0.0, 0.0, -1.0])
    direction = translation / np.linalg.norm(translation, axis=1, keepdims=True)
    axis = np.cross(forward, direction)
    sine, cosine = np.linalg.norm(axis, axis=1), direction @ forward
    skew = np.zeros((len(direction), 3, 3))
    skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    skew -= skew.transpose(0, 2, 1)
    # Rodrigues with the unnormalised axis: I + K + K^2 (1 - cos) / sin^2
    factor = np.where(sine > 1e-12, (1 - cosine) / np.maximum(sine, 1e-12) ** 2, 0.5)
    return np.eye(3) + skew + skew @ skew * factor[:, None, None]


def angles_to_rotation(angles: np.ndarray) -> np.ndarray:
    """(n, 3) official (pitch, yaw, roll) in radians -> (n, 3, 3) rotations Rz(roll) Ry(yaw) Rx(pitch)
    acting on column vectors (the official `compute_rotation_matrix`, transposed back)."""
    angles = np.asarray(angles, dtype=np.float64)
    (sx, sy, sz), (cx, cy, cz) = np.sin(angles).T, np.cos(angles).T
    zeros, ones = np.zeros_like(sx), np.ones_like(sx)
    rx = np.stack([ones, zeros, zeros, zeros, cx, -sx, zeros, sx, cx], axis=1).reshape(-1, 3, 3)
    ry = np.stack([cy, zeros, sy, zeros, ones, zeros, -sy, zeros, cy], axis=1).reshape(-1, 3, 3)
    rz = np.stack([cz, -sz, zeros, sz, cz, zeros, zeros, zeros, ones], axis=1).reshape(-1, 3, 3)
    return rz @ ry @ rx


def rotation_to_angles(rotation: np.ndarray) -> np.ndarray:
    """(n, 3, 3) -> (n, 3) official (pitch, yaw, roll): the inverse of `angles_to_rotation`,
    yaw in [-pi/2, pi/2]."""
    pitch = np.arctan2(rotation[:, 2, 1], rotation[:, 2, 2])
    yaw = np.arcsin(np.clip(-rotation[:, 2, 0], -1.0, 1.0))
    roll = np.arctan2(rotation[:, 1, 0], rotation[:, 0, 0])
    return np.stack([pitch, yaw, roll], axis=1)


def head_pose(track: FaceTrack) -> tuple[np.ndarray, np.ndarray]:
    """Per frame the official 3DMM pose for the track's frames: (n, 3) angles (pitch down,
    yaw to the subject's left, roll counter-clockwise on screen; radians) relative to the line
    of sight, and (n, 3) translations in metres for a pinhole camera of focal length
    OFFICIAL_FOCAL_LENGTH pixels centred on the frame (x right, y up, z towards the viewer).
    Both cameras, MediaPipe's and the official one, use these axes (derivation: docs/signals.md)."""
    rotation, translation = track.matrices[:, :3, :3].astype(np.float64), track.matrices[:, :3, 3].astype(np.float64)
    angles = rotation_to_angles(_line_of_sight(translation).transpose(0, 2, 1) @ rotation)
    # Same image position and size under the longer official focal length: depth scales with it.
    official = translation * OFFICIAL_UNITS_PER_CM
    official[:, 2] *= OFFICIAL_FOCAL_LENGTH / _mediapipe_focal(track.size[1])
    return angles, official


def pose_square(angles: np.ndarray, translation: np.ndarray, size: int) -> np.ndarray:
    """(4, 2) pixel corners of the square the official `get_project_points_rect` draws for one
    pose: a square of half side 0.05 at the head, rotated, with depth and focal length shrunk
    20 times (which exaggerates perspective), projected, y flipped to image rows."""
    corners = POSE_SQUARE_CORNERS * POSE_SQUARE_HALF_SIDE @ angles_to_rotation(np.asarray(angles)[None])[0].T
    points = corners + np.asarray(translation, dtype=np.float64) * (1, 1, POSE_SQUARE_HALF_SIDE)
    focal = OFFICIAL_FOCAL_LENGTH * POSE_SQUARE_HALF_SIDE
    projected = focal * points[:, :2] / -points[:, 2:] + size * 0.5
    projected[:, 1] = size - projected[:, 1]
    return projected


def render_conditions(angles: np.ndarray, translations: np.ndarray, size: int = WORKING_SIZE) -> torch.Tensor:
    """(f, 3) angles and (f, 3) translations -> (3, f, size, size) float32 condition images in
    [-1, 1]: the pose square's edges, 15 px wide, on black (official `gen_control_heatmaps`)."""
    images = np.zeros((len(angles), size, size, 3), dtype=np.uint8)
    for image, angle, translation in zip(images, angles, translations):
        corners = pose_square(angle, translation, size).astype(np.int32)
        for colour, start, end in POSE_EDGES:
            cv2.line(image, tuple(corners[start].tolist()), tuple(corners[end].tolist()), colour, POSE_LINE_WIDTH)
    return (torch.from_numpy(images).float() / 127.5 - 1.0).permute(3, 0, 1, 2).contiguous()


# ========================================================================================
# Expression coefficients
# ========================================================================================

_ARKIT_SOURCE = np.array([BLENDSHAPE_NAMES.index(name) for name in ARKIT_BLENDSHAPES])


def arkit_coefficients(blendshapes: np.ndarray) -> np.ndarray:
    """(n, 52) MediaPipe scores (`_neutral`, then the 51 by name) -> (n, 51) float32
    coefficients in ARKIT_BLENDSHAPES order."""
    return blendshapes[:, _ARKIT_SOURCE].astype(np.float32)


# ========================================================================================
# Face parts and PD-FGC crops
# ========================================================================================


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The (2, 3) rotation + uniform scale + shift mapping `source` points closest (least
    squares, Umeyama 1991) onto `target` points, as the official `umeyama(..., True)`."""
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_centred, target_centred = source - source_mean, target - target_mean
    u, singular, vt = np.linalg.svd(target_centred.T @ source_centred / len(source))
    signs = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ np.diag(signs) @ vt
    scale = (singular * signs).sum() / source_centred.var(axis=0).sum()
    return np.hstack([scale * rotation, (target_mean - scale * rotation @ source_mean)[:, None]])


def _transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return points[..., :2] @ matrix[:, :2].T + matrix[:, 2]


def face_alignments(landmarks: np.ndarray, size: int = WORKING_SIZE) -> np.ndarray:
    """(n, 478, 2+) working-frame landmarks -> (n, 2, 3) similarities putting each face on the
    official 5-point template scaled to the working frame."""
    target = FACE_TEMPLATE * size
    return np.stack([similarity_transform(points[FACE_TEMPLATE_LANDMARKS, :2].astype(np.float64), target) for points in landmarks])


def face_part_windows(landmarks: np.ndarray, alignments: np.ndarray) -> np.ndarray:
    """(3, 2, 3) maps from the aligned frame to each part's 256 x 256 crop: one square per part
    for the whole clip, 1.2 x the longer side of the part's box over all aligned frames."""
    aligned = np.stack([_transform_points(points.astype(np.float64), matrix) for points, matrix in zip(landmarks, alignments)])
    windows = []
    for part in FACE_PART_LANDMARKS:
        points = aligned[:, part]
        low, high = points.min(axis=(0, 1)), points.max(axis=(0, 1))
        centre, scale = (low + high) * 0.5, FACE_PART_SIZE / ((high - low).max() * FACE_PART_MARGIN)
        windows.append([[scale, 0.0, FACE_PART_SIZE * 0.5 - scale * centre[0]], [0.0, scale, FACE_PART_SIZE * 0.5 - scale * centre[1]]])
    return np.array(windows)


def face_part_crops(frame: np.ndarray, alignment: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """A working RGB frame -> (3, 256, 256, 3) uint8 part crops: aligned to the template
    (bilinear), cut by each window (bilinear), 5 x 5 Gaussian blur, as `get_face_parts`."""
    size = frame.shape[1], frame.shape[0]
    aligned = cv2.warpAffine(frame, alignment, size)
    return np.stack(
        [cv2.GaussianBlur(cv2.warpAffine(aligned, window, (FACE_PART_SIZE, FACE_PART_SIZE)), (5, 5), 0) for window in windows]
    )


def pdfgc_crop(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """A working RGB frame -> the 224 x 224 face on the PD-FGC 5-point template (bicubic), as
    the official `warp_face_pd_fgc`."""
    matrix = similarity_transform(landmarks[PDFGC_TEMPLATE_LANDMARKS, :2].astype(np.float64), PDFGC_TEMPLATE * PDFGC_SIZE)
    return cv2.warpAffine(frame, matrix, (PDFGC_SIZE, PDFGC_SIZE), flags=cv2.INTER_CUBIC)


# ========================================================================================
# Encoders
# ========================================================================================


@torch.no_grad()
def encode_face_parts(image_encoder: CLIPVisionModelWithProjection, crops: np.ndarray, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """(n, 3, 256, 256, 3) uint8 part crops -> (n, 3, 1024) float32 CPU CLIP image embeddings
    (`image_embeds` of a CLIPVisionModelWithProjection), preprocessed as the official
    `clip_preprocess_from_bgr`: bicubic resize to 224, /255, OpenAI CLIP mean and std."""
    frames, parts = crops.shape[:2]
    resized = np.stack([cv2.resize(crop, (CLIP_INPUT_SIZE, CLIP_INPUT_SIZE), interpolation=cv2.INTER_CUBIC) for crop in crops.reshape(-1, *crops.shape[2:])])
    pixels = (resized / 255.0 - CLIP_MEAN) / CLIP_STD
    pixel_values = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device=device, dtype=dtype)
    embeddings = image_encoder(pixel_values=pixel_values).image_embeds
    return embeddings.float().cpu().reshape(frames, parts, -1)


def _pdfgc_input(crops: np.ndarray, fan_encoder: FanEncoder) -> torch.Tensor:
    """uint8 RGB -> [-1, 1] NCHW on the encoder's device, as the official `image_preprocess`."""
    return torch.from_numpy(crops / 127.5 - 1.0).permute(0, 3, 1, 2).to(device=fan_encoder.device, dtype=fan_encoder.dtype)


@torch.no_grad()
def encode_pdfgc(fan_encoder: FanEncoder, crops: np.ndarray) -> torch.Tensor:
    """(n, 224, 224, 3) uint8 aligned faces -> (n, 548) float32 CPU PD-FGC motion embeddings."""
    return fan_encoder(_pdfgc_input(crops, fan_encoder)).float().cpu()


@torch.no_grad()
def pdfgc_unconditional(fan_encoder: FanEncoder) -> torch.Tensor:
    """(1, 1, 548): the embedding of an all-black face (-1 everywhere), the official `neg_pd_fpg`."""
    black = np.zeros((1, PDFGC_SIZE, PDFGC_SIZE, 3), dtype=np.uint8)
    return fan_encoder(_pdfgc_input(black, fan_encoder)).float().cpu()[None]


# ========================================================================================
# The clip's signals
# ========================================================================================


@dataclasses.dataclass
class ReferenceFace:
    """The reference portrait in the working frame."""

    image: np.ndarray  # (size, size, 3) uint8 RGB, what the VAE encodes
    track: FaceTrack  # one frame, in working-frame coordinates
    translation: np.ndarray  # (3,) official translation: where the pose square is drawn
    crop: SquareCrop  # where the working frame lies in the original picture


def prepare_reference(image: np.ndarray, track: FaceTrack, size: int = WORKING_SIZE, crop: bool = True) -> ReferenceFace:
    """Crop (3 x face size, as the official "crop reference" option) or letterbox the portrait."""
    square = clip_crop(track, size) if crop else whole_frame(track.size, size)
    working = crop_track(track, square)
    return ReferenceFace(square.apply(image), working, head_pose(working)[1][0], square)


@dataclasses.dataclass
class DrivingSignals:
    """Everything the control nets take for one driving clip, compact per frame.

    angles, translations: (n, 3) official head pose of each working frame (`head_pose`)
    reference_translation: (3,) where the reference's head is; the square is drawn there
    drive_coeff: (n, 51) float32 ARKit coefficients
    face_parts: (n, 3, 1024) CLIP embeddings (HMControlNet), None when not computed
    pd_fpg: (n, 548) PD-FGC embeddings and neg_pd_fpg (1, 1, 548) (HMControlNet2), or None
    trans_ratio: how much of the driving head's movement (from the first frame) moves the square
    """

    angles: np.ndarray
    translations: np.ndarray
    reference_translation: np.ndarray
    drive_coeff: np.ndarray
    face_parts: torch.Tensor | None = None
    pd_fpg: torch.Tensor | None = None
    neg_pd_fpg: torch.Tensor | None = None
    size: int = WORKING_SIZE
    trans_ratio: float = 0.0

    def __len__(self) -> int:
        return len(self.angles)

    def control_inputs(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Frames [start, stop) as the control nets' float32 CPU inputs, batch 1, named as in the
        conformance data: condition (1, 3, f, H, W); with face parts drive_coeff (1, f, 51) and
        face_parts (1, f, 3, 1024); with PD-FGC pd_fpg (1, f, 548) and neg_pd_fpg (1, 1, 548)."""
        if not 0 <= start < stop <= len(self):
            raise ValueError(f"frame range [{start}, {stop}) is not inside the clip's {len(self)} frames")
        movement = (self.translations[start:stop] - self.translations[0]) * self.trans_ratio
        inputs = {"condition": render_conditions(self.angles[start:stop], self.reference_translation + movement, self.size)[None]}
        if self.face_parts is not None:
            inputs["drive_coeff"] = torch.from_numpy(self.drive_coeff[start:stop])[None]
            inputs["face_parts"] = self.face_parts[start:stop][None]
        if self.pd_fpg is not None:
            inputs["pd_fpg"] = self.pd_fpg[start:stop][None]
            inputs["neg_pd_fpg"] = self.neg_pd_fpg
        return inputs


def _batches(frames: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    batch = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def build_driving_signals(
    track: FaceTrack,
    frames: Iterable[np.ndarray] | FacePatches,
    reference: ReferenceFace,
    *,
    image_encoder: CLIPVisionModelWithProjection | None = None,
    fan_encoder: FanEncoder | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    crop: bool = True,
    trans_ratio: float = 0.0,
    batch_frames: int = 16,
    progress: ProgressCallback = no_progress,
) -> DrivingSignals:
    """The driving clip's signals. `frames` (source RGB frames, or their FacePatches, the track's
    frames in order) are read once, `batch_frames` at a time, only when an encoder is given:
    `image_encoder` (CLIP) gives face_parts for HMControlNet, `fan_encoder` (PD-FGC) gives pd_fpg
    for HMControlNet2."""
    square = clip_crop(track, reference.crop.size) if crop else whole_frame(track.size, reference.crop.size)
    working = crop_track(track, square)
    angles, translations = head_pose(working)
    signals = DrivingSignals(angles, translations, reference.translation, arkit_coefficients(working.blendshapes), size=square.size, trans_ratio=trans_ratio)
    if image_encoder is None and fan_encoder is None:
        return signals
    if image_encoder is not None:
        alignments = face_alignments(working.landmarks, square.size)
        windows = face_part_windows(working.landmarks, alignments)
    part_embeddings, motion_embeddings, done = [], [], 0
    progress(ProgressEvent("driving signals", 0, len(track), unit="frame"))
    working_frames = frames.working(square) if isinstance(frames, FacePatches) else (square.apply(frame) for frame in frames)
    for images in _batches(working_frames, batch_frames):
        indices = range(done, done + len(images))
        if indices.stop > len(track):
            raise ValueError(f"the driving clip has more frames than its face track ({len(track)})")
        if image_encoder is not None:
            crops = np.stack([face_part_crops(image, alignments[i], windows) for image, i in zip(images, indices)])
            part_embeddings.append(encode_face_parts(image_encoder, crops, device, dtype))
        if fan_encoder is not None:
            crops = np.stack([pdfgc_crop(image, working.landmarks[i]) for image, i in zip(images, indices)])
            motion_embeddings.append(encode_pdfgc(fan_encoder, crops))
        done = indices.stop
        progress(ProgressEvent("driving signals", done, len(track), unit="frame"))
    if done != len(track):
        raise ValueError(f"the driving clip has {done} frames but its face track has {len(track)}")
    if image_encoder is not None:
        signals.face_parts = torch.cat(part_embeddings)
    if fan_encoder is not None:
        signals.pd_fpg = torch.cat(motion_embeddings)
        signals.neg_pd_fpg = pdfgc_unconditional(fan_encoder)
    return signals
