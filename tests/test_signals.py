"""Driving signals: crop, head pose conventions, condition images, coefficients, face parts, encoders.

Numbers marked "official" were computed once by running the official HelloMeme functions
(`crop_and_resize`, `get_project_points_rect`, `gen_control_heatmaps`) in a scratch script.
"""

from __future__ import annotations

import types

import cv2
import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import hellomeme_cli.face.tracking as tracking
from conftest import SHARED, require
from hellomeme_cli.face import signals as S
from hellomeme_cli.models import FanEncoder, HMControlNet, HMControlNet2
from hellomeme_cli.models.hm4 import ARKIT_COEFFICIENTS
from hellomeme_cli.progress import ProgressEvent
from hellomeme_cli.face.tracking import FaceTrack
from hellomeme_cli.media.video import read_frames

# MediaPipe canonical face model points (cm): nose tip, the subject's left outer eye corner.
NOSE_TIP = np.array([0.0, -1.13, 7.48])
LEFT_EYE_CORNER = np.array([4.45, 2.66, 3.17])


def _track(landmarks, matrices=None, size=(512, 512), blendshapes=None) -> FaceTrack:
    n = len(landmarks)
    if matrices is None:
        matrices = np.tile(_matrix(np.eye(3), (0.0, 0.0, -40.0)), (n, 1, 1))
    if blendshapes is None:
        blendshapes = np.zeros((n, 52), dtype=np.float32)
    return FaceTrack(np.asarray(landmarks, dtype=np.float32), blendshapes, np.asarray(matrices, dtype=np.float32), np.zeros(n, bool), 15.0, size)


def _matrix(rotation, translation) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = rotation, translation
    return matrix


def _rotation(axis_angle) -> np.ndarray:
    """A rotation built independently of the code under test (OpenCV's Rodrigues)."""
    return cv2.Rodrigues(np.array(axis_angle, dtype=np.float64))[0]


def _project(point_cm, matrix, size=(512, 512)) -> np.ndarray:
    """A canonical-model point -> pixel, through MediaPipe's camera (63 degree vertical field of view)."""
    camera = matrix[:3, :3] @ point_cm + matrix[:3, 3]
    focal = size[1] / 2 / np.tan(np.radians(63.0) / 2)
    return np.array([size[0] / 2 + focal * camera[0] / -camera[2], size[1] / 2 - focal * camera[1] / -camera[2]])


def _curve_face(centres, halves) -> np.ndarray:
    """Deterministic landmarks: each frame's 478 points spread over centre +- half."""
    k = np.arange(478)
    base = np.stack([np.cos(k), np.sin(1.3 * k), np.zeros_like(k, dtype=float)], axis=1)
    return np.stack([np.append(c, 0.0) + base * h for c, h in zip(np.asarray(centres, float), halves)])


def _synthetic_faces(n: int, size: int, seed: int = 0, jitter: float = 0.004) -> np.ndarray:
    """(n, 478, 3) landmarks laid out like a face: template points on the template, parts around them."""
    rng = np.random.default_rng(seed)
    face = np.zeros((478, 3))
    face[:, :2] = rng.uniform(0.3, 0.7, (478, 2))
    for part, centre in zip(S.FACE_PART_LANDMARKS, [(0.33, 0.38), (0.67, 0.38), (0.51, 0.72)]):
        face[list(part), :2] = np.array(centre) + rng.uniform(-0.07, 0.07, (len(part), 2))
    face[list(S.FACE_TEMPLATE_LANDMARKS), :2] = S.FACE_TEMPLATE
    face[list(S.PDFGC_TEMPLATE_LANDMARKS[:3]), :2] = [(0.36, 0.4), (0.64, 0.4), (0.5, 0.55)]
    return (face + rng.normal(0, jitter, (n, 478, 3)) * (1, 1, 0)) * size


# ----------------------------------------------------------------------------------------
# crop
# ----------------------------------------------------------------------------------------

