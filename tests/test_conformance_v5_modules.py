"""The HelloMeme v5, v5b and v5c networks for the module conformance runner
(test_conformance_modules.py, which finds every `"kind": "module"` case of the v5 family;
format: v5/README.md there, v5b/ and v5c/ READMEs for what they change): the classes a case's
weight folders (the shared hm5_weights) load with, and how our networks compute every output a
case holds. Plus the v5 family's own checks, on the networks of one v5 or v5b module case.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from conformance_case import ModuleFamily, first_case, load_case
from hellomeme_cli.models import (
    HM5bReferenceAdapter,
    HM5ControlNetBase,
    HM5DenoisingNet,
    HM5MotionAdapter,
    HM5ReferenceAdapter,
    HM5ReferenceNet,
    HM5SD15ControlProj,
    motion_pad_states,
)

VERSIONS = ("v5", "v5b", "v5c")
# Versions whose reference net also gets the reference image's own control (v5c README).
REFERENCE_WITH_OWN_CONTROL = ("v5c",)
# Versions with video, so with the motion adapter (v5c makes images only).
VIDEO_VERSIONS = ("v5", "v5b")

# case.json `classes.<role>` -> the class that loads that role's folder here.
CLASSES = {
    "UNet2DConditionModel": UNet2DConditionModel,
    "HM5ReferenceAdapter": HM5ReferenceAdapter,
    "HM5bReferenceAdapter": HM5bReferenceAdapter,
    "HM5ControlNetBase": HM5ControlNetBase,
    "HM5SD15ControlProj": HM5SD15ControlProj,
    "HM5MotionAdapter": HM5MotionAdapter,
}
# Manifest entry (released repo name) -> class.
RELEASED_CLASSES = {
    "hm5_reference": HM5ReferenceAdapter,
    "hm5b_reference": HM5bReferenceAdapter,
    "hm5c_reference": HM5bReferenceAdapter,
    "hm5_control_base": HM5ControlNetBase,
    "hm5_control_proj": HM5SD15ControlProj,
    "hm5c_control_proj": HM5SD15ControlProj,
    "hm5_motion": HM5MotionAdapter,
}
# Control kind -> the input names (without prefix) of its expression.
EXPRESSION_INPUTS = {"drive": ("drive_coeff", "face_parts"), "emo": ("pd_fpg",)}


def _control(base, proj, condition, inputs: dict, kind: str, prefix: str = ""):
    """(HM5ControlNetBase features, HM5SD15ControlProj residuals) for one expression kind,
    or None when the case lacks its inputs."""
    names = [prefix + name for name in EXPRESSION_INPUTS[kind]]
    if not all(name in inputs for name in names):
        return None
    if kind == "drive":
        features = base(condition, drive_coeff=inputs[names[0]], face_parts=inputs[names[1]])
    else:
        features = base(condition, emo_embedding=inputs[names[0]])
    return features, proj(features)


def run_v5_module_case(folder: Path, case: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every output of the module case, computed by our networks, under the case's names;
    plus `in.motion_pad.*` rebuilt from `in.pad_latents` by the case's recipe."""
    kind = case["control"]
    if kind not in EXPRESSION_INPUTS:
        raise AssertionError(f"{folder}: unknown control kind {kind!r}")
    outputs: dict[str, torch.Tensor] = {}

    base = FAMILY.load(folder, case, "hm_control_base")
    proj = FAMILY.load(folder, case, "hm_control_proj")
    control = {}
    for each in EXPRESSION_INPUTS:
        result = _control(base, proj, inputs["condition"], inputs, each)
        if result is None:
            continue
        features, control[each] = result
        outputs.update({f"out.control_base.{each}.{k}": v for k, v in features.items()})
        outputs.update({f"out.control_proj.{each}.{k}": v for k, v in control[each].items()})

    unet = FAMILY.load(folder, case, "unet")
    reference_net = HM5ReferenceNet(unet)
    reference = reference_net(inputs["ref_latents"], inputs["ref_text_embeds"])
    outputs.update({f"out.reference_cache.{k}": v for k, v in reference.items()})
    if case["version"] in REFERENCE_WITH_OWN_CONTROL:
        ref_features, ref_control = _control(base, proj, inputs["ref_condition"], inputs, kind, prefix="ref_")
        outputs.update({f"out.ref_control_base.{k}": v for k, v in ref_features.items()})
        outputs.update({f"out.ref_control_proj.{k}": v for k, v in ref_control.items()})
        reference = reference_net(inputs["ref_latents"], inputs["ref_text_embeds"], control=ref_control)
        outputs.update({f"out.reference_cache_ctrl.{k}": v for k, v in reference.items()})

    motion = FAMILY.load(folder, case, "hm_motion") if "hm_motion" in case["weights"] else None
    denoiser = HM5DenoisingNet(unet, FAMILY.load(folder, case, "hm_reference"), motion)
    latents, timestep, text = inputs["latents"], inputs["timestep"], inputs["text_embeds"]
    outputs["out.plain_noise"] = denoiser(latents, timestep, text)
    outputs["out.noise"] = denoiser(latents, timestep, text, reference, control[kind])
    if motion is not None:
        outputs["out.noise_motion"] = denoiser(latents, timestep, text, reference, control[kind], use_motion=True)
        pads = {k[len("motion_pad.") :]: v for k, v in inputs.items() if k.startswith("motion_pad.")}
        outputs["out.noise_motion_pad"] = denoiser(
            latents, timestep, text, reference, control[kind], motion_pad=pads, use_motion=True
        )
    if "pad_latents" in inputs:
        pad_latents = inputs["pad_latents"]
        first, last = (reference_net(pad_latents[:, :, j : j + 1], text) for j in (0, pad_latents.shape[2] - 1))
        outputs.update({f"in.motion_pad.{k}": v for k, v in motion_pad_states(first, last).items()})
    return outputs


