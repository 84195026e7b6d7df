"""Face tracking on the real clips and the real MediaPipe model: every frame, one subject, gaps filled."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import MEDIA, require
from hellomeme_cli.face import tracking
from hellomeme_cli.media import video
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.progress import ProgressEvent
from hellomeme_cli.weights.cache import WeightCache

FRAME_COUNTS = {"jue.mp4": 84, "nice.mp4": 71, "qie.mp4": 38, "ysll.mp4": 61, "tndtc.mp4": 34}


@pytest.fixture(scope="session")
def portrait() -> np.ndarray:
    return video.read_image(require(MEDIA / "majicmix1.jpg", "test portrait"))


def yaw_degrees(track: tracking.FaceTrack) -> np.ndarray:
    rotations = track.matrices[:, :3, :3]
    return np.degrees(np.arctan2(rotations[:, 0, 2], rotations[:, 2, 2]))


def assert_rotations(track: tracking.FaceTrack) -> None:
    rotations = track.matrices[:, :3, :3].astype(np.float64)
    assert np.abs(rotations @ rotations.transpose(0, 2, 1) - np.eye(3)).max() < 1e-5
    assert np.allclose(np.linalg.det(rotations), 1, atol=1e-5)
    assert np.allclose(track.matrices[:, 3], [0, 0, 0, 1])


def mean_shift(track: tracking.FaceTrack, a: int, b: int) -> float:
    """Mean landmark distance (pixels) between two frames."""
    return float(np.linalg.norm(track.landmarks[a, :, :2] - track.landmarks[b, :, :2], axis=1).mean())


# -- every frame of every clip --------------------------------------------------------


@pytest.mark.parametrize("name", FRAME_COUNTS)
def test_every_frame_of_every_clip_gets_a_row(tracks, name: str):
    track = tracks(name)
    count = FRAME_COUNTS[name]
    assert len(track) == count and track.fps == 15.0 and track.size == (512, 512)
    assert track.landmarks.shape == (count, 478, 3) and track.landmarks.dtype == np.float32
    assert track.blendshapes.shape == (count, 52) and track.matrices.shape == (count, 4, 4)
    assert track.filled.shape == (count,) and track.filled_count == 0
    assert np.isfinite(track.landmarks).all() and np.isfinite(track.matrices).all()
    # Pixels of the 512x512 frame: the face sits inside it, and is a sizeable part of it.
    assert 0 < track.landmarks[..., 0].min() and track.landmarks[..., 0].max() < 512
    assert np.ptp(track.landmarks[0, :, 0]) > 100
    assert_rotations(track)


def test_nice_follows_its_subject_past_a_false_second_face(tracks):
    """nice.mp4: frames 20-22 show a second "face" (the ear) and frame 25 is lost by MediaPipe's
    landmark tracking when it runs with num_faces=1; with several faces asked for, the detector
    runs on every frame and finds frame 25, and overlap keeps the subject off the ear."""
    track = tracks("nice.mp4", smoothed=False)
    assert not track.filled[25]
    shifts = [mean_shift(track, i, i + 1) for i in range(18, 27)]
    assert max(shifts) < 30, shifts  # the ear is ~150 pixels from the face's centre
    widths = np.ptp(track.landmarks[18:27, :, 0], axis=1)
    assert (widths > 200).all(), widths  # the whole face, not the 80-pixel ear


def test_a_frame_without_the_face_is_filled_from_its_neighbours(model):
    """nice.mp4 frames 15-35 with frame 25 blanked: row 10 is filled between rows 9 and 11."""
    clip = require(MEDIA / "nice.mp4", "test clip")
    frames = [frame for index, frame in enumerate(video.read_frames(clip, max_frames=36)) if index >= 15]
    frames[10] = np.full_like(frames[10], 128)
    track = tracking.track_video(frames, fps=15, name="nice 15-35", smoothing=None, model_path=model)
    assert len(track) == 21 and track.filled_count == 1 and track.filled[10]
    np.testing.assert_allclose(track.landmarks[10], (track.landmarks[9] + track.landmarks[11]) / 2, atol=1e-3)
    np.testing.assert_allclose(track.blendshapes[10], (track.blendshapes[9] + track.blendshapes[11]) / 2, atol=1e-6)
    np.testing.assert_allclose(track.matrices[10, :3, 3], (track.matrices[9, :3, 3] + track.matrices[11, :3, 3]) / 2, atol=1e-4)
    assert_rotations(track)
    # Slerp: the filled rotation is half way, by angle, between its neighbours.
    def angle(a, b):
        return np.degrees(np.arccos(np.clip((np.trace(a[:3, :3].T @ b[:3, :3]) - 1) / 2, -1, 1)))

    between = angle(track.matrices[9], track.matrices[11])
    assert between > 0.5
    assert angle(track.matrices[9], track.matrices[10]) == pytest.approx(between / 2, abs=0.05)
    assert angle(track.matrices[10], track.matrices[11]) == pytest.approx(between / 2, abs=0.05)


def test_expressions_move_where_jue_moves(tracks):
    track = tracks("jue.mp4")
    jaw = track.blendshape("jawOpen")
    assert jaw.min() < 0.05 and jaw.max() > 0.35
    for eye in ("eyeBlinkLeft", "eyeBlinkRight"):
        blink = track.blendshape(eye)
        assert blink.min() < 0.25 and blink.max() > 0.6, eye
    assert tracking.BLENDSHAPE_NAMES[0] == "_neutral" and len(tracking.BLENDSHAPE_NAMES) == 52


def test_the_head_turn_in_ysll_shows_in_the_rotation(tracks):
    """ysll.mp4 starts turned about 45 degrees and turns about 30 degrees towards the camera."""
    track = tracks("ysll.mp4")
    yaw = yaw_degrees(track)
    assert yaw[:5].mean() < -40
    assert 25 < yaw[-5:].mean() - yaw[:5].mean() < 40
    rotations = track.matrices[:, :3, :3]
    pitch = np.degrees(np.arcsin(-rotations[:, 1, 2]))
    roll = np.degrees(np.arctan2(rotations[:, 1, 0], rotations[:, 1, 1]))
    assert np.ptp(pitch) < 10 and np.ptp(roll) < 10  # the turn is about the vertical axis


# -- choosing and following one subject --------------------------------------------------


@pytest.fixture(scope="module")
def two_faces(portrait, tmp_path_factory) -> Path:
    """A large portrait on the left and a half-size one on the right."""
    smaller = cv2.resize(video.read_image(require(MEDIA / "civitai1.jpg", "test portrait")), (256, 256), interpolation=cv2.INTER_AREA)
    canvas = np.full((512, 800, 3), 255, np.uint8)
    canvas[:, :512] = portrait
    canvas[128:384, 530:786] = smaller
    return video.write_image(canvas, tmp_path_factory.mktemp("faces") / "two.png")


def test_face_index_picks_faces_by_size(two_faces, model):
    larger = tracking.track_image(two_faces, model_path=model)
    assert len(larger) == 1 and larger.fps == 0.0 and larger.size == (800, 512) and not larger.filled[0]
    assert larger.landmarks[0, :, 0].max() < 512
    other = tracking.track_image(two_faces, face_index=1, model_path=model)
    assert other.landmarks[0, :, 0].min() > 512
    with pytest.raises(HellomemeError, match="face 2 asked for, but only 2"):
        tracking.track_image(two_faces, face_index=2, model_path=model)


def test_face_index_in_a_clip(two_faces, model):
    frames = [video.read_image(two_faces)] * 3
    track = tracking.track_video(frames, fps=25, face_index=1, model_path=model)
    assert len(track) == 3 and (track.landmarks[:, :, 0].min(axis=1) > 512).all()


def test_a_jump_to_another_place_is_no_face(portrait, model):
    """The face leaves for the other half of the frame for two frames: those rows are filled."""
    left = np.full((512, 1024, 3), 255, np.uint8)
    left[:, :512] = portrait
    right = np.roll(left, 512, axis=1)
    track = tracking.track_video([left] * 4 + [right] * 2 + [left] * 3, fps=10, smoothing=None, model_path=model)
    assert track.filled.tolist() == [False] * 4 + [True] * 2 + [False] * 3
    assert track.landmarks[:, :, 0].max() < 512


@pytest.mark.parametrize("kind", ["flat", "noise"])
def test_an_image_without_a_face_is_refused(tmp_path: Path, model, kind: str):
    pixels = np.full((256, 256, 3), 128, np.uint8) if kind == "flat" else np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    path = video.write_image(pixels, tmp_path / f"{kind}.png")
    with pytest.raises(HellomemeError) as excinfo:
        tracking.track_image(path, model_path=model)
    assert str(excinfo.value) == f"{path}: no face found"


def test_a_clip_without_a_face_is_refused(tmp_path: Path, model):
    clip = video.write_video([np.full((64, 64, 3), 40 * i, np.uint8) for i in range(4)], tmp_path / "empty.mp4", 15)
    with pytest.raises(HellomemeError) as excinfo:
        tracking.track_video(clip, model_path=model)
    assert str(excinfo.value) == f"{clip}: no face found in any of its 4 frames"


def test_progress_and_timestamps_at_any_rate(portrait, model):
    events: list[ProgressEvent] = []
    # 2500 fps: frame times round to the same millisecond, yet MediaPipe needs them increasing.
    track = tracking.track_video([portrait] * 4, fps=2500, model_path=model, progress=events.append)
    assert len(track) == 4
    assert events == [ProgressEvent("tracking", i, 4, unit="frames") for i in range(1, 5)]


# -- smoothing --------------------------------------------------------------------------


def test_smoothing_steadies_a_still_face(portrait, model):
    """A still portrait with fresh sensor noise in each frame: the landmarks' wobble is halved or better."""
    rng = np.random.default_rng(0)
    frames = [np.clip(portrait + rng.normal(0, 4, portrait.shape), 0, 255).astype(np.uint8) for _ in range(30)]
    raw = tracking.track_video(frames, fps=15, smoothing=None, model_path=model)
    smoothed = tracking.smooth_track(raw)

    def wobble(track):
        points = track.landmarks[:, :, :2]
        return float(np.linalg.norm(points - points.mean(axis=0), axis=2).mean())

    assert wobble(smoothed) < wobble(raw) / 2
    assert_rotations(smoothed)


