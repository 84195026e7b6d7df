"""HelloMeme v2 through the command line, offline: the registry entry, `weights fetch --version`,
and `animate` / `image --version v2` end to end on tiny random v2 networks from `make-tiny`
(the v2 networks' numerics are checked against the official code in test_conformance.py and
test_conformance_v2_modules.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import MEDIA, require
from hellomeme_cli.cli import app
from hellomeme_cli.models import HMV2ControlNet, HMV2ControlNet2
from hellomeme_cli.versions import DEFAULT_VIDEO_VERSION, any_version, get_version, resolve
from hellomeme_cli.video import probe_video, read_image
from hellomeme_cli.weights import WeightCache

FAST = ["--size", "128", "--steps", "2"]
runner = CliRunner()


def test_v2_entry_names_the_v2_networks_and_weights():
    v2 = get_version("v2")
    assert resolve(v2.control("blendshapes").control_net) is HMV2ControlNet
    assert resolve(v2.control("pdfgc").control_net) is HMV2ControlNet2
    assert v2.components("blendshapes", "video") == ["sd15", "hm2_reference", "hm2_animatediff_frame12", "hm2_control", "image_encoder", "face_landmarker"]
    assert v2.components("pdfgc", "image") == ["sd15", "hm2_reference", "hm2_control2", "pd_fgc_motion", "face_landmarker"]
    # The official app's defaults: 25 steps, guidance 1.5, HMControlNet2.
    assert (v2.defaults.steps, v2.defaults.guidance, v2.defaults.overlap, v2.defaults.control) == (25, 1.5, 4, "pdfgc")
    assert get_version(DEFAULT_VIDEO_VERSION, "video") is not None


def test_weights_fetch_for_a_version_fetches_only_what_it_needs(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setenv("HELLOMEME_HOME", str(tmp_path))
    monkeypatch.setattr(WeightCache, "fetch", lambda self, names=None, progress=None: asked.append(names) or [])
    result = runner.invoke(app, ["weights", "fetch", "--version", "v2"])
    assert result.exit_code == 0, result.output
    assert sorted(asked[0]) == sorted(
        ["sd15", "hm2_reference", "hm2_animatediff_frame12", "hm2_control", "image_encoder", "hm2_control2", "pd_fgc_motion", "face_landmarker"]
    )


def test_tiny_v2_weights_are_in_the_released_layout(tiny_cache):
    cache = WeightCache(tiny_cache)
    for name in any_version("v2").all_components():
        for file in cache.component(name).files:  # every file the lock lists, where a download puts it
            assert (cache.path(name) / file.path).is_file(), f"{name}/{file.path}"
    assert json.loads((cache.path("hm2_reference") / "config.json").read_text())["version"] == "v2"


@pytest.mark.parametrize("control", ["blendshapes", "pdfgc"])
def test_animate_v2_gives_one_frame_per_driving_frame(workdir, control):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "jue.mp4", "clip")
    result = runner.invoke(app, ["animate", str(reference), str(clip), *FAST, "--version", "v2", "--control", control, "--max-frames", "3"])
    assert result.exit_code == 0, result.output
    info = probe_video(workdir / "majicmix1_jue.mp4")
    assert (info.frame_count, info.width, info.height) == (3, 128, 128)


def test_image_v2_writes_one_picture(workdir):
    reference, drive = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "chillout.jpg", "portrait")
    result = runner.invoke(app, ["image", str(reference), str(drive), *FAST, "--version", "v2", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert read_image(workdir / "majicmix1_chillout.png").shape == (128, 128, 3)


@pytest.mark.parametrize("command", [["animate", "{ref}", "{drive}"], ["image", "{ref}", "{drive}"], ["weights", "fetch"]])
def test_an_unknown_version_is_one_line_exit_1(workdir, command):
    reference, drive = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "chillout.jpg", "portrait")
    arguments = [a.format(ref=reference, drive=drive) for a in command]
    result = subprocess.run([sys.executable, "-m", "hellomeme_cli", *arguments, "--version", "v9"], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'v9'" in lines[0] and "v2" in lines[0], result.stderr