# (frame size, per-frame face centres, half sizes) -> official crop_and_resize box (left, top, side)
OFFICIAL_CROPS = [
    ((1280, 720), [(641.3, 362.7), (660.2, 371.9), (702.6, 380.4)], [61.3, 64.7, 70.9], (480, 134, 393)),
    ((1280, 720), [(101.7, 88.3), (110.4, 95.1)], [50.3, 52.6], (0, 0, 308)),  # pushed in at the top left
    ((1280, 720), [(1201.2, 679.4), (1190.7, 671.3)], [40.6, 45.2], (1021, 461, 257)),  # at the bottom right
    ((640, 480), [(331.4, 251.7)], [190.3], (91, 0, 479)),  # side limited to the frame's height - 1
]


@pytest.mark.parametrize("size, centres, halves, box", OFFICIAL_CROPS)
def test_clip_crop_is_the_official_box(size, centres, halves, box):
    crop = S.clip_crop(_track(_curve_face(centres, halves), size=size))
    assert (crop.left, crop.top, crop.width, crop.height, crop.size) == (*box, box[2], 512)


def test_clip_crop_ignores_the_forehead():
    landmarks = _curve_face([(640, 360)], [60])
    without = S.clip_crop(_track(landmarks, size=(1280, 720)))
    landmarks[0, 10, 1] -= 200  # the top of the forehead: not part of the official face extent
    assert S.clip_crop(_track(landmarks, size=(1280, 720))) == without


def test_crop_maps_frames_and_landmarks_together():
    frame = np.zeros((720, 1280, 3), dtype=np.uint8)
    cv2.circle(frame, (700, 400), 6, (255, 255, 255), -1)
    crop = S.SquareCrop(480, 135, 389, 389, 512)
    working = crop.apply(frame)
    x, y = crop.map_points(np.array([700.5, 400.5]))  # pixel centre in continuous coordinates
    assert working.shape == (512, 512, 3)
    rows, cols = np.nonzero(working[..., 0] > 128)
    assert abs(cols.mean() + 0.5 - x) < 0.5 and abs(rows.mean() + 0.5 - y) < 0.5


def test_whole_frame_is_letterboxed():
    frame = np.full((360, 640, 3), 200, dtype=np.uint8)
    crop = S.whole_frame((640, 360))
    assert crop == S.SquareCrop(0, -140, 640, 640, 512)
    working = crop.apply(frame)
    assert working[:100].max() == 0 and working[-100:].max() == 0 and (working[150:350] == 200).all()
    assert np.allclose(crop.map_points(np.array([[0.0, 0.0], [640.0, 360.0]])), [[0, 112], [512, 400]])
    assert S.whole_frame((512, 512)) == S.SquareCrop(0, 0, 512, 512, 512)  # official crop=False


def test_crop_track_keeps_position_size_and_apparent_rotation():
    source = (1280, 720)
    matrix = _matrix(_rotation([0.1, -0.4, 0.2]), (12.0, -6.0, -55.0))
    track = _track(_curve_face([(900, 500)], [80]), [matrix], size=source)
    crop = S.SquareCrop(700, 250, 420, 420, 512)
    working = S.crop_track(track, crop)
    assert working.size == (512, 512)
    # The head lands where the crop maps it, as large as the crop makes it, turned the same way
    # relative to the line of sight.
    origin = _project(np.zeros(3), working.matrices[0].astype(np.float64), (512, 512))
    assert np.allclose(origin, crop.map_points(_project(np.zeros(3), matrix, source)), atol=1e-3)
    (_, source_official), (_, working_official) = S.head_pose(track), S.head_pose(working)
    assert np.isclose(working_official[0, 2], source_official[0, 2] / crop.scale.mean(), rtol=1e-5)
    assert np.allclose(S.head_pose(working)[0], S.head_pose(track)[0], atol=1e-6)
    assert np.allclose(working.landmarks, crop.map_points(track.landmarks), atol=1e-3)


# ----------------------------------------------------------------------------------------
# head pose
# ----------------------------------------------------------------------------------------


