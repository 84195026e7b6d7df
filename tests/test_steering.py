"""The motion controls (steering.py) on real signals: a real driving clip's track and a real
portrait's own signals; then through the command line with tiny weights."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import MEDIA, require
from hellomeme_cli.face import signals as S
from hellomeme_cli.face import tracking
from hellomeme_cli.cli import app
from hellomeme_cli.face.steering import steer
from hellomeme_cli.media.video import read_image

runner = CliRunner()


@pytest.fixture(scope="module")
def clip_and_own(model):
    """The signals of 40 frames of a real clip driving a real portrait, and the portrait's own,
    with stand-in face-part and PD-FGC embeddings (the controls treat every expression input alike)."""
    image = read_image(require(MEDIA / "majicmix1.jpg", "portrait"))
    reference = S.prepare_reference(image, tracking.track_image(image, model_path=model))
    clip = tracking.track_video(require(MEDIA / "ysll.mp4", "clip"), max_frames=40, model_path=model)
    signals = S.build_driving_signals(clip, [], reference)
    own = S.build_driving_signals(tracking.track_image(image, model_path=model), [image], reference)
    generator = torch.Generator().manual_seed(0)
    for item in (signals, own):
        item.face_parts = torch.randn(len(item), 3, 1024, generator=generator)
        item.pd_fpg = torch.randn(len(item), 548, generator=generator)
    return signals, own


def test_relative_pose_starts_at_the_references_pose_and_turns_by_the_drivers_change(clip_and_own):
    signals, own = clip_and_own
    steered = steer(signals, own, pose="relative")
    first = steered.control_inputs(0, 1)["condition"]
    assert torch.equal(first, own.control_inputs(0, 1)["condition"])
    assert not torch.equal(first, signals.control_inputs(0, 1)["condition"])  # the clip does not rest in the portrait's pose
    driver, ours = S.angles_to_rotation(signals.angles), S.angles_to_rotation(steered.angles)
    reference = S.angles_to_rotation(own.angles[:1])[0]
    np.testing.assert_allclose(ours @ reference.T, driver @ driver[0].T, atol=1e-9)
    assert np.degrees(np.abs(steered.angles - steered.angles[0]).max()) > 5  # the clip's head turn is kept
    assert np.array_equal(steered.drive_coeff, signals.drive_coeff) and steered.pd_fpg is signals.pd_fpg


def test_motion_pose_keeps_the_references_expression(clip_and_own):
    signals, own = clip_and_own
    steered = steer(signals, own, motion="pose")
    assert np.array_equal(steered.drive_coeff, np.repeat(own.drive_coeff, len(signals), axis=0))
    assert torch.equal(steered.face_parts, own.face_parts.expand(len(signals), -1, -1))
    assert torch.equal(steered.pd_fpg, own.pd_fpg.expand(len(signals), -1))
    assert np.array_equal(steered.angles, signals.angles)


def test_motion_expression_keeps_the_references_head_pose(clip_and_own):
    signals, own = clip_and_own
    steered = steer(signals, own, motion="expression")
    conditions = steered.control_inputs(0, len(signals))["condition"][0]
    reference = own.control_inputs(0, 1)["condition"][0, :, 0]
    assert all(torch.equal(conditions[:, t], reference) for t in range(len(signals)))
    assert np.array_equal(steered.drive_coeff, signals.drive_coeff)


def test_expression_scale_freezes_or_multiplies_the_change_from_the_first_frame(clip_and_own):
    signals, own = clip_and_own
    frozen = steer(signals, own, expression_scale=0)
    assert np.array_equal(frozen.drive_coeff, np.repeat(signals.drive_coeff[:1], len(signals), axis=0))
    assert torch.equal(frozen.pd_fpg, signals.pd_fpg[:1].expand(len(signals), -1))
    doubled = steer(signals, own, expression_scale=2)
    change = signals.drive_coeff - signals.drive_coeff[:1]
    unclipped = (signals.drive_coeff[:1] + 2 * change >= 0) & (signals.drive_coeff[:1] + 2 * change <= 1)
    assert unclipped.mean() > 0.5 and np.abs(change).max() > 0.05
    np.testing.assert_allclose((doubled.drive_coeff - signals.drive_coeff[:1])[unclipped], 2 * change[unclipped], atol=1e-6)
    assert doubled.drive_coeff.min() >= 0 and doubled.drive_coeff.max() <= 1
    torch.testing.assert_close(doubled.face_parts - signals.face_parts[:1], 2 * (signals.face_parts - signals.face_parts[:1]))
    assert np.array_equal(doubled.angles, signals.angles)


@pytest.mark.parametrize(
    "options",
    [["--pose", "relative"], ["--motion", "pose"], ["--motion", "expression"], ["--expression-scale", "3"], ["--smooth-pose", "10"], ["--smooth-expression", "0"]],
)
def test_each_control_changes_the_video(workdir, options):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "ysll.mp4", "clip")
    common = [str(reference), str(clip), "--size", "128", "--steps", "2", "--max-frames", "6", "--seed", "3", "--version", "v1", "--control", "blendshapes"]
    baseline = workdir / "baseline.mp4"
    if not baseline.exists():
        assert runner.invoke(app, ["animate", *common, "-o", str(baseline)]).exit_code == 0
    result = runner.invoke(app, ["animate", *common, *options, "-o", str(workdir / "steered.mp4")])
    assert result.exit_code == 0, result.output
    from hellomeme_cli.media.video import read_frames

    base, steered = (np.stack(list(read_frames(path))).astype(int) for path in (baseline, workdir / "steered.mp4"))
    assert base.shape == steered.shape and np.abs(base - steered).mean() > 0.5


@pytest.mark.parametrize(
    "options, message",
    [
        (["--motion", "expression", "--pose", "relative"], "--motion expression keeps the reference's head pose"),
        (["--motion", "expression", "--trans-ratio", "0.5"], "--motion expression keeps the reference's head pose"),
        (["--motion", "pose", "--expression-scale", "2"], "--motion pose keeps the reference's expression"),
        (["--pose", "sideways"], "--pose must be one of absolute, relative"),
    ],
)
def test_combinations_that_make_no_sense_are_one_line(workdir, options, message):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "ysll.mp4", "clip")
    result = subprocess.run([sys.executable, "-m", "hellomeme_cli", "animate", str(reference), str(clip), *options], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr
