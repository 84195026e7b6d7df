"""Face tracking over a clip with MediaPipe Face Landmarker: one subject, every frame, gaps filled."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Sized
from pathlib import Path

import numpy as np

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.logs import native_stderr_muted
from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress
from hellomeme_cli.media.video import VideoInfo, probe_video, read_frames, read_image
from hellomeme_cli.weights.cache import WeightCache

LANDMARK_COUNT = 478
MODEL_COMPONENT = "face_landmarker"
MODEL_FILE = "face_landmarker.task"
# More than one: a second person is seen and told apart rather than silently swapped in, and
# MediaPipe then runs its detector on every frame instead of only following the last landmarks,
# which keeps faces it would otherwise drop for a frame (nice.mp4 frame 25).
MAX_FACES = 4
# Below this overlap with the subject's last box a face is someone else (or a false detection).
# A head moving fast at 15 fps still overlaps its previous box by ~0.5.
SAME_FACE_MIN_IOU = 0.3
# MediaPipe's pose translation is in centimetres; smoothing measures it in face sizes of about this.
FACE_SIZE_CM = 15.0

# MediaPipe's blendshape categories, in the order the model outputs them (`_neutral` + 51 ARKit names).
BLENDSHAPE_NAMES: tuple[str, ...] = (
    "_neutral",
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight",
    "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft", "eyeLookDownRight", "eyeLookInLeft", "eyeLookInRight",
    "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft", "eyeLookUpRight", "eyeSquintLeft", "eyeSquintRight",
    "eyeWideLeft", "eyeWideRight",
    "jawForward", "jawLeft", "jawOpen", "jawRight",
    "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft", "mouthFrownRight", "mouthFunnel",
    "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthPressLeft", "mouthPressRight", "mouthPucker",
    "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper", "mouthSmileLeft",
    "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight", "mouthUpperUpLeft", "mouthUpperUpRight",
    "noseSneerLeft", "noseSneerRight",
)  # fmt: skip


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

    @property
    def filled_count(self) -> int:
        """How many frames had no face of the subject and were filled from their neighbours."""
        return int(self.filled.sum())

    def blendshape(self, name: str) -> np.ndarray:
        """One blendshape's score over the clip, by its MediaPipe name (e.g. "jawOpen")."""
        return self.blendshapes[:, BLENDSHAPE_NAMES.index(name)]


@dataclasses.dataclass(frozen=True)
class Smoothing:
    """One Euro filter settings (Casiez et al., CHI 2012) for landmarks and head pose.

    Units are face sizes (landmarks divided by the subject's median face size) and seconds, so the
    same settings work at any resolution and frame rate. min_cutoff (Hz) sets how much a still face
    is steadied; beta raises the cutoff with speed (per face size per second) so real motion is
    followed; d_cutoff (Hz) smooths the speed estimate itself. The filter runs forwards and
    backwards over the clip and averages the two, so it adds no lag. The defaults were tuned on the
    test clips (docs/tracking.md): a still face wobbles 0.10 px instead of 0.28, a 30-degree
    head turn is followed within 1 degree.

    `pose` and `expression` are strengths (0: off, 1: these settings, 2: the cutoffs halved, ...)
    for the head pose and for what carries the expression (landmarks, blendshape scores).
    """

    min_cutoff: float = 1.0
    beta: float = 10.0
    d_cutoff: float = 1.0
    pose: float = 1.0
    expression: float = 1.0

    def scaled(self, strength: float) -> "Smoothing | None":
        """The filter at `strength` (min_cutoff and beta divided by it); None for 0."""
        if strength <= 0:
            return None
        return dataclasses.replace(self, min_cutoff=self.min_cutoff / strength, beta=self.beta / strength)


@dataclasses.dataclass(frozen=True)
class _Face:
    """One face MediaPipe found in one frame, in pixels."""

    landmarks: np.ndarray
    blendshapes: np.ndarray
    matrix: np.ndarray

    @property
    def box(self) -> tuple[float, float, float, float]:
        (x0, y0), (x1, y1) = self.landmarks[:, :2].min(axis=0), self.landmarks[:, :2].max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)


def default_model_path(cache: WeightCache | None = None) -> Path:
    """The face landmarker model in the weight cache; a one-line error saying how to get it when absent."""
    cache = cache or WeightCache()
    return cache.require([MODEL_COMPONENT])[MODEL_COMPONENT] / MODEL_FILE


