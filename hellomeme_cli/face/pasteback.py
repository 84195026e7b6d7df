"""Paste-back: each generated working frame put back into the original reference picture.

The pipeline animates a size x size square around the face (`ReferenceFace.crop`); a meme
template keeps its text, frame and background outside it. `PasteBack` prepares once per clip
a feathered mask over the head (the face oval grown to take in hair and neck, confined to the
inside of the crop) and a colour correction measured where the mask falls from 1 to 0; per
frame it only resizes, corrects and blends inside the mask's bounding box. docs/pasteback.md
explains the choices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator

import cv2
import numpy as np

from hellomeme_cli.errors import HellomemeError

from hellomeme_cli.face.signals import DrivingSignals, ReferenceFace, SquareCrop, pose_square

# MediaPipe's face oval (FACE_LANDMARKS_FACE_OVAL), in order round the face; 10 is the top of
# the forehead, 152 the chin.
FACE_OVAL_LANDMARKS = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip
FOREHEAD_LANDMARK, CHIN_LANDMARK = 10, 152

# The head region, taken whole from the generated frame: the face oval stretched about its
# centre along the face's own axes (so a tilted head gets a tilted region). Sideways and up it
# takes in the hair and ears, down the jaw's shadow and the top of the neck.
HEAD_GROWTH_SIDEWAYS = 1.5
HEAD_GROWTH_UP = 1.6
HEAD_GROWTH_DOWN = 1.4
# Beyond the head region the mask falls smoothly from 1 to 0 over this many face sizes.
FEATHER = 0.25
# The outer border of the crop (a fraction of its side) is never touched: the diffusion
# model's frame edges are its weakest pixels, and a seam there would be a straight line.
CROP_BORDER = 0.03

# Colour matching works on a coarse grid over the pasted box: cells of FEATHER / COLOUR_CELLS
# and a Gaussian of COLOUR_BLUR x the feather width, so only low frequencies are corrected.
COLOUR_CELLS = 6
COLOUR_BLUR = 0.5


@dataclasses.dataclass(frozen=True)
class Box:
    """Rows [top, bottom) and columns [left, right) of the picture."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.bottom), slice(self.left, self.right)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as OpenCV takes sizes."""
        return self.right - self.left, self.bottom - self.top