def test_angles_round_trip_and_rotation_order():
    rng = np.random.default_rng(0)
    angles = rng.uniform([-1.5, -1.5, -1.5], [1.5, 1.5, 1.5], (50, 3))
    rotations = S.angles_to_rotation(angles)
    assert np.allclose(S.rotation_to_angles(rotations), angles, atol=1e-9)
    pitch, yaw, roll = angles[0]
    assert np.allclose(rotations[0], _rotation([0, 0, roll]) @ _rotation([0, yaw, 0]) @ _rotation([pitch, 0, 0]))


def test_head_pose_recovers_the_angles_of_a_mediapipe_matrix():
    angles = np.array([[0.3, -0.5, 0.2], [-0.2, 0.7, -0.4]])
    matrices = [_matrix(rotation, (0.0, 0.0, -45.0)) for rotation in S.angles_to_rotation(angles)]
    recovered, _ = S.head_pose(_track(np.zeros((2, 478, 3)), matrices))
    assert np.allclose(recovered, angles, atol=1e-6)


def test_a_head_off_axis_facing_the_camera_has_zero_angles():
    translation = np.array([20.0, -12.0, -50.0])
    towards_camera = -translation / np.linalg.norm(translation)
    axis = np.cross([0, 0, 1], towards_camera)
    rotation = _rotation(axis / np.linalg.norm(axis) * np.arccos(towards_camera[2]))
    angles, _ = S.head_pose(_track(np.zeros((1, 478, 3)), [_matrix(rotation, translation)]))
    assert np.allclose(angles, 0, atol=1e-6)


@pytest.mark.parametrize(
    "axis_angle, index, sign, point, moves",
    [
        ([0, 0.3, 0], 1, +1, NOSE_TIP, (+1, 0)),  # turns to the subject's left: nose to image right, yaw > 0
        ([0, -0.3, 0], 1, -1, NOSE_TIP, (-1, 0)),  # to the subject's right: yaw < 0
        ([0.3, 0, 0], 0, +1, NOSE_TIP, (0, +1)),  # looks down: nose lower in the image, pitch > 0
        ([-0.3, 0, 0], 0, -1, NOSE_TIP, (0, -1)),  # looks up: pitch < 0
        ([0, 0, 0.3], 2, +1, LEFT_EYE_CORNER, (0, -1)),  # tilts to the subject's right shoulder: left eye up, roll > 0
    ],
)
def test_sign_conventions(axis_angle, index, sign, point, moves):
    translation = (0.0, 0.0, -40.0)
    turned = _matrix(_rotation(axis_angle), translation)
    shift = _project(point, turned) - _project(point, _matrix(np.eye(3), translation))
    for axis, direction in enumerate(moves):
        if direction:
            assert np.sign(shift[axis]) == direction
    angles, _ = S.head_pose(_track(np.zeros((1, 478, 3)), [turned]))
    expected = np.zeros(3)
    expected[index] = sign * 0.3
    assert np.allclose(angles[0], expected, atol=1e-6)


def test_translation_keeps_the_head_where_mediapipe_sees_it():
    translation = np.array([6.0, -3.0, -50.0])
    _, official = S.head_pose(_track(np.zeros((1, 478, 3)), [_matrix(np.eye(3), translation)]))
    x, y, z = official[0]
    focal = S.OFFICIAL_FOCAL_LENGTH
    centre = _project(np.zeros(3), _matrix(np.eye(3), translation))
    assert np.allclose([256 + focal * x / -z, 256 - focal * y / -z], centre)
    # 5 cm at the head spans as many pixels for both cameras (metres for the official one).
    assert np.isclose(focal * 0.05 / -z, _project([5.0, 0, 0], _matrix(np.eye(3), (0, 0, -50.0)))[0] - 256)


# ----------------------------------------------------------------------------------------
# condition images
# ----------------------------------------------------------------------------------------

