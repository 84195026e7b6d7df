"""Runs one module conformance case (format: ../shared/conformance/README.md) through
our networks and returns every output the case holds, under the case's names."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import MotionAdapter, UNet2DConditionModel
from safetensors.torch import load_file

from hellomeme_cli.models import (
    HMControlNet,
    HMControlNet2,
    HMDenoisingNet,
    HMReferenceAdapter,
    HMReferenceNet,
    motion_unet,
)


def is_module_case(folder: Path) -> bool:
    case = folder / "case.json"
    return case.is_file() and json.loads(case.read_text()).get("kind", "modules") == "modules"


def load_case(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((folder / "case.json").read_text()), load_file(folder / "io.safetensors")


@torch.no_grad()
def run_module_case(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    weights = folder / "weights"
    _, io = load_case(folder)
    inputs = {name[3:]: tensor.to(dtype) for name, tensor in io.items() if name.startswith("in.")}
    timestep = io["in.timestep"]  # timesteps stay float32, as a pipeline passes them
    outputs: dict[str, torch.Tensor] = {}

    control: dict[str, torch.Tensor] = {}
    if (weights / "hm_control").is_dir():
        net = HMControlNet.from_pretrained(weights / "hm_control", torch_dtype=dtype)
        features = net(inputs["condition"], inputs["drive_coeff"], inputs["face_parts"])
        outputs.update({f"out.control.{k}": v for k, v in features.items()})
        control.update(features)
    if (weights / "hm_control2").is_dir():
        net = HMControlNet2.from_pretrained(weights / "hm_control2", torch_dtype=dtype)
        features = net(inputs["condition"], inputs["pd_fpg"])
        outputs.update({f"out.control2.{k}": v for k, v in features.items()})
        control.update(features)

    unet = UNet2DConditionModel.from_pretrained(weights / "unet", torch_dtype=dtype)
    reference = HMReferenceNet(unet)(inputs["ref_latents"], inputs["ref_text_embeds"])
    outputs.update({f"out.reference_cache.{k}": v for k, v in reference.items()})

    latents, text = inputs["latents"], inputs["text_embeds"]
    outputs["out.plain_noise"] = HMDenoisingNet(unet, None)(latents[:, :, :1], timestep, text)

    adapter = HMReferenceAdapter.from_pretrained(weights / "hm_reference", torch_dtype=dtype)
    stage1 = HMDenoisingNet(unet, adapter)
    frames = [
        stage1(latents[:, :, f : f + 1], timestep, text, reference, {k: v[:, :, f : f + 1] for k, v in control.items()})
        for f in range(latents.shape[2])
    ]
    outputs["out.stage1_noise"] = torch.cat(frames, dim=2)

    motion = motion_unet(unet, MotionAdapter.from_pretrained(weights / "motion_adapter", torch_dtype=dtype))
    outputs["out.stage2_noise"] = HMDenoisingNet(motion, adapter)(latents, timestep, text, reference, control)
    return outputs


def relative_error(ours: torch.Tensor, official: torch.Tensor) -> float:
    official = official.double()
    return ((ours.double() - official).norm() / official.norm()).item()
