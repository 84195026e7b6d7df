"""`hellomeme track`: the saved track and the preview, on a real clip with the real face model."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from conftest import MEDIA, require
from hellomeme_cli.cli import app
from hellomeme_cli.preview import load_track
from hellomeme_cli.tracking import BLENDSHAPE_NAMES
from hellomeme_cli.video import probe_video

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


def test_track_max_frames_and_no_smoothing(workdir):
    clip = require(MEDIA / "jue.mp4", "test clip")
    result = runner.invoke(app, ["track", str(clip), "--max-frames", "10", "--no-smooth", "-o", "short.npz"])
    assert result.exit_code == 0, result.output
    assert np.load(workdir / "short.npz")["landmarks"].shape[0] == 10