OFFICIAL_REFERENCE = np.array([0.01, -0.02, -3.8])
# angles -> (corners as the official code truncates them, per-channel count of lit pixels)
OFFICIAL_SQUARES = [
    ([0, 0, 0], [[205, 344], [205, 217], [332, 217], [332, 344]], [4492, 1916, 4492]),
    ([0, 0.5, 0], [[206, 357], [206, 212], [316, 222], [316, 334]], [4011, 2205, 3995]),
    ([0.4, 0, 0], [[209, 332], [199, 219], [340, 219], [325, 332]], [4087, 1691, 4537]),
    ([0, 0, 0.3], [[226, 360], [189, 239], [310, 201], [348, 323]], [4476, 1880, 4497]),
]


@pytest.mark.parametrize("angles, corners, lit", OFFICIAL_SQUARES)
def test_condition_image_is_the_official_one(angles, corners, lit):
    assert S.pose_square(np.array(angles), OFFICIAL_REFERENCE, 512).astype(np.int32).tolist() == corners
    image = S.render_conditions(np.array([angles]), OFFICIAL_REFERENCE[None])
    assert image.shape == (3, 1, 512, 512) and image.dtype == torch.float32
    assert set(image.unique().tolist()) == {-1.0, 1.0}
    assert [(image[c] > 0).sum().item() for c in range(3)] == lit


def test_yaw_to_the_left_shortens_the_red_right_edge():
    image = S.render_conditions(np.array([[0, 0.5, 0]]), OFFICIAL_REFERENCE[None])[:, 0]
    red = (image[0] > 0) & (image[1] < 0) & (image[2] < 0)
    green = (image[1] > 0) & (image[0] < 0) & (image[2] < 0)
    red_rows, green_rows = np.nonzero(red.numpy())[0], np.nonzero(green.numpy())[0]
    assert np.ptp(red_rows) < np.ptp(green_rows)  # the far edge is shorter
    assert np.nonzero(red.numpy())[1].mean() > np.nonzero(green.numpy())[1].mean()  # red stays on the right


def _signals(n=7, trans_ratio=0.0, **embeddings) -> S.DrivingSignals:
    translations = np.tile([0.0, 0.0, -3.5], (n, 1))
    translations[1] = (0.05, 0.03, -3.0)
    return S.DrivingSignals(np.zeros((n, 3)), translations, OFFICIAL_REFERENCE, np.zeros((n, 51), np.float32), trans_ratio=trans_ratio, **embeddings)


def test_trans_ratio_zero_ignores_the_driving_translation():
    condition = _signals(trans_ratio=0.0).control_inputs(0, 2)["condition"][0]
    assert torch.equal(condition[:, 0], condition[:, 1])


def test_trans_ratio_one_moves_the_square_as_the_official_code():
    condition = _signals(trans_ratio=1.0).control_inputs(0, 2)["condition"][0]
    # official corners of frame 1: [[270, 314], [270, 168], [416, 168], [416, 314]]
    assert condition[:, 1, 241, 270].tolist() == [-1, 1, -1]  # green left edge
    assert condition[:, 1, 168, 343].tolist() == [-1, -1, 1]  # blue top edge
    assert condition[:, 1, 241, 416].tolist() == [1, -1, -1]  # red right edge
    assert condition[:, 0, 241, 270].tolist() == [-1, -1, -1]  # frame 0 is not moved


def test_frame_ranges_use_the_first_frame_of_the_clip():
    signals = _signals(trans_ratio=1.0)
    assert torch.equal(signals.control_inputs(1, 3)["condition"][:, :, 0], signals.control_inputs(0, 2)["condition"][:, :, 1])


# ----------------------------------------------------------------------------------------
# expression coefficients
# ----------------------------------------------------------------------------------------


