"""The models stage: devices and dtypes, early option checks, the pipeline the registry entry
builds, the official "x1" recipe for swapped checkpoints and LoRAs (which networks share
weights and which do not), and low-memory mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conformance_case import control_from_tensors
from hellomeme_cli.weights.checkpoints import load_sd15
from hellomeme_cli.engine import HelloMemePipeline, ModelOptions, load_pipeline
from hellomeme_cli.model_options import check_options, resolve_device, resolve_dtype
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.samplers.common import SamplerInputs, SamplerSettings
from hellomeme_cli.weights.cache import WeightCache
from sd15_layout import save_original_layout
from test_checkpoints import kohya_lora


def load(tiny_cache, **options) -> HelloMemePipeline:
    return load_pipeline("v1", ModelOptions(device="cpu", **options), WeightCache(tiny_cache))


@pytest.mark.parametrize(
    "cuda, mps, expected", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")]
)
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == torch.device(expected)


def test_absent_devices_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name, message in (("cuda", "'cuda' is not available"), ("cuda:1", "'cuda:1' is not available"), ("mps", "'mps' is not available")):
        with pytest.raises(HellomemeError, match=message) as error:
            resolve_device(name)
        assert "\n" not in str(error.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(HellomemeError, match="'cuda:1' is not available here \\(CUDA GPUs: 1\\)"):
        resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")


def test_dtypes():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(device="cuda:9"), "not available"),
        (dict(device="tpu"), "unknown device"),
        (dict(dtype="float8"), "--dtype must be one of"),
        (dict(control="audio"), "--control must be one of"),
        (dict(version="v9"), "--version must be one of"),
        (dict(checkpoint="/nowhere/model.safetensors"), "checkpoint not found"),
        (dict(loras=((Path("/nowhere/style.safetensors"), 1.0),)), "LoRA not found"),
        (dict(vae=Path(__file__)), "not a weight file for the VAE"),
    ],
)
def test_bad_options_are_refused_before_loading(options, message):
    """Values a setting's own check refuses fail when the options are made; the rest in check_options."""
    with pytest.raises(HellomemeError, match=message):
        check_options(ModelOptions(**options))


def test_hub_checkpoint_that_cannot_be_downloaded_is_one_line(tmp_path):
    """A repo id goes to the Hugging Face hub; here the endpoint is a closed local port."""
    code = (
        "from pathlib import Path\n"
        "from hellomeme_cli.model_options import resolve_checkpoint\n"
        "from hellomeme_cli.weights.cache import WeightCache\n"
        f"resolve_checkpoint('someone/realistic-model', WeightCache(Path({str(tmp_path)!r})))\n"
    )
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "HellomemeError: cannot download checkpoint someone/realistic-model from Hugging Face" in result.stderr


def _weights(module: torch.nn.Module) -> torch.Tensor:
    return module.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight


def test_plain_sd15_is_one_unet_for_reference_net_and_both_stages(tiny_cache):
    models = load(tiny_cache, control="blendshapes")
    assert models.reference_net.unet is models.denoiser_2d.unet
    assert _weights(models.denoiser_motion.unet) is _weights(models.denoiser_2d.unet)
    assert models.vae_encoder is models.vae_decoder and models.text_encoder is models.reference_text_encoder
    assert models.image_encoder is not None and models.fan_encoder is None


def test_the_pipeline_registers_what_the_control_kind_needs(tiny_cache):
    from diffusers import EulerDiscreteScheduler

    from hellomeme_cli.models import FanEncoder, HMControlNet, HMControlNet2

    blendshapes, pdfgc = load(tiny_cache, control="blendshapes"), load(tiny_cache)
    assert pdfgc.control == "pdfgc"  # the default, as in the official app
    assert isinstance(blendshapes.control_net, HMControlNet) and isinstance(pdfgc.control_net, HMControlNet2)
    assert pdfgc.image_encoder is None and isinstance(pdfgc.fan_encoder, FanEncoder)
    assert (blendshapes.control, pdfgc.control) == ("blendshapes", "pdfgc")
    components = pdfgc.components
    assert components["control_net"] is pdfgc.control_net and components["image_encoder"] is None
    assert pdfgc.config["control_net"] == ("hellomeme_cli.models.control", "HMControlNet2")
    # The scheduler: diffusers' Euler, on the config the SD1.5 folder holds.
    saved = EulerDiscreteScheduler.load_config(tiny_cache / "sd15" / "scheduler")
    assert isinstance(pdfgc.scheduler, EulerDiscreteScheduler)
    assert {k: pdfgc.scheduler.config[k] for k in ("beta_start", "beta_end", "beta_schedule")} == {
        k: saved[k] for k in ("beta_start", "beta_end", "beta_schedule")
    }
    assert pdfgc.sampler().scheduler is pdfgc.scheduler and pdfgc.sampler().control is pdfgc.control_kind
    assert (pdfgc.device, pdfgc.dtype) == (torch.device("cpu"), torch.float32)
    moved = pdfgc.to(torch.bfloat16)
    assert moved.dtype == torch.bfloat16 and pdfgc.control_net.dtype == torch.bfloat16


