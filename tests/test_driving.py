"""The driving input: one decode per run, motion templates (.npz) instead of clips, timing from
timestamps (variable-rate clips keep their duration and audio), batch's track cache."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import MEDIA, audio_duration, require
from hellomeme_cli.face import driving
from hellomeme_cli.cli import app
from hellomeme_cli.media.video import ffmpeg_exe, probe_video, read_frames

FAST = ["--size", "128", "--steps", "2"]
runner = CliRunner()


def invoke(*arguments: object) -> str:
    result = runner.invoke(app, [str(a) for a in arguments])
    assert result.exit_code == 0, result.output
    return result.output


def frames(path: Path) -> np.ndarray:
    return np.stack(list(read_frames(path)))


@pytest.fixture
def ffmpeg_runs(monkeypatch) -> list[list[str]]:
    """Every command line started with subprocess (run() starts its process through Popen too)."""
    commands: list[list[str]] = []
    real_popen = subprocess.Popen

    class Recording(real_popen):
        def __init__(self, args, *rest, **options):
            commands.append([str(a) for a in args])
            super().__init__(args, *rest, **options)

    monkeypatch.setattr(subprocess, "Popen", Recording)
    return commands


def decodes_of(commands: list[list[str]], clip: Path) -> list[list[str]]:
    """The ffmpeg runs that decode the clip's video: it is their first input, its video is mapped,
    and it is not only copied (the probe) — the audio mux maps only its audio."""
    return [
        command
        for command in commands
        if command[0] == ffmpeg_exe()
        and str(clip) in command
        and command[command.index(str(clip)) - 1] == "-i"
        and "0:V:0" in command
        and not ("-c" in command and command[command.index("-c") + 1] == "copy")
    ]


def test_animate_decodes_the_clip_once_and_a_template_not_at_all(workdir, ffmpeg_runs):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "jue.mp4", "clip")
    invoke("animate", reference, clip, *FAST, "--max-frames", "4", "-o", "clip.mp4")
    assert len(decodes_of(ffmpeg_runs, clip)) == 1
    invoke("track", clip, "--max-frames", "4", "-o", "jue.npz")
    ffmpeg_runs.clear()
    invoke("animate", reference, workdir / "jue.npz", *FAST, "-o", "template.mp4")
    assert not [command for command in ffmpeg_runs if str(clip) in command]
    assert probe_video(workdir / "template.mp4").frame_count == 4


def test_a_template_drives_animate_as_its_clip_does(workdir):
    reference, clip = require(MEDIA / "chillout.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip")
    common = [*FAST, "--max-frames", "5", "--seed", "11"]
    invoke("animate", reference, clip, *common, "-o", "from_clip.mp4")
    invoke("track", clip, "--max-frames", "5", "-o", "qie.npz")  # the same frames, so the same smoothing
    output = invoke("animate", reference, workdir / "qie.npz", *common, "-o", "from_template.mp4")
    from_clip, from_template = frames(workdir / "from_clip.mp4"), frames(workdir / "from_template.mp4")
    assert from_clip.shape == from_template.shape == (5, 128, 128, 3)
    assert np.abs(from_clip.astype(int) - from_template).mean() < 0.01
    assert probe_video(workdir / "from_clip.mp4").has_audio and not probe_video(workdir / "from_template.mp4").has_audio
    assert "5 frames" in output


def test_image_takes_the_first_frame_with_a_face_of_a_template(workdir):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "tndtc.mp4", "clip")
    invoke("track", clip, "--max-frames", "3", "-o", "t.npz")
    invoke("image", reference, workdir / "t.npz", *FAST, "--seed", "2")
    from hellomeme_cli.media.video import read_image

    assert read_image(workdir / "majicmix1_t_v5.png").shape == (128, 128, 3)
    with driving.load_template(workdir / "t.npz") as template:
        assert driving.image_frame(template.track) == 0 and len(template) == 3


def variable_rate_clip(path: Path) -> Path:
    """qie.mp4's 38 frames, 1/20 s apart for the first 20, then 0.08 s apart (2.44 s), with its audio."""
    source = require(MEDIA / "qie.mp4", "clip")
    timing = "setpts='if(lte(N,20),0.05*N,1+0.08*(N-20))/TB'"
    command = [ffmpeg_exe(), "-y", "-v", "error", "-i", str(source), "-vf", timing, "-fps_mode", "vfr", "-enc_time_base", "1:1000"]
    subprocess.run([*command, "-c:v", "libx264", "-c:a", "aac", str(path)], check=True)
    return path


