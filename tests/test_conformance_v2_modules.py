"""The HelloMeme v2 networks for the module conformance runner (test_conformance_modules.py,
which finds every `"kind": "module", "version": "v2"` case; format: v2/README.md there): the
classes a case's folders load with, and how our networks compute every output a case holds.
Plus v2's own checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel

from conformance_case import ModuleFamily, weight_folder
from hellomeme_cli.models import (
    HMDenoisingNet,
    HMReferenceAdapter,
    HMReferenceNet,
    HMV2ControlNet,
    HMV2ControlNet2,
    motion_unet,
)

# case.json `modules.<name>.cls` -> the class that loads that folder here.
CLASSES = {
    "HMReferenceAdapter": HMReferenceAdapter,
    "HMV2ControlNet": HMV2ControlNet,
    "HMV2ControlNet2": HMV2ControlNet2,
    "diffusers.UNet2DConditionModel": UNet2DConditionModel,
    "diffusers.MotionAdapter": MotionAdapter,
}
# Each control net's outputs are stored as out.<prefix>.<key>.
CONTROL_OUTPUT_PREFIX = {"hm_control": "control", "hm_control2": "control2"}
# case.json `control` -> the nets whose outputs the denoisers got (README, module case).
DENOISER_CONTROL = {"arkit": ("hm_control", "hm_control2"), "pdfgc": ("hm_control2",)}


def _run_control_net(name: str, net, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The net's forward on the case inputs it takes, or None when the case lacks them."""
    if name == "hm_control" and {"drive_coeff", "face_parts"} <= set(inputs):
        return net(inputs["condition"], inputs["drive_coeff"], inputs["face_parts"])
    if name == "hm_control2" and "pd_fpg" in inputs:
        return net(inputs["condition"], emo_embedding=inputs["pd_fpg"])
    return None


def run_v2_module_case(folder: Path, case: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every output of the module case, computed by our networks, under the case's names."""
    timestep = inputs["timestep"]
    outputs: dict[str, torch.Tensor] = {}

    if case["control"] not in DENOISER_CONTROL:
        raise AssertionError(f"{folder}: unknown control kind {case['control']!r}")
    control: dict[str, torch.Tensor] = {}
    for name, prefix in CONTROL_OUTPUT_PREFIX.items():
        if name not in case["modules"] or weight_folder(folder, case, name) is None:
            continue
        features = _run_control_net(name, FAMILY.load(folder, case, name), inputs)
        if features is None:
            continue
        outputs.update({f"out.{prefix}.{key}": value for key, value in features.items()})
        if name in DENOISER_CONTROL[case["control"]]:
            control.update(features)

    unet = FAMILY.load(folder, case, "unet")
    reference = HMReferenceNet(unet)(inputs["ref_latents"], inputs["ref_text_embeds"])
    outputs.update({f"out.reference_cache.{key}": value for key, value in reference.items()})

    latents, text = inputs["latents"], inputs["text_embeds"]
    outputs["out.plain_noise"] = HMDenoisingNet(unet, None)(latents[:, :, :1], timestep, text)

    adapter = FAMILY.load(folder, case, "hm_reference")
    stage1 = HMDenoisingNet(unet, adapter)
    frames = [
        stage1(latents[:, :, f : f + 1], timestep, text, reference, {k: v[:, :, f : f + 1] for k, v in control.items()})
        for f in range(latents.shape[2])
    ]
    outputs["out.stage1_noise"] = torch.cat(frames, dim=2)

    motion = motion_unet(unet, FAMILY.load(folder, case, "motion_adapter"))
    outputs["out.stage2_noise"] = HMDenoisingNet(motion, adapter)(latents, timestep, text, reference, control)
    return outputs


FAMILY = ModuleFamily(("v2",), CLASSES, run_v2_module_case)


def test_reference_adapter_rejects_an_unknown_version():
    with pytest.raises(ValueError, match="v9"):
        HMReferenceAdapter(block_out_channels=(16, 24, 32, 32), version="v9")
