"""Numerical conformance of the v3/v4 samplers (`sampler_hm3`) with the official
`HM3VideoPipeline` / `HM3ImagePipeline`.

Runs every case folder below $HELLOMEME_CONFORMANCE_DIR (default ../shared/conformance)
whose case.json says `"kind": "sampler"` or `"image"` and `"version"` v3 or v4 (format:
v3/README.md and v4/README.md there). Seed, size, frames, steps, guidance, control kind
and scheduler all come from the case, so held-out cases run unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from conformance_case import (
    case_params, case_scheduler, control_from_tensors, first_case, half_precision_tolerance, load_case,
    networks_to, relative_error,
)
from hellomeme_cli.models import HM3DenoisingNet, HM3ReferenceNet, motion_unet
from hellomeme_cli.models.unet import load_folder
from hellomeme_cli.samplers.common import SamplerInputs, SamplerSettings
from hellomeme_cli.samplers.recursive import (
    HM3VideoSampler,
    official_image_scheduler,
    official_video_scheduler,
    plan_levels,
)
from test_conformance_v3_modules import FAMILY

LATENT_TOLERANCE = 2e-5  # relative, float32 (README: an equivalent implementation differs by < 2e-6)
PIXEL_TOLERANCE = 1e-3  # mean absolute error of the [0, 1] frames


def _cases(kinds: tuple[str, ...] = ("sampler", "image")):
    what = f"v3/v4 {' or '.join(kinds)} cases"
    return case_params(lambda kind, version: kind in kinds and version in FAMILY.versions, what)


def _public_video_case() -> Path:
    return first_case(lambda kind, version: kind == "sampler" and version in FAMILY.versions, "v3/v4 sampler case")


def build_sampler(folder: Path) -> tuple[HM3VideoSampler, SamplerInputs, SamplerSettings, dict, dict]:
    """Our sampler on the case's networks (built directly from its weights folders), its
    inputs and settings, the case and its tensors."""
    case, io = load_case(folder)
    weights = folder / "weights"
    unet = load_folder(UNet2DConditionModel, weights / "unet")
    # the UNet's time-embedding width, which the official motion adapter hard-codes
    case = {"time_embed_dim": 4 * unet.config.block_out_channels[0], **case}
    reference_adapter = FAMILY.load(folder, case, "hm_reference")
    motion = None
    if case["kind"] == "sampler":
        motion_net = motion_unet(unet, FAMILY.load(folder, case, "motion_adapter"))
        motion = HM3DenoisingNet(motion_net, reference_adapter, FAMILY.load(folder, case, "hm_motion"))
    schedule = {("scheduler" if case["kind"] == "sampler" else "image_scheduler"): case_scheduler(case["scheduler"])}
    sampler = HM3VideoSampler(
        HM3ReferenceNet(unet),
        HM3DenoisingNet(unet, reference_adapter),
        motion,
        FAMILY.load(folder, case, "hm_control"),
        load_folder(AutoencoderKL, weights / "vae"),
        control_proj=FAMILY.load(folder, case, "hm_control_proj") if "hm_control_proj" in case["modules"] else None,
        **schedule,
    )
    arkit = case["control"] == "arkit"
    if case["control"] not in ("arkit", "pdfgc"):
        raise AssertionError(f"{folder}: unknown control kind {case['control']!r}")
    inputs = SamplerInputs(
        ref_image=io["in.ref_image"],
        text_embeds=io["in.text_embeds"],
        negative_text_embeds=io["in.negative_text_embeds"],
        control=control_from_tensors(
            io["in.condition"],
            drive_coeff=io["in.drive_coeff"] if arkit else None,
            face_parts=io["in.face_parts"] if arkit else None,
            pd_fpg=None if arkit else io["in.pd_fpg"],
        ),
        num_frames=case["frames"],
    )
    settings = SamplerSettings(steps=case["steps"], guidance=case["guidance_scale"], window=case.get("window", 12))
    return sampler, inputs, settings, case, io


def _mae(ours: torch.Tensor, official: torch.Tensor) -> float:
    return (ours.double() - official.double()).abs().mean().item()


@pytest.mark.parametrize("folder", _cases())
def test_float32_matches_official(folder):
    sampler, inputs, settings, case, io = build_sampler(folder)
    generator = torch.Generator().manual_seed(case["seed"])
    name = f"{folder.parent.name}/{folder.name}"
    if case["kind"] == "sampler":
        latents = sampler.sample(inputs, settings, generator)
        images = torch.cat(list(sampler.decode_tensors(latents)))
        expected_latents, expected_images = io["out.latents"], io["out.frames"]
    else:
        latents = sampler.sample_image(inputs, settings, generator)[:, :, 0]
        images = torch.cat(list(sampler.decode_tensors(latents.unsqueeze(2))))
        expected_latents, expected_images = io["out.latents"], io["out.image"]
    assert latents.shape == expected_latents.shape and images.shape == expected_images.shape
    error, mae = relative_error(latents, expected_latents), _mae(images, expected_images)
    print(f"{name} latents relative error {error:.3e}, {'frames' if case['kind'] == 'sampler' else 'image'} MAE {mae:.3e}")
    assert error < LATENT_TOLERANCE, f"{name}: latents {error:.3e}"
    assert mae < PIXEL_TOLERANCE, f"{name}: pixels {mae:.3e}"


@pytest.mark.parametrize("folder", _cases())
def test_bfloat16_stays_near_the_official_float32(folder):
    sampler, inputs, settings, case, io = build_sampler(folder)
    networks_to(sampler, torch.bfloat16)
    generator = torch.Generator().manual_seed(case["seed"])
    if case["kind"] == "sampler":
        latents = sampler.sample(inputs, settings, generator)
    else:
        latents = sampler.sample_image(inputs, settings, generator)[:, :, 0]
    error = relative_error(latents, io["out.latents"])
    print(f"{folder.parent.name}/{folder.name} bfloat16 latents relative error {error:.3e}")
    assert torch.isfinite(latents).all() and error < half_precision_tolerance(case)


@pytest.mark.parametrize("folder", _cases(("sampler",)))
def test_recursion_plan_is_the_official_one(folder):
    case, _ = load_case(folder)
    levels = plan_levels(case["frames"], case["window"])
    ours = [
        {
            "depth": level.depth,
            "indexes": list(level.indexes),
            "windows": [[level.indexes[w[0]], level.indexes[w[-1]], len(w)] for w in level.windows],
        }
        for level in levels
    ]
    assert ours == case["recursion"]


@pytest.mark.parametrize("folder", _cases())
def test_default_schedulers_are_the_official_ones(folder):
    case, _ = load_case(folder)
    default = official_video_scheduler() if case["kind"] == "sampler" else official_image_scheduler()
    named = case_scheduler(case["scheduler"])
    assert type(default) is type(named) and dict(default.config) == dict(named.config)


def test_a_trailing_one_frame_window_is_dropped_not_a_crash():
    """23 frames: windows [0..11], [11..22], [22]; the official code crashes on the last."""
    levels = plan_levels(23)
    assert [level.windows[-1][-1] for level in levels] == [22, 2]
    assert [len(w) for w in levels[0].windows] == [12, 12]
    assert levels[1].indexes == (0, 11, 22)

    sampler, inputs, settings, case, io = build_sampler(_public_video_case())
    frames = [i % case["frames"] for i in range(23)]
    names = ("condition", "drive_coeff", "face_parts", "pd_fpg")
    long = {k: io[f"in.{k}"][:, :, frames] if k == "condition" else io[f"in.{k}"][:, frames] for k in names}
    arkit = case["control"] == "arkit"
    inputs = SamplerInputs(
        ref_image=inputs.ref_image,
        text_embeds=inputs.text_embeds,
        negative_text_embeds=inputs.negative_text_embeds,
        control=control_from_tensors(
            long["condition"],
            drive_coeff=long["drive_coeff"] if arkit else None,
            face_parts=long["face_parts"] if arkit else None,
            pd_fpg=None if arkit else long["pd_fpg"],
        ),
        num_frames=23,
    )
    latents = sampler.sample(inputs, SamplerSettings(steps=1, guidance=settings.guidance), torch.Generator().manual_seed(1))
    assert latents.shape[2] == 23 and torch.isfinite(latents).all()


def test_same_seed_same_latents_and_overlap_is_ignored():
    sampler, inputs, case_settings, case, _ = build_sampler(_public_video_case())
    settings = SamplerSettings(steps=1, guidance=case_settings.guidance, window=case_settings.window)
    first = sampler.sample(inputs, settings, torch.Generator().manual_seed(7))
    no_overlap = SamplerSettings(steps=1, guidance=settings.guidance, window=settings.window, overlap=0)
    again = sampler.sample(inputs, no_overlap, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    other = sampler.sample(inputs, settings, torch.Generator().manual_seed(8))
    assert not torch.allclose(first, other)