def track_video(
    source: Path | VideoInfo | Iterable[np.ndarray],
    *,
    fps: float | None = None,
    name: str | None = None,
    face_index: int = 0,
    smoothing: Smoothing | None = Smoothing(),
    max_frames: int | None = None,
    model_path: Path | None = None,
    progress: ProgressCallback = no_progress,
    each_frame: Callable[[np.ndarray, np.ndarray | None], None] | None = None,
    audio_to: Path | None = None,
) -> FaceTrack:
    """Track one subject through a clip: every frame gets a row, frames without the face are filled.

    `source` is a video file, a probed one (`VideoInfo`: decoded without probing again), or RGB uint8
    frames with their `fps` (for callers that already decode; `name` is how errors refer to them).
    The subject is the `face_index`-th largest face in the first frame that has a face; later frames
    follow it by overlap with its previous box. `each_frame(frame, landmarks)` is called while each
    frame is in memory, with the subject's raw landmarks there (where it was last seen if not in this
    frame, None before it is first seen), so a caller can keep what it needs without a second decode.
    `audio_to`: the same decode writes the clip's audio there (`read_frames`).
    """
    if isinstance(source, (str, Path, VideoInfo)):
        info = source if isinstance(source, VideoInfo) else probe_video(Path(source))
        fps, frames, label = info.fps, read_frames(info, max_frames, audio_to=audio_to), name or str(info.path)
        total = info.frame_count if max_frames is None else min(max_frames, info.frame_count)
    else:
        if not fps or fps <= 0:
            raise ValueError("track_video needs the fps of frames given directly")
        frames, label = itertools.islice(source, max_frames), name or "the frames"
        total = len(source) if isinstance(source, Sized) else None
        if total is not None and max_frames is not None:
            total = min(total, max_frames)

    subject: list[_Face | None] = []
    last: _Face | None = None
    size: tuple[int, int] | None = None
    with _landmarker(model_path, video=True, num_faces=max(MAX_FACES, face_index + 1)) as landmarker:
        timestamp = -1
        for index, frame in enumerate(frames):
            if size not in (None, (frame.shape[1], frame.shape[0])):
                raise HellomemeError(f"{label}: frame {index} is {frame.shape[1]}x{frame.shape[0]}, frame 0 was {size[0]}x{size[1]}")
            size = (frame.shape[1], frame.shape[0])
            # MediaPipe wants strictly increasing milliseconds, even above 1000 fps.
            timestamp = max(timestamp + 1, round(index * 1000 / fps))
            faces = _faces(landmarker.detect_for_video(_mp_image(frame), timestamp), size)
            subject.append(_follow(last, faces, face_index, label, index))
            last = subject[-1] or last
            if each_frame is not None:
                each_frame(frame, None if last is None else last.landmarks)
            progress(ProgressEvent("tracking", index + 1, total, unit="frames"))
    if not subject:
        raise HellomemeError(f"{label}: no frames to track")
    if all(face is None for face in subject):
        raise HellomemeError(f"{label}: no face found in any of its {len(subject)} frames")
    track = _filled_track(subject, fps, size)
    return smooth_track(track, smoothing) if smoothing is not None else track


def track_image(
    source: Path | np.ndarray, *, face_index: int = 0, name: str | None = None, model_path: Path | None = None
) -> FaceTrack:
    """The `face_index`-th largest face of one image, as a one-row FaceTrack (fps 0)."""
    if isinstance(source, (str, Path)):
        image, label = read_image(Path(source)), name or str(source)
    else:
        image, label = source, name or "the image"
    size = (image.shape[1], image.shape[0])
    with _landmarker(model_path, video=False, num_faces=max(MAX_FACES, face_index + 1)) as landmarker:
        faces = _by_size(_faces(landmarker.detect(_mp_image(image)), size))
    if not faces:
        raise HellomemeError(f"{label}: no face found")
    if face_index >= len(faces):
        raise HellomemeError(f"{label}: face {face_index} asked for, but only {len(faces)} face(s) found")
    return _filled_track([faces[face_index]], 0.0, size)


# -- MediaPipe ---------------------------------------------------------------


