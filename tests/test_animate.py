"""`hellomeme animate` end to end, offline: tiny random networks from `make-tiny`, the real face
model and real clips. Runs at a 128-pixel working size so the whole file takes seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import MEDIA, audio_duration, require
from hellomeme_cli.weights.checkpoints import load_sd15
from hellomeme_cli.cli import app
from hellomeme_cli.face.pasteback import PasteBack
from hellomeme_cli.pipeline import AnimateSettings, load_reference
from hellomeme_cli.face.tracking import MODEL_FILE
from hellomeme_cli.media.video import probe_video, read_frames, write_video
from hellomeme_cli.versions import DEFAULT_IMAGE_VERSION
from sd15_layout import save_original_layout

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
    written = workdir / "majicmix1_qie_v2.mp4"
    info, source = probe_video(written), probe_video(clip)
    assert (info.frame_count, info.rate, info.width, info.height) == (38, source.rate, 128, 128)
    assert info.has_audio and abs(audio_duration(written) - info.duration) < 1 / info.fps
    assert abs(info.duration - source.duration) < 1 / info.fps
    assert info.tags["hellomeme_seed"] == "7" and "seed 7" in output


_watching: list[Path] = []
_touches: list[str] = []


def _count_touches(event: str, args: tuple) -> None:
    """Audit hook (it cannot be removed, so it only counts while a test watches a path): every
    open() and every program started whose arguments name the watched file."""
    if not _watching:
        return
    watched = str(_watching[0])
    if event == "open" and str(args[0]) == watched:
        _touches.append(f"open {args[1]}")
    elif event == "subprocess.Popen" and watched in map(str, args[1] or ()):
        _touches.append(" ".join(map(str, args[1][:1])) + " ...")


sys.addaudithook(_count_touches)


def test_one_animate_reads_the_driving_clip_twice_and_keeps_its_audio_in_sync(workdir, tmp_path):
    """Probed once (the check before any model loads), decoded once (tracking; the same read keeps the
    audio): the audio mux does not open the clip again. The sound that starts 0.5 s into the clip
    starts 0.5 s into the output."""
    from hellomeme_cli.media.video import ffmpeg_exe

    reference = require(MEDIA / "majicmix1.jpg", "portrait")
    clip = tmp_path / "late_sound.mp4"
    frames = list(read_frames(require(MEDIA / "qie.mp4", "clip"), 20))
    write_video(frames, tmp_path / "silent.mp4", 15)
    tone = ["-f", "lavfi", "-i", "sine=frequency=440:duration=1"]
    command = [ffmpeg_exe(), "-v", "error", "-i", str(tmp_path / "silent.mp4"), "-itsoffset", "0.5", *tone, "-c:v", "copy", "-c:a", "aac", str(clip)]
    subprocess.run(command, check=True)
    _watching.append(clip)
    try:
        animate(reference, clip, *FAST, "--steps", "1", "-o", "out.mp4")
    finally:
        _watching.clear()
    touches, _touches[:] = list(_touches), []
    assert len(touches) == 2 and all("ffmpeg" in touch for touch in touches), touches
    decoded = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", "out.mp4", "-af", "aresample=async=1:first_pts=0", "-f", "s16le", "-ac", "1", "-ar", "44100", "-"],
        capture_output=True, check=True,
    ).stdout
    sound = np.abs(np.frombuffer(decoded, np.int16)) > 1000
    assert len(sound) / 44100 == pytest.approx(20 / 15, abs=1e-3)
    assert np.flatnonzero(sound)[0] / 44100 == pytest.approx(0.5, abs=0.01)


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
    assert probe_video(workdir / "majicmix1_gaps_v2.mp4").frame_count == 14
    assert "3 driving frames without a face (filled)" in output


def test_pdfgc_control_runs(workdir):
    reference, clip = require(MEDIA / "civitai1.jpg", "portrait"), require(MEDIA / "ysll.mp4", "clip")
    animate(reference, clip, *FAST, "--control", "pdfgc", "--max-frames", "4", "--guidance", "1")
    assert probe_video(workdir / "civitai1_ysll_v2.mp4").frame_count == 4


BASE = ["--max-frames", "4", "--seed", "3"]


@pytest.fixture(scope="module")
def base_video(tiny_cache, tmp_path_factory) -> np.ndarray:
    """majicmix1 driven by 4 frames of qie.mp4, seed 3, with the tiny weights as they are."""
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip")
    output = tmp_path_factory.mktemp("base") / "base.mp4"
    result = runner.invoke(app, ["animate", str(reference), str(clip), *FAST, *BASE, "-o", str(output)], env={"HELLOMEME_HOME": str(tiny_cache)})
    assert result.exit_code == 0, result.output
    return frames(output).astype(int)


def test_checkpoint_file_changes_the_video(workdir, tiny_cache, base_video):
    base = load_sd15(tiny_cache / "sd15")
    for parameter in base.unet.parameters():
        parameter.data.mul_(1.05)
    save_original_layout(base, workdir / "community.safetensors")
    animate(MEDIA / "majicmix1.jpg", MEDIA / "qie.mp4", *FAST, *BASE, "-o", "checkpoint.mp4", "--checkpoint", workdir / "community.safetensors")
    assert np.abs(base_video - frames(workdir / "checkpoint.mp4")).mean() > 0.5


def kohya_attention_lora(unet: torch.nn.Module, rank: int = 4) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA (lora_unet_* keys, alpha) on every attention projection of the UNet."""
    generator = torch.Generator().manual_seed(0)
    lora = {}
    for name, layer in unet.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") and ".attn" in name:
            key = "lora_unet_" + name.replace(".", "_")
            lora[f"{key}.lora_down.weight"] = 0.3 * torch.randn(rank, layer.in_features, generator=generator)
            lora[f"{key}.lora_up.weight"] = 0.3 * torch.randn(layer.out_features, rank, generator=generator)
            lora[f"{key}.alpha"] = torch.tensor(float(rank))
    return lora