FAMILY = ModuleFamily(VERSIONS, CLASSES, run_v5_module_case, released_classes=RELEASED_CLASSES)


def _video_module_case() -> tuple[Path, dict]:
    """One module case of a video version (its networks include the motion adapter; v5's
    first where there is one): the tests below take every network from it."""
    folder = first_case(lambda kind, version: kind == "module" and version in VIDEO_VERSIONS, "v5/v5b module case")
    return folder, load_case(folder)[0]


@torch.no_grad()
def test_v5_runs_non_square_sizes_that_are_not_multiples_of_64():
    """The official v5 reference attention fails unless h == w, and the official control
    net unless H and W are multiples of 64; ours take any multiple of 8."""
    folder, case = _video_module_case()
    unet = FAMILY.load(folder, case, "unet")
    base = FAMILY.load(folder, case, "hm_control_base")
    proj = FAMILY.load(folder, case, "hm_control_proj")
    adapter = FAMILY.load(folder, case, "hm_reference")
    denoiser = HM5DenoisingNet(unet, adapter, FAMILY.load(folder, case, "hm_motion"))
    generator = torch.Generator().manual_seed(0)
    height, width, frames = 96, 160, 2
    h, w = height // 8, width // 8
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    condition = torch.rand(1, 3, frames, height, width, generator=generator) * 2 - 1
    control = proj(base(condition, emo_embedding=torch.randn(1, frames, 548, generator=generator)))
    assert control["up3_3"].shape[-2:] == (h, w) and control["down3_0"].shape[-2:] == ((h + 1) // 2, (w + 1) // 2)

    reference_net = HM5ReferenceNet(unet)
    reference = reference_net(torch.randn(1, 4, h, w, generator=generator), text)
    pads = [reference_net(torch.randn(1, 4, h, w, generator=generator), text) for _ in range(2)]
    latents = torch.randn(1, 4, frames, h, w, generator=generator)
    noise = denoiser(latents, 500, text, reference, control, motion_pad=motion_pad_states(*pads), use_motion=True)
    assert noise.shape == latents.shape and torch.isfinite(noise).all()
    # The reference attention took part (it is what fails officially on these sizes).
    without_reference = denoiser(latents, 500, text, None, control, motion_pad=motion_pad_states(*pads), use_motion=True)
    assert not torch.allclose(noise, without_reference)


def test_denoiser_refuses_what_it_would_otherwise_silently_ignore():
    """The official UNet skips motion and reference without a word when their modules are absent."""
    folder, case = _video_module_case()
    unet = FAMILY.load(folder, case, "unet")
    denoiser = HM5DenoisingNet(unet)
    latents, text = torch.zeros(1, 4, 1, 8, 8), torch.zeros(1, 77, unet.config.cross_attention_dim)
    with pytest.raises(ValueError, match="motion adapter"):
        denoiser(latents, 0, text, use_motion=True)
    with pytest.raises(ValueError, match="reference adapter"):
        denoiser(latents, 0, text, reference={"up_0": torch.zeros(1, 32, 1, 1)})
    motion = HM5DenoisingNet(unet, motion_adapter=FAMILY.load(folder, case, "hm_motion"))
    with pytest.raises(ValueError, match="motion_pad lacks up_0, up_1, up_2, up_3"):
        motion(latents, 0, text, motion_pad={f"down_{i}": None for i in range(4)}, use_motion=True)
