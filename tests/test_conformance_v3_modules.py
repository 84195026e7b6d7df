"""The HelloMeme v3 and v4 networks for the module conformance runner
(test_conformance_modules.py, which finds every `"kind": "module"` case of v3 or v4; format:
v3/README.md and v4/README.md there): the classes a case's folders load with, the widths the
official classes hard-code, and how our networks compute every output a case holds. Plus v3's
and v4's own checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel

from conformance_case import ModuleFamily
from hellomeme_cli.models import (
    HM3DenoisingNet,
    HM3MotionAdapter,
    HM3ReferenceAdapter,
    HM3ReferenceNet,
    HM4SD15ControlProj,
    HMControlNetBase,
    HMV3ControlNet,
    motion_unet,
)

# case.json `modules.<name>.cls` -> the class that loads that folder here.
CLASSES = {
    "HM3ReferenceAdapter": HM3ReferenceAdapter,
    "HM3MotionAdapter": HM3MotionAdapter,
    "HMV3ControlNet": HMV3ControlNet,
    "HMControlNetBase": HMControlNetBase,
    "HM4SD15ControlProj": HM4SD15ControlProj,
    "diffusers.UNet2DConditionModel": UNet2DConditionModel,
    "diffusers.MotionAdapter": MotionAdapter,
}
# case.json `control` -> the suffix of the control outputs the denoisers got.
CONTROL_SUFFIX = {"arkit": "", "pdfgc": "_pd"}
# case.json `control` -> the control net's keyword arguments and the case inputs they take.
DRIVE_INPUTS = {
    "arkit": {"drive_coeff": "drive_coeff", "face_parts": "face_parts"},
    "pdfgc": {"emo_embedding": "pd_fpg"},
}


def _width_arguments(case: dict, cls) -> dict:
    """The widths the official classes hard-code to SD1.5's (README: "Hard-coded
    widths"), which our classes take as arguments, from the case's UNet."""
    if cls is HM3MotionAdapter:
        return {"time_embed_dim": case["time_embed_dim"]}
    if cls in (HMV3ControlNet, HMControlNetBase, HM4SD15ControlProj):
        return {"unet_block_out_channels": case["unet_block_out_channels"]}
    return {}


def _controls(case: dict, folder: Path, inputs: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """out.<name>.<key> of the control stack for both drive signals, by <name>."""
    net = FAMILY.load(folder, case, "hm_control")
    proj = FAMILY.load(folder, case, "hm_control_proj") if "hm_control_proj" in case["modules"] else None
    outputs = {}
    for kind, suffix in CONTROL_SUFFIX.items():
        if not set(DRIVE_INPUTS[kind].values()) <= set(inputs):
            continue  # the case lacks this drive signal, so it holds no outputs for it
        features = net(inputs["condition"], **{arg: inputs[name] for arg, name in DRIVE_INPUTS[kind].items()})
        if proj is not None:  # v4: base net, then projector
            outputs[f"control_base{suffix}"] = features
            features = proj(features)
        outputs[f"control{suffix}"] = features
    return outputs


def run_v3_module_case(folder: Path, case: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every output of the module case, computed by our networks, under the case's names."""
    timestep = inputs["timestep"]
    if case["control"] not in CONTROL_SUFFIX:
        raise AssertionError(f"{folder}: unknown control kind {case['control']!r}")
    outputs: dict[str, torch.Tensor] = {}

    controls = _controls(case, folder, inputs)
    for prefix, features in controls.items():
        outputs.update({f"out.{prefix}.{key}": value for key, value in features.items()})
    control = controls[f"control{CONTROL_SUFFIX[case['control']]}"]

    unet = FAMILY.load(folder, case, "unet")
    reference_net = HM3ReferenceNet(unet)
    reference = reference_net(inputs["ref_latents"], inputs["ref_text_embeds"])
    outputs.update({f"out.reference_cache.{key}": value for key, value in reference.items()})
    pad_latents, text = inputs["pad_latents"], inputs["text_embeds"]
    pads = reference_net.motion_pads(pad_latents[:, :, 0], pad_latents[:, :, -1], text)
    outputs.update({f"out.pad_cache.{key}": value for key, value in pads.items()})

    latents = inputs["latents"]
    reference_adapter, motion_adapter = FAMILY.load(folder, case, "hm_reference"), FAMILY.load(folder, case, "hm_motion")
    outputs["out.plain_noise"] = HM3DenoisingNet(unet, reference_adapter, motion_adapter)(latents[:, :, :1], timestep, text)
    stage1 = HM3DenoisingNet(unet, reference_adapter, motion_adapter)
    outputs["out.stage1_noise"] = stage1(latents, timestep, text, reference, control)

    motion = HM3DenoisingNet(motion_unet(unet, FAMILY.load(folder, case, "motion_adapter")), reference_adapter, motion_adapter)
    outputs["out.stage2_nomotion_noise"] = motion(latents, timestep, text, reference, control)
    outputs["out.stage2_noise"] = motion(latents, timestep, text, reference, control, motion_pads=pads)
    return outputs


FAMILY = ModuleFamily(("v3", "v4"), CLASSES, run_v3_module_case, widths=_width_arguments)


def test_denoiser_rejects_motion_pads_without_a_motion_adapter():
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=2, sample_size=8, layers_per_block=1,
    )
    with pytest.raises(ValueError, match="motion adapter"):
        HM3DenoisingNet(unet)(torch.zeros(1, 4, 2, 8, 8), 1, torch.zeros(1, 3, 8), motion_pads={})


def test_v4_control_net_names_the_size_it_cannot_take():
    net = HMControlNetBase(cross_attention_dim=16, unet_block_out_channels=(8, 8, 8, 8))
    with pytest.raises(ValueError, match="multiples of 64, not 96x128"):
        net(torch.zeros(1, 3, 1, 96, 128), emo_embedding=torch.zeros(1, 1, 548))