def test_blendshapes_land_on_their_arkit_names():
    scores = (np.arange(52, dtype=np.float32) + 1)[None] / 100
    coefficients = S.arkit_coefficients(scores)
    assert coefficients.shape == (1, 51) and coefficients.dtype == np.float32
    for index, name in enumerate(S.ARKIT_BLENDSHAPES):
        assert coefficients[0, index] == pytest.approx((tracking.BLENDSHAPE_NAMES.index(name) + 1) / 100), name
    assert coefficients[0, 17] == pytest.approx(0.26)  # ARKit jawOpen <- MediaPipe 25
    assert coefficients[0, 0] == pytest.approx(0.10)  # ARKit eyeBlinkLeft <- MediaPipe 9
    assert set(S.ARKIT_BLENDSHAPES) == set(tracking.BLENDSHAPE_NAMES) - {"_neutral"} and "tongueOut" not in S.ARKIT_BLENDSHAPES
    # The one table: the v4/v5 control nets take exactly as many coefficients.
    assert len(S.ARKIT_BLENDSHAPES) == ARKIT_COEFFICIENTS == 51


# ----------------------------------------------------------------------------------------
# face parts and the PD-FGC crop
# ----------------------------------------------------------------------------------------


def test_similarity_transform_recovers_a_similarity():
    rng = np.random.default_rng(1)
    source = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = S.similarity_transform(source, source @ (scale * rotation).T + shift)
    assert np.allclose(matrix, np.hstack([scale * rotation, shift[:, None]]))


def _texture(size: int, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).uniform(0, 255, (size // 8, size // 8, 3)).astype(np.uint8)
    return cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)


def test_a_face_on_the_template_is_not_moved_and_a_moved_face_is_brought_back():
    landmarks = _synthetic_faces(1, 512, jitter=0.0)
    alignment = S.face_alignments(landmarks)
    assert np.allclose(alignment[0], [[1, 0, 0], [0, 1, 0]], atol=1e-9)
    windows = S.face_part_windows(landmarks, alignment)
    frame = _texture(512)
    on_template = S.face_part_crops(frame, alignment[0], windows)
    # The same face turned, shrunk and shifted in the frame gives the same crops.
    moved = cv2.getRotationMatrix2D((256, 256), 12, 0.8) + [[0, 0, 30], [0, 0, -20]]
    moved_frame = cv2.warpAffine(frame, moved, (512, 512), flags=cv2.INTER_CUBIC)
    moved_landmarks = landmarks.copy()
    moved_landmarks[..., :2] = landmarks[..., :2] @ moved[:, :2].T + moved[:, 2]
    realigned = S.face_part_crops(moved_frame, S.face_alignments(moved_landmarks)[0], windows)
    assert on_template.shape == (3, 256, 256, 3) and on_template.dtype == np.uint8
    assert np.abs(realigned.astype(int) - on_template).mean() < 3


def test_part_windows_frame_each_part_over_the_whole_clip():
    landmarks = _synthetic_faces(4, 512)
    identity = np.tile([[1.0, 0, 0], [0, 1, 0]], (4, 1, 1))
    windows = S.face_part_windows(landmarks, identity)
    for window, part in zip(windows, S.FACE_PART_LANDMARKS):
        points = landmarks[:, list(part), :2].reshape(-1, 2) @ window[:, :2].T + window[:, 2]
        low, high = points.min(axis=0), points.max(axis=0)
        assert np.allclose((low + high) / 2, 128) and np.isclose((high - low).max(), 256 / 1.2)


def test_pdfgc_crop_of_a_face_on_its_template_is_the_frame():
    landmarks = np.zeros((478, 3))
    landmarks[list(S.PDFGC_TEMPLATE_LANDMARKS), :2] = S.PDFGC_TEMPLATE * 224
    frame = _texture(224)
    assert np.array_equal(S.pdfgc_crop(frame, landmarks), frame)


# ----------------------------------------------------------------------------------------
# encoders
# ----------------------------------------------------------------------------------------


class _SpyImageEncoder:
    """Records what a CLIPVisionModelWithProjection would be given; image k embeds to k."""

    def __init__(self):
        self.pixel_values = []

    def __call__(self, pixel_values):
        self.pixel_values.append(pixel_values)
        count = len(pixel_values)
        return types.SimpleNamespace(image_embeds=torch.arange(count, dtype=pixel_values.dtype)[:, None].expand(count, 1024))


def test_face_parts_get_the_official_clip_preprocessing():
    crops = np.zeros((2, 3, 256, 256, 3), dtype=np.uint8)
    crops[:, 0] = (255, 0, 0)
    crops[:, 1] = 128
    spy = _SpyImageEncoder()
    embeddings = S.encode_face_parts(spy, crops, "cpu", torch.float32)
    (pixels,) = spy.pixel_values
    assert pixels.shape == (6, 3, 224, 224) and pixels.dtype == torch.float32
    red = pixels[0, :, 100, 100]
    assert torch.allclose(red, torch.tensor([(1 - 0.48145466) / 0.26862954, -0.4578275 / 0.26130258, -0.40821073 / 0.27577711]))
    assert torch.allclose(pixels[1, 1, 5, 5], torch.tensor((128 / 255 - 0.4578275) / 0.26130258))
    assert embeddings.shape == (2, 3, 1024) and embeddings.dtype == torch.float32
    assert embeddings[:, :, 0].tolist() == [[0, 1, 2], [3, 4, 5]]  # frame-major, parts in order


def test_face_parts_with_a_tiny_clip_model_batch_like_single_frames():
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=224, patch_size=32, projection_dim=1024)
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(config).eval()
    crops = np.stack([np.stack([_texture(256, seed=3 * f + p) for p in range(3)]) for f in range(2)])
    together = S.encode_face_parts(encoder, crops, "cpu", torch.float32)
    alone = torch.cat([S.encode_face_parts(encoder, crops[f : f + 1], "cpu", torch.float32) for f in range(2)])
    assert together.shape == (2, 3, 1024)
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(together[0, 0], together[0, 1])


