"""`hellomeme animate` end to end, offline: tiny random networks from `make-tiny`, the real face
model and real clips. Runs at a 128-pixel working size so the whole file takes seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from conftest import MEDIA, audio_duration, require
from hellomeme_cli.checkpoints import load_sd15, save_original_layout
from hellomeme_cli.cli import app
from hellomeme_cli.video import probe_video, read_frames, write_video

FAST = ["--size", "128", "--steps", "2"]
runner = CliRunner()


def animate(*arguments: str) -> str:
    result = runner.invoke(app, ["animate", *[str(a) for a in arguments]])
    assert result.exit_code == 0, result.output
    return result.output


def frames(path: Path) -> np.ndarray:
    return np.stack(list(read_frames(path)))


def test_every_driving_frame_gives_one_output_frame_with_the_audio_in_sync(workdir):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip")
    output = animate(reference, clip, *FAST, "--seed", "7")
    written = workdir / "majicmix1_qie.mp4"
    info, source = probe_video(written), probe_video(clip)
    assert (info.frame_count, info.rate, info.width, info.height) == (38, source.rate, 128, 128)
    assert info.has_audio and abs(audio_duration(written) - info.duration) < 1 / info.fps
    assert abs(info.duration - source.duration) < 1 / info.fps
    assert info.tags["hellomeme_seed"] == "7" and "seed 7" in output


def test_same_seed_same_video_other_seed_another(workdir):
    reference, clip = require(MEDIA / "chillout.jpg", "portrait"), require(MEDIA / "jue.mp4", "clip")
    for name, seed in (("a.mp4", 1), ("b.mp4", 1), ("c.mp4", 2)):
        animate(reference, clip, *FAST, "--max-frames", "5", "--seed", seed, "-o", name)
    a, b, c = frames(workdir / "a.mp4"), frames(workdir / "b.mp4"), frames(workdir / "c.mp4")
    assert len(a) == 5 and np.array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 1


def test_output_rate_resamples_the_clip_and_keeps_its_duration(workdir):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "tndtc.mp4", "clip")
    animate(reference, clip, *FAST, "--fps", "8", "-o", "slow.mp4")
    info, source = probe_video(workdir / "slow.mp4"), probe_video(clip)
    assert info.fps == 8 and info.frame_count == round(source.duration * 8)
    assert abs(audio_duration(workdir / "slow.mp4") - info.duration) < 1 / 8


def test_frames_without_a_face_are_filled_not_dropped(workdir):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "jue.mp4", "clip")
    source = list(read_frames(clip, 14))
    for index in (3, 4, 9):
        source[index] = np.zeros_like(source[index])
    write_video(source, workdir / "gaps.mp4", 15, audio_from=clip)
    output = animate(reference, workdir / "gaps.mp4", *FAST, "--overlap", "2", "--window", "6")
    assert probe_video(workdir / "majicmix1_gaps.mp4").frame_count == 14
    assert "3 driving frames without a face (filled)" in output


def test_pdfgc_control_runs(workdir):
    reference, clip = require(MEDIA / "civitai1.jpg", "portrait"), require(MEDIA / "ysll.mp4", "clip")
    animate(reference, clip, *FAST, "--control", "pdfgc", "--max-frames", "4", "--guidance", "1")
    assert probe_video(workdir / "civitai1_ysll.mp4").frame_count == 4


def test_checkpoint_file_and_lora_change_the_video(workdir, tiny_cache):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip")
    base = load_sd15(tiny_cache / "sd15")
    for parameter in base.unet.parameters():
        parameter.data.mul_(1.05)
    save_original_layout(base, workdir / "community.safetensors")
    common = [reference, clip, *FAST, "--max-frames", "4", "--seed", "3"]
    animate(*common, "-o", "base.mp4")
    animate(*common, "-o", "checkpoint.mp4", "--checkpoint", workdir / "community.safetensors")
    assert np.abs(frames(workdir / "base.mp4").astype(int) - frames(workdir / "checkpoint.mp4")).mean() > 0.5


def test_paste_back_writes_the_whole_picture_and_keeps_it_away_from_the_face(workdir):
    reference, clip = require(MEDIA / "cg1.jpg", "1024 portrait"), require(MEDIA / "qie.mp4", "clip")
    animate(reference, clip, *FAST, "--max-frames", "3", "--paste-back", "-o", "pasted.mp4")
    written = frames(workdir / "pasted.mp4")
    assert written.shape == (3, 1024, 1024, 3)
    from hellomeme_cli.video import read_image

    picture = read_image(reference).astype(int)
    corner = (slice(0, 96), slice(0, 96))  # far from the face: only the codec's rounding changes it
    assert np.abs(written[0][corner] - picture[corner]).mean() < 3


def test_image_command_writes_one_picture(workdir):
    reference, drive = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "chillout.jpg", "portrait")
    result = runner.invoke(app, ["image", str(reference), str(drive), *FAST, "--seed", "5"])
    assert result.exit_code == 0, result.output
    from hellomeme_cli.video import read_image

    assert read_image(workdir / "majicmix1_chillout.png").shape == (128, 128, 3)
    assert "seed 5" in result.stdout