@contextlib.contextmanager
def _landmarker(model_path: Path | None, *, video: bool, num_faces: int) -> Iterator[object]:
    from mediapipe.tasks.python import BaseOptions, vision

    model_path = Path(model_path) if model_path is not None else default_model_path()
    if not model_path.is_file():
        raise HellomemeError(f"{model_path}: face landmarker model not found")
    options = vision.FaceLandmarkerOptions(
        base_options=BaseOptions(model_asset_path=str(model_path)),
        running_mode=vision.RunningMode.VIDEO if video else vision.RunningMode.IMAGE,
        num_faces=num_faces,
        output_face_blendshapes=True,
        output_facial_transformation_matrixes=True,
    )
    try:
        with native_stderr_muted():  # MediaPipe's C++ start-up logging
            landmarker = vision.FaceLandmarker.create_from_options(options)
    except (RuntimeError, ValueError) as error:
        raise HellomemeError(f"{model_path}: not a usable face landmarker model ({_first_line(error)})") from None
    with landmarker:
        yield landmarker


def _mp_image(frame: np.ndarray) -> object:
    import mediapipe as mp

    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frames must be RGB uint8 (H, W, 3), not {frame.dtype} {frame.shape}")
    return mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame))


def _faces(result: object, size: tuple[int, int]) -> list[_Face]:
    """MediaPipe's result as faces in pixels (z scaled by the width, as MediaPipe scales it)."""
    width, height = size
    scale = np.array([width, height, width], np.float32)
    faces = []
    for landmarks, blendshapes, matrix in zip(
        result.face_landmarks, result.face_blendshapes, result.facial_transformation_matrixes, strict=True
    ):
        points = np.array([(p.x, p.y, p.z) for p in landmarks], np.float32) * scale
        scores = np.array([category.score for category in blendshapes], np.float32)
        faces.append(_Face(points, scores, np.asarray(matrix, np.float32)))
    return faces


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# -- following one subject -----------------------------------------------------


def _by_size(faces: list[_Face]) -> list[_Face]:
    return sorted(faces, key=lambda face: face.area, reverse=True)


def _follow(last: _Face | None, faces: list[_Face], face_index: int, label: str, index: int) -> _Face | None:
    """The subject's face in this frame: chosen by size the first time, then by overlap with its last box."""
    if last is None:
        if not faces:
            return None
        if face_index >= len(faces):
            raise HellomemeError(
                f"{label}: face {face_index} asked for, but frame {index} (the first with a face) has {len(faces)}"
            )
        return _by_size(faces)[face_index]
    overlaps = [_iou(last.box, face.box) for face in faces]
    if not overlaps or max(overlaps) < SAME_FACE_MIN_IOU:
        return None
    return faces[int(np.argmax(overlaps))]


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union


# -- filling gaps --------------------------------------------------------------


def _filled_track(subject: list[_Face | None], fps: float, size: tuple[int, int]) -> FaceTrack:
    """Rows for every frame: detected ones as they are, gaps interpolated (rotations by slerp), ends copied."""
    count = len(subject)
    seen = np.array([face is not None for face in subject])
    known = np.flatnonzero(seen)
    landmarks = np.zeros((count, LANDMARK_COUNT, 3), np.float32)
    blendshapes = np.zeros((count, len(BLENDSHAPE_NAMES)), np.float32)
    matrices = np.zeros((count, 4, 4), np.float32)
    for index in known:
        face = subject[index]
        landmarks[index], blendshapes[index], matrices[index] = face.landmarks, face.blendshapes, face.matrix
    for index in np.flatnonzero(~seen):
        after = int(np.searchsorted(known, index))
        before, after = known[max(after - 1, 0)], known[min(after, len(known) - 1)]
        weight = 0.0 if after == before else (index - before) / (after - before)
        landmarks[index] = (1 - weight) * landmarks[before] + weight * landmarks[after]
        blendshapes[index] = (1 - weight) * blendshapes[before] + weight * blendshapes[after]
        start, end = _matrix_to_quaternion(matrices[before, :3, :3]), _matrix_to_quaternion(matrices[after, :3, :3])
        translation = (1 - weight) * matrices[before, :3, 3] + weight * matrices[after, :3, 3]
        matrices[index] = _pose(_quaternion_to_matrix(_slerp(start, end, weight)), translation)
    return FaceTrack(landmarks, blendshapes, matrices, ~seen, float(fps), size)