@pytest.fixture(scope="module")
def fan_encoder():
    torch.manual_seed(0)
    return FanEncoder().eval()


def test_pdfgc_embeddings_and_the_unconditional_one(fan_encoder):
    seen = []
    hook = fan_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    crops = np.stack([np.zeros((224, 224, 3), np.uint8), np.full((224, 224, 3), 255, np.uint8)])
    try:
        embeddings = S.encode_pdfgc(fan_encoder, crops)
        negative = S.pdfgc_unconditional(fan_encoder)
    finally:
        hook.remove()
    assert embeddings.shape == (2, 548) and negative.shape == (1, 1, 548)
    assert seen[0].min().item() == -1.0 and seen[0].max().item() == 1.0 and seen[0].shape == (2, 3, 224, 224)
    assert torch.all(seen[1] == -1.0)  # the official neg_pd_fpg: an image of -1
    assert torch.allclose(embeddings[0], negative[0, 0], atol=1e-5)  # a black face is that image


# ----------------------------------------------------------------------------------------
# the clip's control inputs
# ----------------------------------------------------------------------------------------


def test_control_inputs_have_the_control_nets_shapes_and_feed_them():
    n, size = 7, 128
    signals = _signals(n, face_parts=torch.randn(n, 3, 1024), pd_fpg=torch.randn(n, 548), neg_pd_fpg=torch.randn(1, 1, 548))
    signals.size, signals.reference_translation = size, np.array([0.0, 0.0, -3.8])
    inputs = signals.control_inputs(2, 6)
    shapes = {name: tuple(tensor.shape) for name, tensor in inputs.items()}
    assert shapes == {
        "condition": (1, 3, 4, size, size),
        "drive_coeff": (1, 4, 51),
        "face_parts": (1, 4, 3, 1024),
        "pd_fpg": (1, 4, 548),
        "neg_pd_fpg": (1, 1, 548),
    }
    assert all(tensor.dtype == torch.float32 for tensor in inputs.values())
    assert torch.equal(inputs["face_parts"][0], signals.face_parts[2:6])
    control = HMControlNet(cross_attention_dim=32, block_out_channels=(16, 32, 64, 64)).eval()
    control2 = HMControlNet2(cross_attention_dim=32, block_out_channels=(16, 32, 64, 64)).eval()
    with torch.no_grad():
        assert control(inputs["condition"], inputs["drive_coeff"], inputs["face_parts"])["down_0"].shape[:3] == (1, 32, 4)
        assert control2(inputs["condition"], emo_embedding=inputs["pd_fpg"])["down2_0"].shape[:3] == (1, 32, 4)
    with pytest.raises(ValueError):
        signals.control_inputs(5, 8)


