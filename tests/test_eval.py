"""`hellomeme eval` and `hm.evaluate`: each metric measured on clips whose answer is known, and
shown to fail where it should: the driving clip scored as its own output, the same clip mirrored,
shifted in time, turned, cut at window boundaries, blurred; a still portrait against itself and
its mirror image (identity plumbing: the tiny identity model is random); bad input in one line."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import hellomeme_cli as hm
from conftest import MEDIA, require
from hellomeme_cli.cli import app
from hellomeme_cli.media.video import read_frames, read_image, write_video
from hellomeme_cli.weights.cache import WeightCache

CLIP, PORTRAIT = "jue.mp4", "chillout.jpg"
FRAMES = 48  # of the clip, at 15 fps: about 3 seconds


@pytest.fixture(scope="module")
def frames():
    return list(read_frames(require(MEDIA / CLIP, "test clip"), FRAMES))


def scored(tiny_cache, output, driving=None, **options) -> hm.Evaluation:
    return hm.evaluate(output, driving or MEDIA / CLIP, MEDIA / PORTRAIT, cache=WeightCache(tiny_cache), **options)


def made(tmp_path, name: str, frames: list[np.ndarray]):
    return write_video(frames, tmp_path / name, 15)


def turned(frame: np.ndarray, degrees: float) -> np.ndarray:
    height, width = frame.shape[:2]
    return cv2.warpAffine(frame, cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0), (width, height), borderMode=cv2.BORDER_REFLECT)


def test_the_driving_clip_scored_as_its_own_output_has_no_error(tiny_cache):
    summary = scored(tiny_cache, MEDIA / CLIP).summary
    assert summary["faceless_frames"] == 0 and summary["frames"] == 84
    assert summary["pose_error_deg"] < 0.01 and summary["movement_error"] < 1e-6
    assert summary["expression_error"] < 1e-6 and summary["expression_error_mouth"] < 1e-6
    assert summary["flicker"] == 1.0 and summary["audio_offset_ms"] == 0.0
    assert summary["duration_s"] == summary["driving_duration_s"] == 5.6


def test_pose_error_grows_with_a_mirror_a_time_shift_and_a_turn(tiny_cache, tmp_path, frames):
    errors = {
        "clean": scored(tiny_cache, made(tmp_path, "clean.mp4", frames)),
        "mirrored": scored(tiny_cache, made(tmp_path, "mirrored.mp4", [np.ascontiguousarray(f[:, ::-1]) for f in frames])),
        "shifted": scored(tiny_cache, made(tmp_path, "shifted.mp4", frames[10:] + frames[-1:] * 10)),
        "turned 5": scored(tiny_cache, made(tmp_path, "turned5.mp4", [turned(f, 5) for f in frames])),
        "turned 15": scored(tiny_cache, made(tmp_path, "turned15.mp4", [turned(f, 15) for f in frames])),
    }
    pose = {name: evaluation.summary["pose_error_deg"] for name, evaluation in errors.items()}
    assert pose["clean"] < 0.5  # H.264 at CRF 18 moves the landmarks a little
    assert pose["mirrored"] > 2 and pose["shifted"] > 1
    assert 3 < pose["turned 5"] < 8 and 12 < pose["turned 15"] < 19, pose  # the roll it was turned by
    assert errors["shifted"].summary["expression_error"] > errors["clean"].summary["expression_error"] + 0.01


def test_the_seam_score_stands_out_where_the_clip_jumps_at_window_boundaries(tiny_cache, tmp_path):
    source = list(read_frames(MEDIA / CLIP))
    windows = tuple((start, start + 12) for start in range(0, FRAMES, 12))
    cut = [source[i + 6 * (i // 12)] for i in range(FRAMES)]  # 6 frames skipped at each boundary
    jumped = scored(tiny_cache, made(tmp_path, "cut.mp4", cut), windows=windows)
    clean = scored(tiny_cache, made(tmp_path, "clean.mp4", source[:FRAMES]), windows=windows)
    assert jumped.seams == [12, 24, 36]
    assert jumped.summary["seam_score"] > 2.5 and clean.summary["seam_score"] < 1.6, (jumped.summary["seam_score"], clean.summary["seam_score"])
    changes = jumped.frames["frame_change"]
    assert min(changes[seam] for seam in jumped.seams) > max(change for i, change in enumerate(changes) if change is not None and i not in jumped.seams)


def test_identity_is_one_for_the_reference_itself_and_less_for_its_mirror_image(tiny_cache, tmp_path):
    """The tiny identity model is random weights: this checks the plumbing (alignment, embedding,
    cosine), not what a face recognition network makes of two faces (docs/eval.md)."""
    portrait = read_image(MEDIA / PORTRAIT)
    portrait = portrait[: portrait.shape[0] // 2 * 2, : portrait.shape[1] // 2 * 2]
    still = made(tmp_path, "still.mp4", [portrait] * 5)
    mirror = made(tmp_path, "mirror.mp4", [np.ascontiguousarray(portrait[:, ::-1])] * 5)
    same, flipped = scored(tiny_cache, still, driving=still), scored(tiny_cache, mirror, driving=still)
    assert same.summary["identity"] > 0.9999 and flipped.summary["identity"] < same.summary["identity"] - 1e-4


def test_self_reenactment_adds_psnr_and_ssim_which_a_blur_lowers(tiny_cache, tmp_path, frames):
    clean = scored(tiny_cache, made(tmp_path, "clean.mp4", frames), self_reenactment=True)
    blurred = scored(tiny_cache, made(tmp_path, "blurred.mp4", [cv2.GaussianBlur(f, (0, 0), 3) for f in frames]), self_reenactment=True)
    assert clean.summary["psnr"] > 35 and clean.summary["ssim"] > 0.95
    assert blurred.summary["psnr"] < clean.summary["psnr"] - 5 and blurred.summary["ssim"] < clean.summary["ssim"] - 0.05
    assert "psnr" not in scored(tiny_cache, made(tmp_path, "again.mp4", frames[:5])).summary


def test_the_command_prints_a_table_and_writes_json_and_a_picture(tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HELLOMEME_HOME", str(tiny_cache))
    clip = MEDIA / CLIP
    result = CliRunner().invoke(app, ["eval", str(clip), "--drive", str(clip), "--ref", str(MEDIA / PORTRAIT), "--window", "12",
                                      "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "e.png")])
    assert result.exit_code == 0, result.output
    assert "pose_error_deg" in result.stdout and "not measured: fid" in result.stdout
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["summary"]["frames"] == 84 and len(saved["frames"]["identity"]) == 84 and saved["seams"] == [12, 24, 36, 48, 60, 72]
    picture = read_image(tmp_path / "e.png")
    assert picture.shape[1] == 1200 and picture.shape[0] > 600


@pytest.mark.parametrize("case", ["faceless output", "short driving clip", "missing reference"])
def test_bad_input_is_one_line(tiny_cache, tmp_path, monkeypatch, case):
    monkeypatch.setenv("HELLOMEME_HOME", str(tiny_cache))
    clip, portrait = str(MEDIA / CLIP), str(MEDIA / PORTRAIT)
    gray = str(write_video([np.full((64, 64, 3), 128, np.uint8)] * 6, tmp_path / "gray.mp4", 15))
    short = str(write_video(list(read_frames(MEDIA / CLIP, 5)), tmp_path / "short.mp4", 15))
    arguments, message = {
        "faceless output": ([gray, "--drive", clip, "--ref", portrait], "gray.mp4: no face found in any of its 6 frames"),
        "short driving clip": ([clip, "--drive", short, "--ref", portrait], "shorter than the output"),
        "missing reference": ([clip, "--drive", clip, "--ref", str(tmp_path / "nobody.jpg")], "nobody.jpg: no such file"),
    }[case]
    result = CliRunner().invoke(app, ["eval", *arguments])
    assert isinstance(result.exception, hm.HellomemeError) and message in str(result.exception), result.output


def test_the_targets_are_what_the_motion_controls_asked_for():
    """With `--pose relative` the output's first frame should have the reference's own pose and later
    ones turn by the driver's change; with `--motion pose` keep its own expression; a scale scales."""
    from hellomeme_cli.face.signals import angles_to_rotation
    from hellomeme_cli.quality.evaluate import RunSettings, _targets
    from hellomeme_cli.quality.metrics import rotation_error

    driver = np.radians([[0.0, 10.0, 0.0], [0.0, 30.0, 0.0], [5.0, 10.0, 0.0]])
    own = np.radians([[0.0, -20.0, 0.0]])
    coefficients, own_coefficients = np.full((3, 51), 0.2), np.full((1, 51), 0.7)
    coefficients[1] = 0.6
    angles, expression = _targets(RunSettings(pose="relative"), driver, coefficients, own, own_coefficients)
    assert rotation_error(angles[:1], own)[0] < 1e-9  # frame 0: the reference's own pose
    turn = angles_to_rotation(driver[1:2])[0] @ angles_to_rotation(driver[:1])[0].T
    assert rotation_error(angles[1:2], own)[0] == pytest.approx(np.degrees(np.arccos((np.trace(turn) - 1) / 2)))
    assert np.array_equal(expression, coefficients)
    assert np.array_equal(_targets(RunSettings(motion="pose"), driver, coefficients, own, own_coefficients)[1], np.full((3, 51), 0.7))
    scaled = _targets(RunSettings(expression_scale=2.0), driver, coefficients, own, own_coefficients)[1]
    assert scaled[1] == pytest.approx(np.full(51, 1.0)) and scaled[2] == pytest.approx(np.full(51, 0.2))  # 0.2 + 2 (0.6 - 0.2), clipped
