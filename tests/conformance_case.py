"""The conformance cases (format: ../shared/conformance/README.md): finding them under a
folder, and running the v1 module cases and every registry version's sampler and image
cases through our networks."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
from safetensors.torch import load_file

from hellomeme_cli.models import (
    HMControlNet,
    HMControlNet2,
    HMDenoisingNet,
    HMReferenceAdapter,
    HMReferenceNet,
    motion_unet,
)
from hellomeme_cli.models.unet import load_folder
from hellomeme_cli.samplers.common import ControlSource, DrivingFrames, SamplerInputs, SamplerSettings
from hellomeme_cli.samplers.two_stage import VideoSampler
from hellomeme_cli.versions import get_version, resolve

CONTROL_FOLDERS = {"blendshapes": "hm_control", "pdfgc": "hm_control2"}
# case.json `control` -> the registry's control kind (the v2+ cases call the blendshapes control "arkit").
CASE_CONTROLS = {"arkit": "blendshapes", "blendshapes": "blendshapes", "pdfgc": "pdfgc"}


def find_cases(root: Path) -> list[Path]:
    """Every case folder (one holding a case.json) under `root`, at any depth."""
    return sorted(path.parent for path in root.rglob("case.json"))


def case_kind(folder: Path) -> tuple[str, str]:
    """(kind, version) of a case: the v1 cases predate both fields ("modules" was v1's module kind)."""
    case = json.loads((folder / "case.json").read_text())
    kind = case.get("kind", "module")
    return ("module" if kind == "modules" else kind), case.get("version", "v1")


def is_module_case(folder: Path) -> bool:
    return (folder / "case.json").is_file() and case_kind(folder) == ("module", "v1")


def load_case(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((folder / "case.json").read_text()), load_file(folder / "io.safetensors")


def relative_error(ours: torch.Tensor, official: torch.Tensor) -> float:
    official = official.double()
    return ((ours.double() - official).norm() / official.norm()).item()


@torch.no_grad()
def run_module_case(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every output the case holds, under the case's names."""
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


def control_from_tensors(
    condition: torch.Tensor,
    drive_coeff: torch.Tensor | None = None,
    face_parts: torch.Tensor | None = None,
    pd_fpg: torch.Tensor | None = None,
) -> ControlSource:
    """A ControlSource slicing whole-clip tensors (frames on dim 2 of condition, dim 1 of the rest)."""

    def frames(start: int, stop: int) -> DrivingFrames:
        return DrivingFrames(
            condition=condition[:, :, start:stop],
            drive_coeff=None if drive_coeff is None else drive_coeff[:, start:stop],
            face_parts=None if face_parts is None else face_parts[:, start:stop],
            pd_fpg=None if pd_fpg is None else pd_fpg[:, start:stop],
        )

    return frames


def case_scheduler(description: str):
    """The scheduler a case names as a call, `EulerDiscreteScheduler(beta_start=0.00085, ...)`, built
    from the literal arguments only (nothing of the string is run)."""
    call = ast.parse(description, mode="eval").body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
        raise ValueError(f"not a scheduler call with keyword arguments: {description!r}")
    return getattr(diffusers, call.func.id)(**{k.arg: ast.literal_eval(k.value) for k in call.keywords})


def case_module(case: dict, weights: Path, name: str, cls: type, dtype: torch.dtype):
    """weights/<name> as `cls`; the constructor arguments from case.json where the official class
    does not write them into config.json (v2's control nets)."""
    spec = case.get("modules", {}).get(name, {})
    init_kwargs = {} if spec.get("config_json_has_init_args", True) else spec["init_kwargs"]
    return load_folder(cls, weights / name, torch_dtype=dtype, **init_kwargs)


def sampler_case(folder: Path, dtype: torch.dtype) -> tuple[VideoSampler, SamplerInputs, SamplerSettings, dict, dict]:
    """The version's sampler on a sampler or image case's networks and scheduler (the classes from
    the registry entry the case names), its inputs and settings, the case and its tensors."""
    case, io = load_case(folder)
    mode = "image" if case.get("kind") == "image" else "video"
    version = get_version(case.get("version", "v1"), mode)
    weights = folder / "weights"
    unet = load_folder(UNet2DConditionModel, weights / "unet", torch_dtype=dtype)
    adapter = case_module(case, weights, "hm_reference", resolve(version.reference_adapter), dtype)
    motion = None
    if mode == "video":
        motion = HMDenoisingNet(motion_unet(unet, load_folder(MotionAdapter, weights / "motion_adapter", torch_dtype=dtype)), adapter)
    kind = version.control(CASE_CONTROLS[case["control"]])
    sampler = resolve(version.sampler)(
        HMReferenceNet(unet),
        HMDenoisingNet(unet, adapter),
        motion,
        case_module(case, weights, CONTROL_FOLDERS[kind.name], resolve(kind.control_net), dtype),
        load_folder(AutoencoderKL, weights / "vae", torch_dtype=dtype),
        scheduler=case_scheduler(case["scheduler"]),
        control=kind,
    )
    inputs = SamplerInputs(
        ref_image=io["in.ref_image"],
        text_embeds=io["in.text_embeds"],
        negative_text_embeds=io["in.negative_text_embeds"],
        control=control_from_tensors(io["in.condition"], io.get("in.drive_coeff"), io.get("in.face_parts"), io.get("in.pd_fpg")),
        num_frames=case["frames"],
        neg_pd_fpg=io.get("in.neg_pd_fpg"),
    )
    # The image pipeline has no stage 2 and no windows; its settings keep our defaults there.
    windows = {name: case[name] for name in ("stage1_steps", "window", "overlap") if name in case}
    settings = SamplerSettings(steps=case["steps"], guidance=case["guidance_scale"], **windows)
    return sampler, inputs, settings, case, io


def networks_to(sampler, dtype: torch.dtype) -> None:
    """Every network a sampler holds (its nn.Module attributes) in `dtype`, as `--dtype` loads them."""
    for value in vars(sampler).values():
        if isinstance(value, torch.nn.Module):
            value.to(dtype)


# bfloat16 keeps 8 bits of mantissa; over a sampler's passes that leaves about 1e-2 of the
# official float32 latents, far below what one conditioning input changes (the READMEs'
# sensitivities: 3e-2 to 0.9).
BFLOAT16_LATENTS_TOLERANCE = {"sampler": 3e-2, "image": 5e-2}
