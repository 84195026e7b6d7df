"""`--scheduler` (diffusers' schedulers by name on the version's noise schedule) and `--few-step`
(a released distillation LoRA fetched as a preset, with its scheduler, steps and guidance), end to
end on tiny weights; the distillation LoRA is a tiny one served by the fake hub on 127.0.0.1."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, TCDScheduler, UniPCMultistepScheduler
from safetensors.torch import save_file
from typer.testing import CliRunner

import hellomeme_cli as hm
from conftest import MEDIA, require
from hellomeme_cli.cli import app
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.media.video import read_frames
from hellomeme_cli.samplers.common import named_scheduler
from hellomeme_cli.settings import AnimateSettings, ModelOptions
from hellomeme_cli.versions import DPM_SDE, FEW_STEP, SCHEDULERS
from hellomeme_cli.weights.checkpoints import load_sd15
from hellomeme_cli.weights.presets import DISTILLATION_LORAS
from test_animate import kohya_attention_lora
from test_weights import serve_hub

runner = CliRunner()
COMMON = ["--size", "128", "--max-frames", "3", "--seed", "2"]


def test_a_scheduler_name_keeps_the_versions_noise_schedule():
    official = DPMSolverMultistepScheduler(**DPM_SDE)
    karras = named_scheduler("dpm++-karras", official)
    assert type(karras) is DPMSolverMultistepScheduler and karras.config.algorithm_type == "dpmsolver++" and karras.config.use_karras_sigmas
    assert (karras.config.beta_start, karras.config.beta_end, karras.config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert type(named_scheduler("unipc", official)) is UniPCMultistepScheduler
    assert type(named_scheduler("HeunDiscreteScheduler", official)) is HeunDiscreteScheduler  # any diffusers class by name
    assert named_scheduler("ddim-trailing", official).config.timestep_spacing == "trailing"
    with pytest.raises(HellomemeError, match=r"no scheduler class NoSuchScheduler"):
        named_scheduler("NoSuchScheduler", official)
    every_recipes_scheduler_is_named = {recipe.scheduler for recipe in FEW_STEP.values()} <= set(SCHEDULERS)
    assert every_recipes_scheduler_is_named and {recipe.lora for recipe in FEW_STEP.values()} <= set(DISTILLATION_LORAS)


def test_a_few_step_recipe_sets_steps_guidance_and_scheduler_unless_given():
    recipe = FEW_STEP["tcd"]
    settings = AnimateSettings(models=ModelOptions(few_step="tcd"))
    assert [settings.resolved(name) for name in ("steps", "guidance", "scheduler")] == [recipe.steps, recipe.guidance, "tcd"]
    assert settings.models.all_loras == (("TCD-SD15-LoRA", 1.0),)
    given = AnimateSettings(models=ModelOptions(few_step="tcd"), steps=6, scheduler="euler")
    assert given.resolved("steps") == 6 and given.resolved("scheduler") == "euler"
    assert AnimateSettings().resolved("scheduler") is None  # the version's own


@pytest.fixture
def home(tiny_cache, tmp_path, monkeypatch):
    """A copy of the tiny cache (runs record fetched files' hashes in it), the working folder at tmp_path."""
    home = tmp_path / "home"
    shutil.copytree(tiny_cache, home)
    monkeypatch.setenv("HELLOMEME_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


def _frames(path) -> np.ndarray:
    return np.stack(list(read_frames(path))).astype(int)


def test_animate_with_a_named_scheduler(home, tmp_path):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip")
    for name, extra in (("euler.mp4", []), ("unipc.mp4", ["--scheduler", "unipc"])):
        result = runner.invoke(app, ["animate", str(reference), str(clip), *COMMON, "--steps", "3", *extra, "-o", name])
        assert result.exit_code == 0, result.output
    assert np.abs(_frames(tmp_path / "euler.mp4") - _frames(tmp_path / "unipc.mp4")).mean() > 0.5
    result = runner.invoke(app, ["animate", str(reference), str(clip), *COMMON, "--scheduler", "NoSuchScheduler", "-o", "no.mp4"])
    # The CLI's entry point turns a HellomemeError into its one line and exit code 1 (tests/test_errors.py).
    assert isinstance(result.exception, HellomemeError) and "no scheduler class NoSuchScheduler" in str(result.exception)
    assert "tracking" not in result.output and not (tmp_path / "no.mp4").exists()  # said before the clip is tracked


def test_a_few_step_recipe_fetches_its_lora_and_samples_with_its_scheduler_and_steps(home, tmp_path, monkeypatch):
    _, repo, file = DISTILLATION_LORAS["TCD-SD15-LoRA"]
    save_file(kohya_attention_lora(load_sd15(home / "sd15").unet), tmp_path / "tcd.safetensors")
    server = serve_hub({f"{repo}/{file}": (tmp_path / "tcd.safetensors").read_bytes()}, tmp_path, monkeypatch)
    monkeypatch.setenv("HELLOMEME_HOME", str(home))
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip")
    try:
        result = runner.invoke(app, ["animate", str(reference), str(clip), *COMMON, "--few-step", "tcd", "-o", "tcd.mp4"])
        assert result.exit_code == 0, result.output
        assert server.gets() == [f"/{repo}/resolve/main/{file}"]
        pipe = hm.load_pipeline(device="cpu", few_step="tcd")
    finally:
        server.stop()
    settings = AnimateSettings(models=pipe.options)
    assert type(pipe.sampler(settings.resolved("scheduler")).scheduler) is TCDScheduler
    assert type(pipe.sampler().scheduler) is EulerDiscreteScheduler  # the version's own, v2's
    steps = []
    hm.animate(pipe, reference, clip, tmp_path / "again.mp4", progress=lambda event: steps.append(event.total) if event.task == "stage 2" else None,
               size=128, max_frames=3, seed=2)
    assert set(steps) == {FEW_STEP["tcd"].steps}
    assert np.array_equal(_frames(tmp_path / "tcd.mp4"), _frames(tmp_path / "again.mp4"))
    # The LoRA is fused into the denoising UNets; the reference net keeps SD1.5's (the official recipe).
    base = load_sd15(home / "sd15").unet.state_dict()
    name = next(key for key in base if key.endswith("attn1.to_q.weight"))
    assert not torch.equal(pipe.denoiser_motion.unet.state_dict()[name], base[name])
    assert torch.equal(pipe.reference_net.unet.state_dict()[name], base[name])


def test_v5_samples_with_a_scheduler_whose_step_takes_no_generator(home, tmp_path):
    """UniPC draws nothing: a seed gives the same picture again without handing it a generator."""
    reference, picture = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "chillout.jpg", "portrait")
    outputs = []
    for name in ("a.png", "b.png"):
        result = runner.invoke(app, ["image", str(reference), str(picture), "--size", "128", "--steps", "2", "--seed", "3", "--scheduler", "unipc", "-o", name])
        assert result.exit_code == 0, result.output
        outputs.append(np.asarray(Image.open(tmp_path / name)))
    assert np.array_equal(*outputs)