class PasteBack:
    """Puts generated frames back into `picture` (H, W, 3 uint8 RGB) where `crop` took the working
    square from; `landmarks` (478, 2+) are the reference face's in picture pixels. `travel`
    (working pixels) widens the head region by how far the generated head may move
    (`head_travel`); `match_colours=False` pastes the generated colours as they are. Frames are
    `frame_scale` times the working size (2 after `--upscale 2`)."""

    def __init__(
        self, picture: np.ndarray, crop: SquareCrop, landmarks: np.ndarray, *, travel: float = 0.0, match_colours: bool = True, frame_scale: int = 1
    ):
        if picture.ndim != 3 or picture.shape[2] != 3 or picture.dtype != np.uint8:
            raise ValueError(f"the picture must be (H, W, 3) uint8, not {picture.shape} {picture.dtype}")
        height, width = picture.shape[:2]
        work = Box(max(crop.top, 0), max(crop.left, 0), min(crop.top + crop.height, height), min(crop.left + crop.width, width))
        if work.bottom <= work.top or work.right <= work.left:
            raise ValueError(f"the crop {crop} does not overlap the {width} x {height} picture")
        self.picture, self.crop = picture, crop
        self.frame_size = crop.size * frame_scale
        self._interpolation = cv2.INTER_AREA if crop.width * crop.height < self.frame_size**2 else cv2.INTER_CUBIC

        head, face_size = _head_region(np.asarray(landmarks, dtype=np.float64)[:, :2])
        unit = min(face_size, min(crop.width, crop.height) / 3)  # a face filling the crop still gets a border
        self.feather = max(FEATHER * unit, 2.0)
        inset = CROP_BORDER * min(crop.width, crop.height) + self.feather
        allowed = _head_mask(head, work, travel * crop.width / crop.size)
        confined = np.zeros_like(allowed)
        inner = _inner_part(crop, work, inset)
        confined[inner] = allowed[inner]
        if not confined.any():
            raise HellomemeError("--paste-back: the face is too close to the picture's edge to blend it back (crop it with more margin, or leave --paste-back out)")
        outside = cv2.distanceTransform(1 - confined, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        alpha = _smoothstep(1.0 - outside / self.feather)

        left, top, box_width, box_height = cv2.boundingRect((alpha > 0).astype(np.uint8))
        self.box = Box(work.top + top, work.left + left, work.top + top + box_height, work.left + left + box_width)
        local = (slice(top, top + box_height), slice(left, left + box_width))
        self._alpha = np.ascontiguousarray(alpha[local])
        self._beta = 1.0 - self._alpha
        self._original = np.ascontiguousarray(picture[self.box.slices])
        self._colour: _ColourMatch | None = None
        if match_colours:
            inward = cv2.distanceTransform(confined, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[local]
            self._colour = _ColourMatch(self._original, self._alpha, _smoothstep(1.0 - inward / self.feather), self.feather)

    @classmethod
    def from_reference(
        cls, picture: np.ndarray, reference: ReferenceFace, *, travel: float = 0.0, match_colours: bool = True, frame_scale: int = 1
    ) -> PasteBack:
        """For the picture `reference` was prepared from (`prepare_reference(picture, ...)`)."""
        crop = reference.crop
        working = reference.track.landmarks[0, :, :2].astype(np.float64)
        landmarks = working / crop.scale + (crop.left, crop.top)
        return cls(picture, crop, landmarks, travel=travel, match_colours=match_colours, frame_scale=frame_scale)

    @property
    def alpha(self) -> np.ndarray:
        """(H, W) float32 mask over the picture: 1 where the generated frame is taken whole, 0 where
        the picture is kept exactly."""
        full = np.zeros(self.picture.shape[:2], dtype=np.float32)
        full[self.box.slices] = self._alpha
        return full

    def paste(self, frame: np.ndarray) -> np.ndarray:
        """One generated (frame_size, frame_size, 3) uint8 frame -> a new picture-sized frame."""
        if frame.shape != (self.frame_size, self.frame_size, 3) or frame.dtype != np.uint8:
            raise ValueError(f"generated frames must be ({self.frame_size}, {self.frame_size}, 3) uint8, not {frame.shape} {frame.dtype}")
        resized = cv2.resize(frame, (self.crop.width, self.crop.height), interpolation=self._interpolation)
        generated = resized[self.box.top - self.crop.top : self.box.bottom - self.crop.top, self.box.left - self.crop.left : self.box.right - self.crop.left]
        if self._colour is not None:
            generated = cv2.add(generated, self._colour.correction(generated), dtype=cv2.CV_8U)
        output = self.picture.copy()
        output[self.box.slices] = cv2.blendLinear(generated, self._original, self._alpha, self._beta)
        return output

    def __call__(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Streams: each frame is pasted when it is asked for."""
        for frame in frames:
            yield self.paste(frame)


class _ColourMatch:
    """The generated frame's low-frequency colour error, measured in the band where the mask falls
    from 1 to 0 (the seam) against the original picture.

    The error's per-channel median over the band is removed everywhere (a colour cast of the VAE
    or the checkpoint, so the face gets it too); what is left varies across the band and is
    removed near and in the band only (`local` weight 1 there, 0 deep inside the head), so the
    face is not tinted by the background's local differences."""

    def __init__(self, original: np.ndarray, alpha: np.ndarray, local: np.ndarray, feather: float):
        height, width = alpha.shape
        cell = max(feather / COLOUR_CELLS, 1.0)
        self.grid = (max(round(width / cell), 1), max(round(height / cell), 1))
        self.box_size = (width, height)
        self.sigma = COLOUR_BLUR * feather / cell
        band = ((alpha > 0) & (alpha < 1)).astype(np.float32)
        self.original = cv2.resize(original, self.grid, interpolation=cv2.INTER_AREA).astype(np.float32)
        self.band = cv2.resize(band, self.grid, interpolation=cv2.INTER_AREA)[..., None]
        self.in_band = self.band[..., 0] > 0.5
        if not self.in_band.any():  # a band thinner than a cell: use every cell it touches
            self.in_band = self.band[..., 0] > 0
        coverage = self._blur(self.band)
        self.inverse_coverage = np.where(coverage > 1e-3, 1.0 / np.maximum(coverage, 1e-3), 0.0).astype(np.float32)
        self.local = cv2.resize(local.astype(np.float32), self.grid, interpolation=cv2.INTER_AREA)[..., None]

    def _blur(self, image: np.ndarray) -> np.ndarray:
        blurred = cv2.GaussianBlur(image, (0, 0), self.sigma, borderType=cv2.BORDER_CONSTANT)
        return blurred.reshape(image.shape)

    def correction(self, generated: np.ndarray) -> np.ndarray:
        """(h, w, 3) float32 to add to the generated pixels of the box."""
        error = self.original - cv2.resize(generated, self.grid, interpolation=cv2.INTER_AREA).astype(np.float32)
        cast = np.median(error[self.in_band], axis=0).astype(np.float32)
        varying = self._blur((error - cast) * self.band) * self.inverse_coverage
        coarse = cast + varying * self.local
        return cv2.resize(coarse, self.box_size, interpolation=cv2.INTER_LINEAR).reshape(self.box_size[1], self.box_size[0], 3)


def head_travel(signals: DrivingSignals) -> float:
    """How far (working pixels) `trans_ratio` moves the generated head from the reference's place
    over the clip: the largest shift of the pose square's centre (0 when trans_ratio is 0)."""
    if signals.trans_ratio == 0 or len(signals) == 0:
        return 0.0
    level = np.zeros(3)
    home = pose_square(level, signals.reference_translation, signals.size).mean(axis=0)
    movements = (signals.translations - signals.translations[0]) * signals.trans_ratio
    centres = np.array([pose_square(level, signals.reference_translation + movement, signals.size).mean(axis=0) for movement in movements])
    return float(np.linalg.norm(centres - home, axis=1).max())


def _head_region(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """The face oval stretched into the head region ((k, 2) picture points round it) and the
    face size (the oval's longer side) in picture pixels."""
    top, chin = landmarks[FOREHEAD_LANDMARK], landmarks[CHIN_LANDMARK]
    centre, up = (top + chin) * 0.5, top - chin
    up /= max(np.linalg.norm(up), 1e-9)
    sideways = np.array([-up[1], up[0]])
    oval = landmarks[list(FACE_OVAL_LANDMARKS)] - centre
    across, along = oval @ sideways, oval @ up
    face_size = max(np.ptp(across), np.ptp(along))
    across = across * HEAD_GROWTH_SIDEWAYS
    along = along * np.where(along > 0, HEAD_GROWTH_UP, HEAD_GROWTH_DOWN)
    return centre + across[:, None] * sideways + along[:, None] * up, float(face_size)


def _inner_part(crop: SquareCrop, work: Box, inset: float) -> tuple[slice, slice]:
    """Rows and columns of `work` at least `inset` pixels inside the crop's edges."""
    rows = (math.ceil(crop.top + inset) - work.top, math.floor(crop.top + crop.height - inset) - work.top)
    columns = (math.ceil(crop.left + inset) - work.left, math.floor(crop.left + crop.width - inset) - work.left)
    return slice(max(rows[0], 0), max(rows[1], 0)), slice(max(columns[0], 0), max(columns[1], 0))


def _head_mask(head: np.ndarray, work: Box, margin: float) -> np.ndarray:
    """uint8 mask over `work`: 1 inside the head region's convex hull grown by `margin` pixels."""
    mask = np.zeros((work.bottom - work.top, work.right - work.left), dtype=np.uint8)
    hull = cv2.convexHull(np.round((head - (work.left, work.top)) * 16).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 1, lineType=cv2.LINE_8, shift=4)
    if margin >= 0.5:
        distance = cv2.distanceTransform(1 - mask, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        mask = (distance <= margin).astype(np.uint8)
    return mask


def _smoothstep(t: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, 3t^2 - 2t^3 between: a ramp with no kink at either end."""
    t = np.clip(t, 0.0, 1.0).astype(np.float32)
    return t * t * (3.0 - 2.0 * t)