def test_smoothing_follows_a_real_head_turn(tracks):
    raw, smoothed = tracks("ysll.mp4", smoothed=False), tracks("ysll.mp4")
    assert np.abs(yaw_degrees(smoothed) - yaw_degrees(raw)).max() < 2.0  # of a 30-degree turn
    deviation = np.linalg.norm(smoothed.landmarks[:, :, :2] - raw.landmarks[:, :, :2], axis=2).mean(axis=1)
    assert deviation.max() < 4.0  # pixels, on a face about 250 pixels wide
    # The blendshape scores are smoothed with the landmarks, and follow the mouth within 0.15.
    assert np.abs(smoothed.blendshapes - raw.blendshapes).max() < 0.15 and not np.array_equal(smoothed.blendshapes, raw.blendshapes)
    assert_rotations(smoothed)


def test_pose_and_expression_smoothing_strengths_act_on_their_own_signals(tracks):
    raw = tracks("ysll.mp4", smoothed=False)
    pose_only = tracking.smooth_track(raw, tracking.Smoothing(expression=0))
    expression_only = tracking.smooth_track(raw, tracking.Smoothing(pose=0))
    assert np.array_equal(pose_only.landmarks, raw.landmarks) and np.array_equal(pose_only.blendshapes, raw.blendshapes)
    assert not np.array_equal(pose_only.matrices, raw.matrices)
    assert np.array_equal(expression_only.matrices, raw.matrices) and not np.array_equal(expression_only.landmarks, raw.landmarks)

    def roughness(track):  # mean frame-to-frame change of the yaw's second difference
        return float(np.abs(np.diff(yaw_degrees(track), 2)).mean())

    default, strong = tracking.smooth_track(raw), tracking.smooth_track(raw, tracking.Smoothing(pose=4))
    assert roughness(strong) < roughness(default) < roughness(raw)


