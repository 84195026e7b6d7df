"""The library API: the example of docs/library.md runs as written (tiny weights, a real clip and portrait)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hellomeme_cli as hm
from hellomeme_cli.media.video import probe_video

from conftest import MEDIA, require

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL)


def _run_example(number: int, tiny_cache: Path, folder: Path) -> str:
    """The `number`-th python block of docs/library.md run as written, with ref.jpg and drive.mp4 beside it; its output."""
    (folder / "ref.jpg").symlink_to(require(MEDIA / "majicmix1.jpg", "test portrait"))
    (folder / "drive.mp4").symlink_to(require(MEDIA / "qie.mp4", "test clip"))
    example = _python_blocks(PROJECT_ROOT / "docs" / "library.md")[number]
    environment = {**os.environ, "HELLOMEME_HOME": str(tiny_cache), "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run([sys.executable, "-c", example], cwd=folder, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", "the library printed to stderr"
    return done.stdout


def test_the_library_example_runs_as_written(tiny_cache, tmp_path):
    printed = _run_example(0, tiny_cache, tmp_path)
    assert printed.startswith("wrote out.mp4: 2 frames") and "seed 1" in printed, printed
    assert probe_video(tmp_path / "out.mp4").frame_count == 2


def test_the_diffusers_call_example_runs_as_written(tiny_cache, tmp_path):
    assert _run_example(1, tiny_cache, tmp_path) == "2 frames, seed 1\n"
    assert (tmp_path / "first.png").is_file()


def test_model_settings_belong_to_the_pipeline_not_to_a_call(tiny_cache):
    with pytest.raises(hm.HellomemeError, match="unknown option"):
        hm.load_pipeline(version="v1", steps=3)
    fake_pipe = type("Pipe", (), {"options": None, "cache": None})()
    with pytest.raises(hm.HellomemeError, match="control: model settings are chosen by load_pipeline"):
        hm.animate(fake_pipe, "r.jpg", "d.mp4", "o.mp4", control="pdfgc")


@pytest.fixture(scope="module")
def tiny_pipe(tiny_cache):
    """The default video pipeline on the tiny weights, on the CPU."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HELLOMEME_HOME", str(tiny_cache))
        yield hm.load_pipeline(device="cpu")


CALL = {"num_inference_steps": 2, "height": 128, "width": 128, "max_frames": 3}


def test_a_pipeline_call_gives_the_frames_animate_writes(tiny_pipe, tmp_path, monkeypatch):
    """diffusers' convention: `pipe(reference, driving, ...)` returns the frames that `hm.animate`
    encodes, for the same seed, as PIL images, float arrays or latents."""
    import numpy as np
    import torch

    from hellomeme_cli import pipeline

    portrait, clip = require(MEDIA / "majicmix1.jpg", "test portrait"), require(MEDIA / "qie.mp4", "test clip")
    written = []
    real_write = pipeline.write_clip  # the writer every clip goes through (media/meme.py)
    monkeypatch.setattr(pipeline, "write_clip", lambda frames, *a, **k: real_write(written.extend(frames) or written, *a, **k))
    hm.animate(tiny_pipe, portrait, clip, tmp_path / "out.mp4", seed=5, steps=2, size=128, max_frames=3)

    tiny_pipe.set_progress_bar_config(disable=True)
    called = tiny_pipe(portrait, clip, generator=torch.Generator().manual_seed(5), output_type="np", **CALL)
    assert called.seed == 5 and called.frames.shape == (1, 3, 128, 128, 3) and called.frames.dtype == np.float32
    assert np.array_equal(np.round(called.frames[0] * 255).astype(np.uint8), np.stack(written))
    pictures = tiny_pipe(str(portrait), str(clip), generator=torch.Generator().manual_seed(5), **CALL).frames[0]
    assert [picture.size for picture in pictures] == [(128, 128)] * 3
    assert np.array_equal(np.stack([np.asarray(picture) for picture in pictures]), np.stack(written))
    latents, seed = tiny_pipe(portrait, clip, generator=torch.Generator().manual_seed(5), output_type="latent", return_dict=False, **CALL)
    assert latents.shape == (1, 4, 3, 16, 16) and seed == 5