def test_image_runs_load_no_motion_module(tiny_cache, tmp_path):
    """A cache without the AnimateDiff module serves image runs (and says what video runs lack)."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache, ignore=shutil.ignore_patterns("hm_animatediff_frame12"))
    models = load_pipeline("v1", ModelOptions(device="cpu"), WeightCache(cache), mode="image")
    assert models.denoiser_motion is None and models.components["denoiser_motion"] is None
    with pytest.raises(HellomemeError, match="hm_animatediff_frame12"):
        load_pipeline("v1", ModelOptions(device="cpu"), WeightCache(cache))


def test_an_image_run_denoises_on_the_checkpoint_unet(tiny_cache, tmp_path):
    """The official image pipelines run every step on the pipeline's own UNet, the checkpoint's
    under x1 (only the reference net and the reference's VAE encoder stay SD1.5)."""
    community = load_sd15(tiny_cache / "sd15")
    for parameter in community.unet.parameters():
        parameter.data.mul_(1.1)
    save_original_layout(community, tmp_path / "community.safetensors")
    for version in ("v1", "v3", "v5"):
        models = load_pipeline(version, ModelOptions(device="cpu", checkpoint=str(tmp_path / "community.safetensors")), WeightCache(tiny_cache), mode="image")
        torch.testing.assert_close(_weights(models.denoiser_2d.unet), _weights(community.unet))
        assert torch.equal(_weights(models.reference_net.unet), _weights(load_sd15(tiny_cache / "sd15").unet))


def test_v3_networks_schedulers_and_sampler(tiny_cache):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UNetMotionModel

    from hellomeme_cli.models import HM3DenoisingNet, HM3MotionAdapter, HM3ReferenceNet, HMControlNetBase, HM4SD15ControlProj
    from hellomeme_cli.samplers.recursive import HM3VideoSampler

    v3 = load_pipeline("v3", ModelOptions(device="cpu"), WeightCache(tiny_cache))
    assert isinstance(v3.reference_net, HM3ReferenceNet) and isinstance(v3.denoiser_2d, HM3DenoisingNet)
    assert v3.reference_net.unet is v3.denoiser_2d.unet and v3.denoiser_2d.motion_adapter is None
    assert isinstance(v3.denoiser_motion.unet, UNetMotionModel) and isinstance(v3.denoiser_motion.motion_adapter, HM3MotionAdapter)
    assert v3.control_proj is None and v3.fan_encoder is not None
    # The official pipelines' own schedules, not the SD1.5 folder's (PNDM's, steps_offset 1).
    assert isinstance(v3.scheduler, EulerDiscreteScheduler) and v3.scheduler.config.steps_offset == 0
    assert isinstance(v3.image_scheduler, DPMSolverMultistepScheduler) and v3.image_scheduler.config.algorithm_type == "sde-dpmsolver++"
    sampler = v3.sampler()
    assert isinstance(sampler, HM3VideoSampler) and sampler.image_scheduler is v3.image_scheduler
    v4 = load_pipeline("v4", ModelOptions(device="cpu", control="blendshapes"), WeightCache(tiny_cache), mode="image")
    assert isinstance(v4.control_net, HMControlNetBase) and isinstance(v4.control_proj, HM4SD15ControlProj)
    assert v4.denoiser_motion is None and v4.sampler().control_proj is v4.control_proj


def test_v5_runs_every_pass_on_one_denoiser_with_its_motion_modules(tiny_cache):
    from diffusers import DPMSolverMultistepScheduler

    from hellomeme_cli.models import HM5bReferenceAdapter, HM5DenoisingNet, HM5MotionAdapter, HM5SD15ControlProj
    from hellomeme_cli.samplers.hm5 import HM5VideoSampler

    video = load_pipeline("v5", ModelOptions(device="cpu"), WeightCache(tiny_cache))
    assert isinstance(video.denoiser_motion, HM5DenoisingNet) and video.denoiser_2d is video.denoiser_motion
    assert isinstance(video.denoiser_motion.motion_adapter, HM5MotionAdapter) and isinstance(video.control_proj, HM5SD15ControlProj)
    assert isinstance(video.scheduler, DPMSolverMultistepScheduler) and video.scheduler.config.algorithm_type == "sde-dpmsolver++"
    sampler = video.sampler()
    assert isinstance(sampler, HM5VideoSampler) and sampler.denoiser is video.denoiser_motion and not sampler.reference_control
    image = load_pipeline("v5c", ModelOptions(device="cpu"), WeightCache(tiny_cache), mode="image")
    assert image.denoiser_2d.motion_adapter is None and isinstance(image.denoiser_2d.reference_adapter, HM5bReferenceAdapter)
    assert image.sampler().reference_control
    prompt = image.encode_prompt("", mode="image")
    assert not torch.equal(prompt.positive, image.encode_prompt("", mode="video").positive)  # v5c images: the newer prompt


def test_lora_goes_to_both_stages_but_not_the_reference_net(tiny_cache, tmp_path):
    save_file(kohya_lora(load_sd15(tiny_cache / "sd15")), tmp_path / "style.safetensors")
    models = load(tiny_cache, loras=((tmp_path / "style.safetensors", 1.0),))
    base = load_sd15(tiny_cache / "sd15")
    layer = "up_blocks.1.attentions.1.proj_out"
    assert torch.equal(models.reference_net.unet.get_submodule(layer).weight, base.unet.get_submodule(layer).weight)
    assert not torch.equal(models.denoiser_2d.unet.get_submodule(layer).weight, base.unet.get_submodule(layer).weight)
    assert models.denoiser_motion.unet.get_submodule(layer).weight is models.denoiser_2d.unet.get_submodule(layer).weight
    prompt = models.encode_prompt("a portrait")
    assert not torch.equal(prompt.positive, prompt.reference)


def test_checkpoint_replaces_only_the_motion_unet_and_the_decoder(tiny_cache, tmp_path):
    community = load_sd15(tiny_cache / "sd15")
    for parameter in [*community.unet.parameters(), *community.vae.parameters()]:
        parameter.data.mul_(1.1)
    save_original_layout(community, tmp_path / "community.safetensors")
    models = load(tiny_cache, checkpoint=str(tmp_path / "community.safetensors"))
    base = load_sd15(tiny_cache / "sd15")
    assert torch.equal(_weights(models.denoiser_2d.unet), _weights(base.unet))
    torch.testing.assert_close(_weights(models.denoiser_motion.unet), _weights(community.unet))
    torch.testing.assert_close(models.vae_decoder.decoder.conv_out.weight, community.vae.decoder.conv_out.weight)
    assert torch.equal(models.vae_encoder.encoder.conv_in.weight, base.vae.encoder.conv_in.weight)


SIZE = 128  # pixels; the smallest control level is 2x2


def _latents_and_frames(models: HelloMemePipeline) -> torch.Tensor:
    """A short guided run through every network the pipeline has (prompt, sampler, decoder)."""
    generator = torch.Generator().manual_seed(3)
    frames = 2
    prompt = models.encode_prompt("a portrait")
    inputs = SamplerInputs(
        ref_image=torch.rand(1, 3, SIZE, SIZE, generator=generator) * 2 - 1,
        text_embeds=prompt.positive,
        negative_text_embeds=prompt.negative,
        control=control_from_tensors(
            torch.rand(1, 3, frames, SIZE, SIZE, generator=generator) * 2 - 1,
            torch.rand(1, frames, 51, generator=generator),
            torch.randn(1, frames, 3, 1024, generator=generator),
        ),
        num_frames=frames,
        reference_text_embeds=prompt.reference,
        reference_negative_text_embeds=prompt.reference_negative,
    )
    sampler = models.sampler()
    settings = SamplerSettings(steps=1, stage1_steps=1, guidance=1.5, window=2, overlap=1)
    latents = sampler.sample(inputs, settings, torch.Generator().manual_seed(0))
    decoded = torch.cat(list(sampler.decode_tensors(latents, batch=2)))
    return torch.cat([latents.flatten(), decoded.flatten()])


def test_low_memory_runs_through_diffusers_group_offloading_with_the_same_results(tiny_cache):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    offloaded = load(tiny_cache, low_memory=True, control="blendshapes")
    hooked = [network for network in offloaded.networks() if _is_group_offload_enabled(network)]
    assert hooked == offloaded.networks() and len(hooked) == 7  # text encoder, image encoder, control net, VAE, 2 UNets, adapter
    assert offloaded.denoiser_motion.reference_adapter.reference_modules_mid._diffusers_hook is not None
    assert offloaded.device == torch.device("cpu")
    plain = load(tiny_cache, control="blendshapes")
    torch.testing.assert_close(_latents_and_frames(offloaded), _latents_and_frames(plain), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("version", ["v3", "v5c"])
def test_low_memory_gives_the_same_picture_for_the_later_versions(tiny_cache, version):
    """Group offloading hooks every network of the v3-v5 families too, and changes no value."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    from hellomeme_cli.samplers.common import DrivingFrames

    def picture(**options) -> torch.Tensor:
        models = load_pipeline(version, ModelOptions(device="cpu", control="blendshapes", **options), WeightCache(tiny_cache), mode="image")
        if options:
            assert all(_is_group_offload_enabled(network) for network in models.networks())
        generator = torch.Generator().manual_seed(4)
        condition = torch.rand(1, 3, 1, SIZE, SIZE, generator=generator) * 2 - 1
        drive = (torch.rand(1, 1, 51, generator=generator), torch.randn(1, 1, 3, 1024, generator=generator))
        prompt = models.encode_prompt("", mode="image")
        inputs = SamplerInputs(
            ref_image=torch.rand(1, 3, SIZE, SIZE, generator=generator) * 2 - 1,
            text_embeds=prompt.positive,
            negative_text_embeds=prompt.negative,
            control=control_from_tensors(condition, *drive),
            num_frames=1,
            reference_control=DrivingFrames(condition, *drive),
        )
        return models.sampler().sample_image(inputs, SamplerSettings(steps=2, guidance=1.5), torch.Generator().manual_seed(0))

    torch.testing.assert_close(picture(low_memory=True), picture(), rtol=1e-6, atol=1e-6)