def test_without_embeddings_only_the_condition_is_given():
    assert set(_signals().control_inputs(0, 3)) == {"condition"}


class _MeanClip:
    """Stands in for the CLIP encoder: each image's embedding is its mean input value."""

    def __call__(self, pixel_values):
        return types.SimpleNamespace(image_embeds=pixel_values.mean(dim=(1, 2, 3))[:, None].expand(-1, 1024))


class _MeanFan:
    """Stands in for the PD-FGC encoder, likewise."""

    device, dtype = torch.device("cpu"), torch.float32

    def __call__(self, faces):
        return faces.mean(dim=(1, 2, 3))[:, None].expand(-1, 548)


def _synthetic_clip(n=5, source=(640, 480)):
    landmarks = _synthetic_faces(n, 200) + (220, 140, 0)
    matrices = [_matrix(_rotation([0.1 * i, -0.05 * i, 0.02]), (1.0 * i, 0.5, -60.0)) for i in range(n)]
    blendshapes = np.random.default_rng(0).uniform(0, 1, (n, 52)).astype(np.float32)
    frames = [np.roll(_texture(512, seed=i)[:480, :640], i, axis=1) for i in range(n)]
    return _track(landmarks, matrices, size=source, blendshapes=blendshapes), frames


def test_build_driving_signals_streams_frames_in_batches():
    track, frames = _synthetic_clip()
    reference = S.prepare_reference(frames[0], _track(track.landmarks[:1], track.matrices[:1], size=track.size))
    events = []
    results = [
        S.build_driving_signals(
            track, iter(frames), reference, image_encoder=_MeanClip(), fan_encoder=_MeanFan(), batch_frames=batch, progress=events.append
        )
        for batch in (2, 5)
    ]
    for signals in results:
        assert signals.face_parts.shape == (5, 3, 1024) and signals.pd_fpg.shape == (5, 548) and signals.neg_pd_fpg.shape == (1, 1, 548)
        assert signals.angles.shape == signals.translations.shape == (5, 3) and signals.drive_coeff.shape == (5, 51)
        assert np.array_equal(signals.reference_translation, reference.translation)
    assert torch.allclose(results[0].face_parts, results[1].face_parts) and torch.allclose(results[0].pd_fpg, results[1].pd_fpg)
    assert not torch.equal(results[0].face_parts[0], results[0].face_parts[1])  # each frame its own crops
    assert events[:4] == [ProgressEvent("driving signals", done, 5, "frame") for done in (0, 2, 4, 5)]
    assert np.allclose(results[0].drive_coeff[:, 17], track.blendshapes[:, 25])  # jawOpen


def test_build_driving_signals_refuses_a_frame_count_that_is_not_the_tracks():
    track, frames = _synthetic_clip()
    reference = S.prepare_reference(frames[0], _track(track.landmarks[:1], track.matrices[:1], size=track.size))
    with pytest.raises(ValueError, match="4 frames but its face track has 5"):
        S.build_driving_signals(track, frames[:4], reference, fan_encoder=_MeanFan())
    with pytest.raises(ValueError, match="more frames"):
        S.build_driving_signals(track, frames + frames[:1], reference, fan_encoder=_MeanFan())


def test_without_encoders_no_frame_is_read():
    track, _ = _synthetic_clip()
    reference = S.prepare_reference(np.zeros((480, 640, 3), np.uint8), _track(track.landmarks[:1], track.matrices[:1], size=track.size))

    def no_frames():
        raise AssertionError("frames were read")
        yield

    signals = S.build_driving_signals(track, no_frames(), reference, trans_ratio=0.5)
    assert len(signals) == 5 and signals.face_parts is None and signals.trans_ratio == 0.5


# ----------------------------------------------------------------------------------------
# real media
# ----------------------------------------------------------------------------------------