def test_lora_changes_the_video_and_at_scale_0_changes_nothing(workdir, tiny_cache, base_video):
    lora = kohya_attention_lora(load_sd15(tiny_cache / "sd15").unet)
    assert len(lora) >= 3 * 16
    save_file(lora, workdir / "style.safetensors")
    common = [MEDIA / "majicmix1.jpg", MEDIA / "qie.mp4", *FAST, *BASE]
    animate(*common, "-o", "lora.mp4", "--lora", workdir / "style.safetensors")
    animate(*common, "-o", "lora0.mp4", "--lora", f"{workdir / 'style.safetensors'}:0")
    assert np.abs(base_video - frames(workdir / "lora.mp4")).mean() > 2
    assert np.array_equal(base_video, frames(workdir / "lora0.mp4"))


def test_paste_back_keeps_the_picture_outside_the_head_and_pastes_the_generated_face(workdir, tiny_cache):
    reference, clip = require(MEDIA / "cg1.jpg", "1024 portrait"), require(MEDIA / "qie.mp4", "clip")
    common = [reference, clip, *FAST, "--max-frames", "3", "--seed", "4"]
    animate(*common, "--paste-back", "-o", "pasted.mp4")
    animate(*common, "-o", "working.mp4")
    pasted, generated = frames(workdir / "pasted.mp4").astype(int), frames(workdir / "working.mp4")
    assert pasted.shape == (3, 1024, 1024, 3)

    face = load_reference(reference, AnimateSettings(size=128), tiny_cache / "face_landmarker" / MODEL_FILE)
    paste_back = PasteBack.from_reference(face.picture, face.face)
    outside, inside = paste_back.alpha == 0, paste_back.alpha == 1
    assert outside.mean() > 0.3 and inside.mean() > 0.1
    picture = face.picture.astype(int)
    for frame, working in zip(pasted, generated):
        kept = np.abs(frame - picture)[outside]  # the picture, but for the codec's rounding
        assert kept.mean() < 2.5 and np.percentile(kept, 99) <= 8
        changed = np.abs(frame - picture)[inside].mean()
        followed = np.abs(frame - paste_back.paste(working))[inside].mean()  # the generated frame, put back
        assert changed > 20 and followed < 0.3 * changed, (changed, followed)


def test_image_command_writes_one_picture(workdir):
    reference, drive = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "chillout.jpg", "portrait")
    result = runner.invoke(app, ["image", str(reference), str(drive), *FAST, "--seed", "5"])
    assert result.exit_code == 0, result.output
    from hellomeme_cli.media.video import image_tags, read_image
    from hellomeme_cli.pipeline import SEED_TAG

    written = workdir / f"majicmix1_chillout_{DEFAULT_IMAGE_VERSION}.png"  # the version in the name: another one does not meet it
    assert read_image(written).shape == (128, 128, 3)
    assert "seed 5" in result.stdout and image_tags(written)[SEED_TAG] == "5"
