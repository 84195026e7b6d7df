"""Every HelloMeme version through the command line, offline: the registry entries,
`weights fetch --version`, and `animate` / `image --version vN` end to end on tiny random
networks from `make-tiny` (the networks' and samplers' numerics are checked against the
official code in the test_conformance*.py files)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import MEDIA, require
from hellomeme_cli.cli import app
from hellomeme_cli.models import HMV2ControlNet, HMV2ControlNet2
from hellomeme_cli.versions import DEFAULT_IMAGE_VERSION, DEFAULT_VIDEO_VERSION, VERSIONS, any_version, get_version, resolve, version_names
from hellomeme_cli.media.video import probe_video, read_image
from hellomeme_cli.weights.cache import WeightCache, read_lock

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
    assert (DEFAULT_VIDEO_VERSION, DEFAULT_IMAGE_VERSION) == ("v2", "v5")  # the official app's


def test_every_entry_names_classes_that_exist_and_components_the_lock_has():
    lock = read_lock()
    assert version_names("video") == ("v1", "v2", "v3", "v4", "v5", "v5b")
    assert version_names("image") == ("v1", "v2", "v3", "v4", "v5", "v5b", "v5c")
    for version in VERSIONS.values():
        names = [version.reference_net, version.denoiser, version.reference_adapter, version.sampler]
        names += [version.motion_adapter] if version.motion_adapter else []
        names += [spec.cls for spec in version.schedulers.values()]
        for kind in version.controls.values():
            names += [kind.control_net] + ([kind.control_proj] if kind.control_proj else [])
        for name in names:
            assert isinstance(resolve(name), type), name
        assert set(version.all_components()) <= set(lock), version.name
        assert version.control().name == "pdfgc"  # the official app's control, for every version


@pytest.mark.parametrize(
    "version, expected",
    [
        ("v3", ["sd15", "hm3_reference", "hm3_animatediff", "hm3_motion", "hm3_control_mix", "image_encoder", "pd_fgc_motion", "face_landmarker"]),
        ("v4", ["sd15", "hm4_reference", "hm4_animatediff", "hm4_motion", "hm_control_base", "hm4_control_proj", "image_encoder", "pd_fgc_motion", "face_landmarker"]),
        ("v5", ["sd15", "hm5_reference", "hm5_motion", "hm5_control_base", "hm5_control_proj", "image_encoder", "pd_fgc_motion", "face_landmarker"]),
        ("v5b", ["sd15", "hm5b_reference", "hm5_motion", "hm5_control_base", "hm5_control_proj", "image_encoder", "pd_fgc_motion", "face_landmarker"]),
        ("v5c", ["sd15", "hm5c_reference", "hm5_control_base", "hm5c_control_proj", "image_encoder", "pd_fgc_motion", "face_landmarker"]),
    ],
)
def test_weights_fetch_asks_for_exactly_the_versions_components(monkeypatch, tmp_path, version, expected):
    asked = []
    monkeypatch.setenv("HELLOMEME_HOME", str(tmp_path))
    monkeypatch.setattr(WeightCache, "fetch", lambda self, names=None, progress=None: asked.append(names) or [])
    result = runner.invoke(app, ["weights", "fetch", "--version", version])
    assert result.exit_code == 0, result.output
    assert sorted(asked[0]) == sorted(expected)


def test_weights_fetch_for_a_version_fetches_only_what_it_needs(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setenv("HELLOMEME_HOME", str(tmp_path))
    monkeypatch.setattr(WeightCache, "fetch", lambda self, names=None, progress=None: asked.append(names) or [])
    result = runner.invoke(app, ["weights", "fetch", "--version", "v2"])
    assert result.exit_code == 0, result.output
    assert sorted(asked[0]) == sorted(
        ["sd15", "hm2_reference", "hm2_animatediff_frame12", "hm2_control", "image_encoder", "hm2_control2", "pd_fgc_motion", "face_landmarker"]
    )


@pytest.mark.parametrize("version", list(VERSIONS))
def test_tiny_weights_are_in_the_released_layout(tiny_cache, version):
    cache = WeightCache(tiny_cache)
    for name in any_version(version).all_components():
        for file in cache.component(name).files:  # every file the lock lists, where a download puts it
            assert (cache.path(name) / file.path).is_file(), f"{name}/{file.path}"
    if version == "v2":
        assert json.loads((cache.path("hm2_reference") / "config.json").read_text())["version"] == "v2"


@pytest.mark.parametrize("control", ["blendshapes", "pdfgc"])
def test_animate_v2_gives_one_frame_per_driving_frame(workdir, control):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "jue.mp4", "clip")
    result = runner.invoke(app, ["animate", str(reference), str(clip), *FAST, "--version", "v2", "--control", control, "--max-frames", "3"])
    assert result.exit_code == 0, result.output
    info = probe_video(workdir / "majicmix1_jue_v2.mp4")
    assert (info.frame_count, info.width, info.height) == (3, 128, 128)


# v3 and v5 at 14 frames: two windows, so the recursion's margin pass and motion pads run; v1 at 1 frame
# (the official v1/v2 code crashes on 1-3 frames).
@pytest.mark.parametrize("version, frames", [("v1", 1), ("v3", 14), ("v4", 3), ("v5", 14), ("v5b", 3)])
def test_animate_every_version_gives_one_frame_per_driving_frame(workdir, version, frames):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "jue.mp4", "clip")
    result = runner.invoke(app, ["animate", str(reference), str(clip), *FAST, "--version", version, "--max-frames", str(frames)])
    assert result.exit_code == 0, result.output
    info = probe_video(workdir / f"majicmix1_jue_{version}.mp4")
    assert (info.frame_count, info.width, info.height) == (frames, 128, 128)


def test_image_every_version_writes_its_own_picture(workdir):
    """Same seed, same inputs: each version's networks give a different picture."""
    reference, drive = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "chillout.jpg", "portrait")
    pictures = {}
    for version in version_names("image"):
        output = workdir / f"{version}.png"
        result = runner.invoke(app, ["image", str(reference), str(drive), *FAST, "--version", version, "--seed", "5", "-o", str(output)])
        assert result.exit_code == 0, f"{version}: {result.output}"
        pictures[version] = read_image(output)
        assert pictures[version].shape == (128, 128, 3)
    names = list(pictures)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert abs(pictures[first].astype(int) - pictures[second].astype(int)).mean() > 0.5, (first, second)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["animate", "--version", "v5c"], "unknown HelloMeme version 'v5c' for video"),
        (["animate", "--version", "v3", "--overlap", "4"], "--overlap does not apply to HelloMeme v3"),
        (["animate", "--version", "v5", "--window", "8"], "--window does not apply to HelloMeme v5"),
    ],
)
def test_what_a_version_cannot_do_is_one_line_exit_1(workdir, arguments, message):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "jue.mp4", "clip")
    command, *options = arguments
    result = subprocess.run([sys.executable, "-m", "hellomeme_cli", command, str(reference), str(clip), *options], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize("command", [["animate", "{ref}", "{drive}"], ["image", "{ref}", "{drive}"], ["weights", "fetch"]])
def test_an_unknown_version_is_one_line_exit_1(workdir, command):
    reference, drive = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "chillout.jpg", "portrait")
    arguments = [a.format(ref=reference, drive=drive) for a in command]
    result = subprocess.run([sys.executable, "-m", "hellomeme_cli", *arguments, "--version", "v9"], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'v9'" in lines[0] and "v2" in lines[0], result.stderr