def test_a_variable_rate_clip_keeps_its_duration_and_its_audio(workdir):
    clip = variable_rate_clip(workdir / "vfr.mp4")
    info = probe_video(clip)
    assert info.variable_rate and info.frame_count == 38 and info.duration == pytest.approx(2.44, abs=0.01)
    assert info.rate == Fraction(24000, 1001)  # the lowest standard rate at least 20 fps: no frame dropped
    output = invoke("animate", require(MEDIA / "majicmix1.jpg", "portrait"), clip, *FAST, "--window", "8", "-o", "out.mp4")
    written = probe_video(workdir / "out.mp4")
    assert written.rate == info.rate and abs(written.duration - info.duration) <= 1 / written.fps
    assert abs(audio_duration(workdir / "out.mp4") - info.duration) <= 1 / written.fps
    assert written.frame_count == round(info.duration * info.fps)  # 58 frames: 1.58 s if one per driving frame
    assert "repeated and 0 dropped" in output


def test_timing_picks_the_frame_on_screen_and_reports_repeats_and_drops():
    timestamps = np.array([0.0, 0.05, 0.10, 0.20, 0.30])
    timing = driving._timing(timestamps, 0.4, Fraction(20), True, None)
    assert timing.shown.tolist() == [0, 1, 2, 2, 3, 3, 4, 4] and (timing.repeated, timing.dropped) == (3, 0)
    slower = driving._timing(timestamps, 0.4, Fraction(20), True, 5)
    assert slower.shown.tolist() == [0, 3] and slower.dropped == 3
    constant = driving._timing(np.arange(6) / 15, 6 / 15, Fraction(15), False, None)
    assert constant.shown.tolist() == list(range(6)) and constant.rate == 15 and constant.repeated == constant.dropped == 0


@pytest.mark.parametrize("kind, message", [("text", "not a motion template numpy can read"), ("old", "older hellomeme"), ("foreign", "not a hellomeme motion template")])
def test_a_bad_template_is_one_line_and_exit_code_1(workdir, kind, message):
    path = workdir / f"{kind}.npz"
    if kind == "text":
        path.write_text("not numpy")
    elif kind == "old":
        np.savez(path, format=1, landmarks=np.zeros((2, 478, 3), np.float32))
    else:
        np.savez(path, weights=np.zeros(3))
    reference = require(MEDIA / "majicmix1.jpg", "portrait")
    result = subprocess.run(
        [sys.executable, "-m", "hellomeme_cli", "animate", *FAST, str(reference), str(path)], capture_output=True, text=True, cwd=workdir
    )
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("seed ")]
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0] and str(path) in lines[0], result.stderr


def test_batch_keeps_each_clip_tracked_and_a_rerun_with_other_settings_does_not_track_again(workdir, tiny_cache, monkeypatch):
    folder = workdir / "clips"
    folder.mkdir()
    (folder / "jue.mp4").symlink_to(require(MEDIA / "jue.mp4", "clip"))
    calls = []
    real_track_video = driving.track_video
    monkeypatch.setattr(driving, "track_video", lambda *a, **k: calls.append(1) or real_track_video(*a, **k))
    cached = set((tiny_cache / "tracks").glob("jue.*.npz"))  # the cache is the session's: other tests' entries
    common = ["batch", folder, "--ref", require(MEDIA / "majicmix1.jpg", "portrait"), "--size", "128", "--guidance", "1", "--max-frames", "4"]
    invoke(*common, "--steps", "1", "--window", "4", "--overlap", "0")
    assert len(calls) == 1 and len(set((tiny_cache / "tracks").glob("jue.*.npz")) - cached) == 1
    invoke(*common, "--steps", "2", "--window", "4", "--overlap", "0")
    assert len(calls) == 1
    assert probe_video(folder / "hellomeme" / "majicmix1_jue.mp4").frame_count == 4
    invoke(*common, "--steps", "2", "--no-smooth", "--window", "4", "--overlap", "0")
    assert len(calls) == 2  # another tracking setting: tracked again


def test_a_clip_that_fails_mid_decode_ends_in_one_line_and_leaves_no_output(workdir):
    clip = workdir / "damaged.mov"  # motion JPEG: every frame demuxes, the second half does not decode
    good = require(MEDIA / "qie.mp4", "clip")
    subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-i", str(good), "-frames:v", "12", "-an", "-c:v", "mjpeg", str(clip)], check=True)
    data = bytearray(clip.read_bytes())
    noise = np.random.default_rng(1).integers(0, 256, len(data) // 4, dtype=np.uint8).tobytes()
    data[len(data) // 2 : len(data) // 2 + len(noise)] = noise
    clip.write_bytes(bytes(data))
    assert probe_video(clip).frame_count == 12  # the probe only demuxes: the damage shows when decoding
    reference = require(MEDIA / "majicmix1.jpg", "portrait")
    result = subprocess.run(
        [sys.executable, "-m", "hellomeme_cli", "animate", *FAST, str(reference), str(clip), "-o", "out.mp4"],
        capture_output=True, text=True, cwd=workdir,
    )
    lines = result.stderr.strip().splitlines()  # the progress bars of the stages it reached, then the error
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.returncode == 1 and errors == lines[-1:] and "corrupt or truncated" in errors[0], result.stderr
    assert str(clip) in errors[0]
    assert sorted(path.name for path in workdir.iterdir()) == ["damaged.mov"]
