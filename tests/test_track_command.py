"""`hellomeme track`: the saved track and the preview, on a real clip with the real face model."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import MEDIA, require
from hellomeme_cli.cli import app
from hellomeme_cli.face.driving import TEMPLATE_FORMAT, load_track
from hellomeme_cli.face.signals import PATCH_SIZE
from hellomeme_cli.face.tracking import BLENDSHAPE_NAMES
from hellomeme_cli.media.video import probe_video
from hellomeme_cli.weights.cache import sha256_of

runner = CliRunner()


def test_track_saves_one_row_per_frame_and_a_preview_with_the_audio(workdir):
    clip = require(MEDIA / "tndtc.mp4", "test clip")
    result = runner.invoke(app, ["track", str(clip), "--preview", "preview.mp4"])
    assert result.exit_code == 0, result.output
    saved = np.load(workdir / "tndtc.track.npz")
    assert saved["landmarks"].shape == (34, 478, 3) and saved["blendshapes"].shape == (34, 52)
    assert saved["pose_angles"].shape == (34, 3) and saved["filled"].shape == (34,)
    assert tuple(saved["blendshape_names"]) == BLENDSHAPE_NAMES and float(saved["fps"]) == 15
    assert len(load_track(workdir / "tndtc.track.npz")) == 34
    preview = probe_video(workdir / "preview.mp4")
    assert (preview.frame_count, preview.fps, preview.width, preview.has_audio) == (34, 15, 512, True)
    assert "34 frames at 15 fps, 0 without a face" in result.stdout


def test_track_max_frames_and_no_smoothing(workdir, tracks):
    clip = require(MEDIA / "jue.mp4", "test clip")
    for name, options in (("raw.npz", ["--no-smooth"]), ("smooth.npz", [])):
        result = runner.invoke(app, ["track", str(clip), "--max-frames", "10", *options, "-o", name])
        assert result.exit_code == 0, result.output
    raw, smooth = load_track(workdir / "raw.npz"), load_track(workdir / "smooth.npz")
    assert len(raw) == len(smooth) == 10
    # The tracker is causal: the first 10 rows of the whole clip's raw track are these 10 frames'.
    assert np.array_equal(raw.landmarks, tracks("jue.mp4", smoothed=False).landmarks[:10])
    assert np.abs(raw.landmarks - smooth.landmarks).mean() > 0.05


def test_the_template_holds_the_patches_and_the_timing(workdir):
    clip = require(MEDIA / "tndtc.mp4", "test clip")
    assert runner.invoke(app, ["track", str(clip), "--max-frames", "4", "-o", "t.npz"]).exit_code == 0
    saved = np.load(workdir / "t.npz")
    assert int(saved["format"]) == TEMPLATE_FORMAT and str(saved["source"]) == str(clip.absolute())
    assert str(saved["source_sha256"]) == sha256_of(clip)
    assert saved["patches"].shape == (4, PATCH_SIZE, PATCH_SIZE, 3) and saved["patch_boxes"].shape == (4, 3)
    assert np.allclose(saved["timestamps"], np.arange(4) / 15) and float(saved["duration"]) == pytest.approx(4 / 15)
    assert tuple(saved["rate"]) == (15, 1) and not bool(saved["variable_rate"])
