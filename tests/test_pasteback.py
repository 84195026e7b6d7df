"""Paste-back: generated working frames put back into the full-size reference picture."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from conftest import MEDIA, require
from hellomeme_cli.face.pasteback import CROP_BORDER, FACE_OVAL_LANDMARKS, PasteBack, head_travel
from hellomeme_cli.face.signals import OFFICIAL_FOCAL_LENGTH, DrivingSignals, SquareCrop, prepare_reference, whole_frame
from hellomeme_cli.face.tracking import track_image
from hellomeme_cli.media.video import read_image

RED_CAST = np.array([30, 0, 0])


def smooth_picture(width: int, height: int) -> np.ndarray:
    """A picture with only low frequencies, so resampling it changes it by less than a level or two."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [
        120 + 60 * np.sin(x / 97) * np.cos(y / 131),
        110 + 50 * np.cos((x + y) / 150),
        100 + 40 * np.sin(y / 83 + 1),
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def oval_landmarks(centre: tuple[float, float], half_width: float, half_height: float) -> np.ndarray:
    """(478, 3) landmarks with the face oval on an upright ellipse (10 on top, 152 at the chin)."""
    landmarks = np.zeros((478, 3))
    landmarks[:, :2] = centre
    angles = np.radians(-90 + 10 * np.arange(len(FACE_OVAL_LANDMARKS)))
    landmarks[list(FACE_OVAL_LANDMARKS), 0] = centre[0] + half_width * np.cos(angles)
    landmarks[list(FACE_OVAL_LANDMARKS), 1] = centre[1] + half_height * np.sin(angles)
    return landmarks


def shifted(frame: np.ndarray, offset: np.ndarray) -> np.ndarray:
    return np.clip(frame.astype(np.int64) + offset, 0, 255).astype(np.uint8)


def edge_step(paste: PasteBack, output: np.ndarray, picture: np.ndarray) -> float:
    """The red step a seam makes: the low-frequency red change (what the eye sees as a colour
    step; a changed hair strand is not one) where the generated frame dominates the blend
    (alpha in [0.5, 1)). Outside the mask the picture is exact, so any change there is a step."""
    alpha = paste.alpha
    seam = (alpha >= 0.5) & (alpha < 1)
    assert seam.sum() > 100
    change = cv2.GaussianBlur(output[..., 0].astype(np.float32) - picture[..., 0], (0, 0), paste.feather / 4)
    return float(np.abs(change[seam]).mean())


def crop_border(crop: SquareCrop, shape: tuple[int, ...]) -> np.ndarray:
    """True outside the crop and in its outer CROP_BORDER, over a picture of `shape`."""
    border = int(CROP_BORDER * crop.width)
    keep = np.ones(shape[:2], dtype=bool)
    top, left = max(crop.top + border + 1, 0), max(crop.left + border + 1, 0)
    keep[top : crop.top + crop.height - border - 1, left : crop.left + crop.width - border - 1] = False
    return keep


@pytest.fixture(scope="module")
def scene():
    """A 900 x 700 picture, a face at (430, 360), its 3x crop (a 512 working square)."""
    picture = smooth_picture(900, 700)
    crop = SquareCrop(430 - 300, 330 - 300, 600, 600, 512)
    return picture, crop, oval_landmarks((430, 360), 75, 100)


def test_output_is_the_picture_size_and_far_pixels_are_exact(scene):
    picture, crop, landmarks = scene
    paste = PasteBack(picture, crop, landmarks)
    output = paste.paste(shifted(crop.apply(picture), RED_CAST))
    assert output.shape == picture.shape and output.dtype == np.uint8
    untouched = crop_border(crop, picture.shape)
    assert untouched.sum() > 300_000
    assert np.array_equal(output[untouched], picture[untouched])
    assert np.array_equal(output[paste.alpha == 0], picture[paste.alpha == 0])
    assert (paste.alpha[untouched] == 0).all()