def test_reference_portrait_is_turned_to_its_right(model):
    path = require(SHARED / "media" / "majicmix1.jpg", "test portrait")
    image = cv2.imread(str(path))[..., ::-1].copy()
    reference = S.prepare_reference(image, tracking.track_image(image, model_path=model))
    angles, _ = S.head_pose(reference.track)
    assert reference.image.shape == (512, 512, 3) and reference.image.dtype == np.uint8
    assert -5.0 < reference.translation[2] < -2.5 and abs(reference.translation[0]) < 0.1
    assert angles[0, 1] < -0.15  # she faces the image's left: her right


def test_turned_head_clip_gives_negative_yaw_and_eye_crops_around_the_eyes(tracks):
    path = require(SHARED / "media" / "ysll.mp4", "test clip")
    track = tracks("ysll.mp4")
    frames = list(read_frames(path))
    crop = S.clip_crop(track)
    working = S.crop_track(track, crop)
    angles, _ = S.head_pose(working)
    assert angles[0, 1] < -0.6 and (angles[:, 1] < 0).all()  # up to 45 degrees to his right
    alignments = S.face_alignments(working.landmarks)
    windows = S.face_part_windows(working.landmarks, alignments)
    for frame_index in (0, len(track) - 1):
        for window, iris in zip(windows[:2], (468, 473)):
            alignment = alignments[frame_index]
            aligned = alignment[:, :2] @ working.landmarks[frame_index, iris, :2] + alignment[:, 2]
            x, y = window[:, :2] @ aligned + window[:, 2]
            assert 40 < x < 216 and 40 < y < 216
    crops = S.face_part_crops(crop.apply(frames[0]), alignments[0], windows)
    assert crops.shape == (3, 256, 256, 3) and crops.std() > 10


def test_open_jaw_reaches_the_arkit_jaw_open_coefficient(tracks):
    coefficients = S.arkit_coefficients(tracks("jue.mp4").blendshapes)
    assert coefficients[:, S.ARKIT_BLENDSHAPES.index("jawOpen")].max() > 0.3
    assert coefficients.shape[1] == 51


@pytest.mark.parametrize("name, size, crop", [("ysll.mp4", 512, True), ("jue.mp4", 128, False)])
def test_crops_from_the_face_patches_match_crops_from_the_decoded_frames(model, name, size, crop):
    """One decode: the crops are cut from the patches kept while tracking, not from the frames
    decoded a second time; measured on all frames: 0.3-0.5 grey levels (docs/signals.md)."""
    path = require(SHARED / "media" / name, "test clip")
    frames, boxes, pixels = [], [], []

    def keep(frame, landmarks):
        box = S.face_patch_box(landmarks, (frame.shape[1], frame.shape[0]))
        frames.append(frame)
        boxes.append(box)
        pixels.append(S.cut_patch(frame, box))

    track = tracking.track_video(path, max_frames=12, model_path=model, each_frame=keep)
    patches = S.FacePatches(np.stack(pixels), np.stack(boxes))
    square = S.clip_crop(track, size) if crop else S.whole_frame(track.size, size)
    working = S.crop_track(track, square)
    alignments = S.face_alignments(working.landmarks, size)
    windows = S.face_part_windows(working.landmarks, alignments)
    parts, motion = [], []
    for index, (frame, rebuilt) in enumerate(zip(frames, patches.working(square), strict=True)):
        decoded = square.apply(frame)
        parts.append(np.abs(S.face_part_crops(decoded, alignments[index], windows).astype(int) - S.face_part_crops(rebuilt, alignments[index], windows)).mean())
        motion.append(np.abs(S.pdfgc_crop(decoded, working.landmarks[index]).astype(int) - S.pdfgc_crop(rebuilt, working.landmarks[index])).mean())
    assert np.mean(parts) < 1 and np.mean(motion) < 1 and max(parts + motion) < 2
    reordered = patches.select(np.array([3, 3, 0]))
    assert len(reordered) == 3 and np.array_equal(list(reordered.working(square))[1], patches.working_frame(3, square))