def _pose(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    matrix = np.eye(4, dtype=np.float32)
    matrix[:3, :3], matrix[:3, 3] = rotation, translation
    return matrix


# -- smoothing -----------------------------------------------------------------


def smooth_track(track: FaceTrack, smoothing: Smoothing = Smoothing()) -> FaceTrack:
    """A copy with the pose (rotation as a unit quaternion, so it stays a rotation, and
    translation) One Euro filtered at `smoothing.pose` strength, landmarks and blendshape scores
    at `smoothing.expression` strength; `filled` unchanged. track_video does this unless told not to."""
    if len(track) < 2:
        return track
    pose, expression = smoothing.scaled(smoothing.pose), smoothing.scaled(smoothing.expression)
    changes = {}
    if expression is not None:
        boxes = track.landmarks[:, :, :2].max(axis=1) - track.landmarks[:, :, :2].min(axis=1)
        face_size = float(np.median(np.sqrt(boxes[:, 0] * boxes[:, 1]))) or 1.0
        landmarks = _one_euro(track.landmarks.reshape(len(track), -1) / face_size, track.fps, expression) * face_size
        changes["landmarks"] = landmarks.reshape(track.landmarks.shape).astype(np.float32)
        changes["blendshapes"] = np.clip(_one_euro(track.blendshapes, track.fps, expression), 0.0, 1.0).astype(np.float32)
    if pose is not None:
        quaternions = _continuous(np.stack([_matrix_to_quaternion(m[:3, :3]) for m in track.matrices]))
        quaternions = _one_euro(quaternions, track.fps, pose)
        quaternions /= np.linalg.norm(quaternions, axis=1, keepdims=True)
        translations = _one_euro(track.matrices[:, :3, 3] / FACE_SIZE_CM, track.fps, pose) * FACE_SIZE_CM
        changes["matrices"] = np.stack([_pose(_quaternion_to_matrix(q), t) for q, t in zip(quaternions, translations)])
    return dataclasses.replace(track, **changes)


def _one_euro(signal: np.ndarray, fps: float, smoothing: Smoothing) -> np.ndarray:
    """Filter (T, D) samples taken at `fps`, each column on its own, forwards and backwards averaged.

    A causal One Euro filter trails a moving face; the clip is known in full, so running it both ways
    and averaging cancels that lag (a ramp comes out unchanged) while noise is still averaged away.
    """
    forwards = _one_euro_causal(signal, fps, smoothing)
    backwards = _one_euro_causal(signal[::-1], fps, smoothing)[::-1]
    return (forwards + backwards) / 2


def _one_euro_causal(signal: np.ndarray, fps: float, smoothing: Smoothing) -> np.ndarray:
    period = 1.0 / fps
    speed_alpha = _alpha(smoothing.d_cutoff, period)
    filtered = np.empty(signal.shape, np.float64)
    filtered[0] = signal[0]
    speed = np.zeros(signal.shape[1])
    for t in range(1, len(signal)):
        speed = speed_alpha * (signal[t] - signal[t - 1]) / period + (1 - speed_alpha) * speed
        alpha = _alpha(smoothing.min_cutoff + smoothing.beta * np.abs(speed), period)
        filtered[t] = alpha * signal[t] + (1 - alpha) * filtered[t - 1]
    return filtered


def _alpha(cutoff: float | np.ndarray, period: float) -> float | np.ndarray:
    time_constant = 1.0 / (2 * np.pi * cutoff)
    return 1.0 / (1.0 + time_constant / period)


# -- rotations -----------------------------------------------------------------


def _matrix_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """(w, x, y, z) of a rotation matrix, from its largest diagonal term for accuracy."""
    m = rotation.astype(np.float64)
    trace = np.trace(m)
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    return q / np.linalg.norm(q)


def _quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def _slerp(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    """Constant-speed interpolation between two unit quaternions along the shorter arc."""
    cosine = float(np.dot(a, b))
    if cosine < 0:
        b, cosine = -b, -cosine
    if cosine > 0.9995:
        q = a + weight * (b - a)
        return q / np.linalg.norm(q)
    angle = np.arccos(cosine)
    return (np.sin((1 - weight) * angle) * a + np.sin(weight * angle) * b) / np.sin(angle)


def _continuous(quaternions: np.ndarray) -> np.ndarray:
    """Flip signs so consecutive quaternions lie in the same hemisphere (q and -q are the same rotation)."""
    result = quaternions.copy()
    for t in range(1, len(result)):
        if np.dot(result[t], result[t - 1]) < 0:
            result[t] = -result[t]
    return result