def test_the_head_region_is_taken_whole_from_the_generated_frame(scene):
    picture, crop, landmarks = scene
    paste = PasteBack(picture, crop, landmarks)
    assert (paste.alpha[landmarks[:, 1].round().astype(int), landmarks[:, 0].round().astype(int)] == 1).all()
    generated = crop.apply(picture)
    face = crop.map_points(landmarks[1, :2]).round().astype(int)
    cv2.circle(generated, tuple(face.tolist()), 40, (0, 255, 0), -1)
    output = paste.paste(generated)
    centre = output[355:366, 425:436].reshape(-1, 3).astype(np.int64)
    assert np.abs(centre - (0, 255, 0)).max() <= 2


def test_colours_are_matched_at_the_seam(scene):
    picture, crop, landmarks = scene
    generated = shifted(crop.apply(picture), RED_CAST)
    matched, raw = PasteBack(picture, crop, landmarks), PasteBack(picture, crop, landmarks, match_colours=False)
    assert edge_step(raw, raw.paste(generated), picture) > 15
    assert edge_step(matched, matched.paste(generated), picture) < 2


def test_a_cast_that_varies_across_the_frame_is_matched_at_the_seam_too(scene):
    picture, crop, landmarks = scene
    varying = np.zeros((512, 512, 3))
    varying[..., 0] = np.linspace(-70, 70, 512)[None, :]  # its median is 0: only the local correction helps
    generated = shifted(crop.apply(picture), varying.round().astype(np.int64))
    matched, raw = PasteBack(picture, crop, landmarks), PasteBack(picture, crop, landmarks, match_colours=False)
    assert edge_step(raw, raw.paste(generated), picture) > 10
    assert edge_step(matched, matched.paste(generated), picture) < 2


def test_a_crop_at_the_picture_edge(scene):
    picture = smooth_picture(640, 480)
    crop, landmarks = SquareCrop(0, 0, 420, 420, 256), oval_landmarks((200, 230), 55, 70)
    paste = PasteBack(picture, crop, landmarks)
    output = paste.paste(shifted(crop.apply(picture), RED_CAST))
    assert output.shape == picture.shape
    assert np.array_equal(output[crop_border(crop, picture.shape)], picture[crop_border(crop, picture.shape)])
    assert edge_step(paste, output, picture) < 2


def test_a_letterboxed_crop_reaching_past_the_picture():
    picture = smooth_picture(1000, 600)
    crop, landmarks = whole_frame((1000, 600), 512), oval_landmarks((520, 280), 60, 80)
    assert crop.top < 0
    paste = PasteBack(picture, crop, landmarks)
    generated = shifted(crop.apply(picture), RED_CAST)
    cv2.circle(generated, tuple(crop.map_points(np.array([520.0, 280.0])).round().astype(int).tolist()), 15, (0, 0, 255), -1)
    output = paste.paste(generated)
    assert output.shape == picture.shape
    assert np.abs(output[276:285, 516:525].reshape(-1, 3).astype(np.int64) - (0, 0, 255)).max() <= 3
    assert np.array_equal(output[paste.alpha == 0], picture[paste.alpha == 0])
    assert (paste.alpha[:, :60] == 0).all() and (paste.alpha[:, -60:] == 0).all()
    assert edge_step(paste, output, picture) < 2


@pytest.mark.parametrize("size", [128, 768])
def test_any_working_size(scene, size):
    picture, crop, landmarks = scene
    crop = SquareCrop(crop.left, crop.top, crop.width, crop.height, size)
    paste = PasteBack(picture, crop, landmarks)
    output = paste.paste(shifted(crop.apply(picture), RED_CAST))
    assert output.shape == picture.shape
    assert edge_step(paste, output, picture) < 2
    with pytest.raises(ValueError, match=f"must be \\({size}, {size}, 3\\) uint8"):
        paste.paste(np.zeros((512 if size != 512 else 256, size, 3), np.uint8))


def test_frames_are_streamed(scene):
    picture, crop, landmarks = scene
    generated = crop.apply(picture)
    taken = []

    def endless():
        while True:
            taken.append(1)
            yield generated

    pasted = list(itertools.islice(PasteBack(picture, crop, landmarks)(endless()), 3))
    assert len(pasted) == 3 and len(taken) == 3
    assert pasted[0] is not pasted[1] and np.array_equal(pasted[0], pasted[1])