def test_track_video_smooths_by_default(model):
    clip = require(MEDIA / "qie.mp4", "test clip")
    raw = tracking.track_video(clip, max_frames=8, smoothing=None, model_path=model)
    default = tracking.track_video(clip, max_frames=8, model_path=model)
    assert len(default) == 8
    assert not np.array_equal(default.landmarks, raw.landmarks)
    np.testing.assert_allclose(default.landmarks, tracking.smooth_track(raw).landmarks, atol=1e-3)


def rotation_about(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues' formula."""
    axis = axis / np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def test_rotation_interpolation_on_synthetic_rotations():
    """Gaps are filled by slerp: constant angular speed about the fixed axis, also near 180 degrees."""
    rng = np.random.default_rng(1)
    for degrees in (5.0, 120.0, 179.0):
        axis = rng.normal(size=3)
        start, end = tracking._matrix_to_quaternion(np.eye(3)), tracking._matrix_to_quaternion(rotation_about(axis, degrees))
        np.testing.assert_allclose(tracking._quaternion_to_matrix(end), rotation_about(axis, degrees), atol=1e-9)
        for weight in (0.25, 1 / 3, 0.9):
            between = tracking._quaternion_to_matrix(tracking._slerp(start, end, weight))
            np.testing.assert_allclose(between, rotation_about(axis, degrees * weight), atol=1e-9)


# -- the model file ------------------------------------------------------------------------


def test_default_model_path_comes_from_the_weight_cache(tmp_path: Path, model):
    empty = WeightCache(home=tmp_path / "empty")
    with pytest.raises(HellomemeError, match="hellomeme weights fetch face_landmarker"):
        tracking.default_model_path(empty)
    cache = WeightCache(home=tmp_path / "cache")
    target = cache.path("face_landmarker") / "face_landmarker.task"
    target.parent.mkdir(parents=True)
    os.symlink(model, target)
    assert tracking.default_model_path(cache) == target


def test_a_file_that_is_not_the_model_is_refused(tmp_path: Path, portrait):
    bogus = tmp_path / "face_landmarker.task"
    bogus.write_bytes(b"not a model")
    with pytest.raises(HellomemeError, match="not a usable face landmarker model"):
        tracking.track_image(portrait, model_path=bogus)