def test_the_call_takes_frames_a_picture_and_a_step_callback(tiny_pipe, capsys):
    import PIL.Image
    import torch

    from hellomeme_cli.media.video import read_frames

    portrait = PIL.Image.open(require(MEDIA / "majicmix1.jpg", "test portrait"))
    frames = list(read_frames(require(MEDIA / "qie.mp4", "test clip"), 4))
    tiny_pipe.set_progress_bar_config(disable=True)
    from_frames = tiny_pipe(portrait, [PIL.Image.fromarray(frame) for frame in frames], output_type="np", **{**CALL, "max_frames": None})
    assert from_frames.frames.shape == (1, 4, 128, 128, 3) and capsys.readouterr().err == ""
    picture = tiny_pipe(portrait, frames[0], output_type="np", **CALL)
    assert picture.frames.shape == (1, 1, 128, 128, 3)

    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape)))
        return {}

    plain = tiny_pipe(portrait, frames[0], generator=torch.Generator().manual_seed(3), output_type="latent", **CALL).frames
    watched = tiny_pipe(portrait, frames[0], generator=torch.Generator().manual_seed(3), output_type="latent", callback_on_step_end=callback, **CALL)
    assert seen == [(0, (1, 4, 1, 16, 16)), (1, (1, 4, 1, 16, 16))] and torch.equal(plain, watched.frames)  # two image steps, kept
    seen.clear()
    clip = tiny_pipe(portrait, frames, output_type="latent", callback_on_step_end=lambda pipe, step, t, tensors: seen.append(step) or {}, **CALL)
    assert seen == list(range(len(seen))) and len(seen) == 3 * 2 + 2  # stage 1: 3 frames x 2 steps; stage 2: 2 steps
    zeroed = tiny_pipe(
        portrait, frames, output_type="latent", generator=torch.Generator().manual_seed(3),
        callback_on_step_end=lambda pipe, step, t, tensors: {"latents": torch.zeros_like(tensors["latents"])} if step == 7 else {}, **CALL,
    )
    assert torch.count_nonzero(zeroed.frames) == 0 and torch.count_nonzero(clip.frames) > 0
    with pytest.raises(hm.HellomemeError, match="callback_on_step_end_tensor_inputs: noise"):
        tiny_pipe(portrait, frames, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"], **CALL)

    tiny_pipe.set_progress_bar_config(disable=False)
    tiny_pipe(portrait, frames, output_type="latent", **CALL)
    assert "stage 2" in capsys.readouterr().err


def test_an_image_pipeline_takes_pictures_and_templates_not_clips(tiny_cache, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from hellomeme_cli.cli import app

    monkeypatch.setenv("HELLOMEME_HOME", str(tiny_cache))
    portrait, clip = require(MEDIA / "majicmix1.jpg", "test portrait"), require(MEDIA / "qie.mp4", "test clip")
    assert CliRunner().invoke(app, ["track", str(clip), "--max-frames", "2", "-o", str(tmp_path / "t.npz")]).exit_code == 0
    pipe = hm.load_pipeline("v5", mode="image", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    for driving in (portrait, tmp_path / "t.npz"):
        assert pipe(portrait, driving, output_type="np", num_inference_steps=1, height=128).frames.shape == (1, 1, 128, 128, 3)
    with pytest.raises(hm.HellomemeError, match=r"loaded for pictures \(mode='image'\)"):
        pipe(portrait, clip, height=128)


def test_each_windows_control_is_made_once_per_pass_and_again_every_step_in_low_memory(tiny_pipe, monkeypatch):
    """The control net's features of a window depend on its driving frames only: made once for every
    step (same latents) while they fit the memory budget, unless --low-memory asks to keep less."""
    import torch

    from hellomeme_cli.engine import HelloMemePipeline
    from hellomeme_cli.media.video import read_frames
    from hellomeme_cli.samplers import common

    frames = list(read_frames(require(MEDIA / "jue.mp4", "test clip"), 12))
    calls = []
    forward = tiny_pipe.control_net.forward
    monkeypatch.setattr(tiny_pipe.control_net, "forward", lambda condition, *a, **k: calls.append(condition.shape[2]) or forward(condition, *a, **k))
    tiny_pipe.set_progress_bar_config(disable=True)

    def run() -> tuple[torch.Tensor, int]:
        calls.clear()
        made = tiny_pipe(MEDIA / "chillout.jpg", frames, output_type="latent", num_inference_steps=4, height=128, window=6, overlap=2,
                         generator=torch.Generator().manual_seed(2))
        return made.frames, sum(calls)

    kept, kept_frames = run()
    monkeypatch.setattr(common, "free_memory", lambda device: 0)  # no room: only the first window is kept
    full, full_frames = run()
    monkeypatch.setattr(HelloMemePipeline, "low_memory", property(lambda self: True))
    again, again_frames = run()
    assert torch.equal(kept, again) and torch.equal(kept, full)
    # Stage 1: each frame's control once (12 frames, and the one-frame unconditional); stage 2: the windows [0, 6),
    # [4, 10), [8, 14) (past the clip, the last frame's features repeat: 6 + 6 + 4 frames), once, or at each of the 4 steps.
    assert kept_frames == 12 + 1 + 16 and again_frames == 12 + 1 + 4 * 16, (kept_frames, again_frames)
    assert full_frames == 12 + 1 + 6 + 4 * (6 + 4), full_frames


def test_prompt_embeddings_are_made_once_per_encoder_and_text(tiny_pipe, monkeypatch):
    """The reference and denoising text encoders are one network without a LoRA: each text is
    encoded once, and a batch's next clip with the same prompt encodes nothing."""
    tiny_pipe._prompt_embeddings.clear()
    texts = []
    forward = tiny_pipe.text_encoder.forward
    monkeypatch.setattr(tiny_pipe.text_encoder, "forward", lambda ids, *a, **k: texts.append(ids) or forward(ids, *a, **k))
    first = tiny_pipe.encode_prompt("a smile", "blurry")
    assert tiny_pipe.reference_text_encoder is tiny_pipe.text_encoder and len(texts) == 2
    again = tiny_pipe.encode_prompt("a smile", "blurry")
    assert len(texts) == 2 and again.positive is first.positive and first.reference is first.positive
    tiny_pipe.encode_prompt("a frown", "blurry")
    assert len(texts) == 3  # only the new text


def test_the_v2_schedule_is_the_official_one_whatever_the_checkpoints_config(tiny_pipe, tiny_cache):
    """The official pipelines build their Euler scheduler inline; the SD1.5 folder's PNDM config,
    saved by a newer diffusers, says "leading" spacing and would move every timestep."""
    import json

    import torch

    from hellomeme_cli.samplers.common import fresh_schedule

    assert json.loads((tiny_cache / "sd15" / "scheduler" / "scheduler_config.json").read_text())["timestep_spacing"] == "leading"
    # docs of conformance/v2: 3 steps -> 999, 499.5, 0.
    assert fresh_schedule(tiny_pipe.scheduler, 3, torch.device("cpu")).timesteps.tolist() == [999.0, 499.5, 0.0]