def test_head_travel_follows_the_pose_square_and_widens_the_head_region(scene):
    reference = np.array([0.0, 0.0, -2.0])
    translations = np.array([[0.0, 0.0, -2.0], [0.01, 0.0, -2.0], [0.02, 0.0, -2.0]])
    signals = DrivingSignals(np.zeros((3, 3)), translations, reference, np.zeros((3, 52), np.float32), trans_ratio=0.5)
    assert head_travel(signals) == pytest.approx(OFFICIAL_FOCAL_LENGTH * 0.01 / 2.0)
    still = DrivingSignals(np.zeros((3, 3)), translations, reference, np.zeros((3, 52), np.float32), trans_ratio=0.0)
    assert head_travel(still) == 0.0

    picture, crop, landmarks = scene
    near, wide = PasteBack(picture, crop, landmarks).alpha, PasteBack(picture, crop, landmarks, travel=24).alpha
    assert (wide >= near).all() and (wide == 1).sum() > (near == 1).sum() * 1.1
    assert (wide[crop_border(crop, picture.shape)] == 0).all()


def real_reference(picture: np.ndarray, model, crop: bool = True):
    return prepare_reference(picture, track_image(picture, model_path=model), 512, crop)


def simulated_generation(working: np.ndarray, turn: float = 0.0) -> np.ndarray:
    """What the model gives back, roughly: softer (the VAE), a colour cast, the head turned `turn` degrees."""
    rotation = cv2.getRotationMatrix2D((256, 280), turn, 1.0)
    turned = cv2.warpAffine(working, rotation, (512, 512), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    return shifted(cv2.GaussianBlur(turned, (0, 0), 0.8), np.array([25, 0, -15]))


def test_a_real_reference(model):
    picture = read_image(require(MEDIA / "cg1.jpg", "portrait"))
    reference = real_reference(picture, model)
    paste = PasteBack.from_reference(picture, reference)
    output = paste.paste(simulated_generation(reference.image))
    assert output.shape == (1024, 1024, 3)
    untouched = crop_border(reference.crop, picture.shape)
    assert np.array_equal(output[untouched], picture[untouched])
    track = track_image(picture, model_path=model)
    face = track.landmarks[0, list(FACE_OVAL_LANDMARKS), :2].round().astype(int)
    assert (paste.alpha[face[:, 1], face[:, 0]] == 1).all()
    raw = PasteBack.from_reference(picture, reference, match_colours=False)
    assert edge_step(raw, raw.paste(simulated_generation(reference.image)), picture) > 12
    assert edge_step(paste, output, picture) < 2


def meme_template(model) -> np.ndarray:
    """A 1280 x 900 meme: a portrait on white, a caption under it."""
    portrait = read_image(require(MEDIA / "majicmix1.jpg", "portrait"))
    picture = np.full((900, 1280, 3), 255, np.uint8)
    picture[40:640, 340:940] = cv2.resize(portrait, (600, 600), interpolation=cv2.INTER_AREA)
    cv2.putText(picture, "WHEN THE CODE WORKS", (80, 810), cv2.FONT_HERSHEY_DUPLEX, 2.6, (0, 0, 0), 6)
    return picture


@pytest.mark.parametrize("crop", [True, False], ids=["crop", "letterbox"])
def test_a_meme_keeps_its_border_and_caption(model, crop):
    picture = meme_template(model)
    reference = real_reference(picture, model, crop)
    paste = PasteBack.from_reference(picture, reference)
    output = paste.paste(simulated_generation(reference.image, turn=3.0))
    assert output.shape == picture.shape
    kept = np.ones(picture.shape[:2], dtype=bool)
    kept[20:660, 320:960] = False  # the portrait and 20 pixels round it
    assert np.array_equal(output[kept], picture[kept])
    assert np.array_equal(output[700:], picture[700:])  # the caption
    assert np.abs(output[300:400, 550:700].astype(np.int64) - picture[300:400, 550:700]).mean() > 3  # the face changed
