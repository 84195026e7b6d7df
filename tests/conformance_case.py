"""The conformance cases (format: ../shared/conformance/README.md): finding them under a
folder (as pytest parameters), loading the networks a case names, and running the v1 module
cases and every registry version's sampler and image cases through our networks."""

from __future__ import annotations

import ast
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import diffusers
import pytest
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
from hellomeme_cli.settings import half_precision_bound
from hellomeme_cli.versions import get_version, resolve
from conftest import CONFORMANCE_DIR

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


def cases_where(takes: Callable[[str, str], bool]) -> list[Path]:
    """The case folders below CONFORMANCE_DIR, at any depth, whose (kind, version) `takes` takes."""
    if not CONFORMANCE_DIR.is_dir():
        return []
    return [folder for folder in find_cases(CONFORMANCE_DIR) if takes(*case_kind(folder))]


def first_case(takes: Callable[[str, str], bool], what: str) -> Path:
    """The first case folder `takes` takes, for a test that makes its own inputs: it takes every
    network and every size it does not choose from this one case. Skips, saying why, without one."""
    if not CONFORMANCE_DIR.is_dir():
        pytest.skip(f"no conformance data at {CONFORMANCE_DIR}")
    folders = cases_where(takes)
    if not folders:
        pytest.skip(f"no {what} below {CONFORMANCE_DIR}")
    return folders[0]


def case_params(takes: Callable[[str, str], bool], what: str) -> list:
    """One pytest parameter per case folder `takes` takes (its path below CONFORMANCE_DIR as
    id); else one skipped parameter saying why: no conformance folder, or no `what` in it."""
    if not CONFORMANCE_DIR.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no conformance data at {CONFORMANCE_DIR}"))]
    folders = cases_where(takes)
    if not folders:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {what} below {CONFORMANCE_DIR}"))]
    return [pytest.param(folder, id=str(folder.relative_to(CONFORMANCE_DIR))) for folder in folders]


def load_case(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((folder / "case.json").read_text()), load_file(folder / "io.safetensors")


def case_inputs(io: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A case's `in.*` tensors, by name without the prefix."""
    return {name[3:]: tensor for name, tensor in io.items() if name.startswith("in.")}


def relative_error(ours: torch.Tensor, official: torch.Tensor) -> float:
    official = official.double()
    return ((ours.double() - official).norm() / official.norm()).item()


def check_outputs(expected: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], tolerance: float, label: str) -> None:
    """Every expected tensor computed, of its shape and within `tolerance` of it (relative
    error, printed for each); all the ones above are named at once."""
    assert set(expected) <= set(ours), f"outputs not computed: {sorted(set(expected) - set(ours))}"
    failures = []
    for name in sorted(expected):
        assert ours[name].shape == expected[name].shape, f"{name}: shape {tuple(ours[name].shape)}"
        error = relative_error(ours[name], expected[name])
        print(f"{label} {name:40s} relative error {error:.3e}")
        if not error < tolerance:
            failures.append(f"{name}: {error:.3e}")
    assert not failures, f"above {tolerance:g}: " + ", ".join(failures)


@torch.no_grad()
def run_module_case(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every output the case holds, under the case's names."""
    weights = folder / "weights"
    _, io = load_case(folder)
    inputs = {name: tensor.to(dtype) for name, tensor in case_inputs(io).items()}
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


def random_sampler_inputs(
    io: Mapping[str, torch.Tensor], inputs: Sequence[str], height: int, width: int, frames: int, seed: int = 7, neg_pd_fpg: torch.Tensor | None = None
) -> SamplerInputs:
    """Random sampler inputs of the given size and length, the prompt embeddings and the control
    inputs (`inputs`: the control kind's) shaped as a case's `io`, from one generator seeded `seed`."""
    g = torch.Generator().manual_seed(seed)
    text_shape = io["in.text_embeds"].shape
    expression = {name: torch.randn(1, frames, *io[f"in.{name}"].shape[2:], generator=g) for name in inputs}
    return SamplerInputs(
        ref_image=torch.rand(1, 3, height, width, generator=g) * 2 - 1,
        text_embeds=torch.randn(text_shape, generator=g),
        negative_text_embeds=torch.randn(text_shape, generator=g),
        control=control_from_tensors(torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1, **expression),
        num_frames=frames,
        neg_pd_fpg=neg_pd_fpg,
    )


def case_scheduler(description: str):
    """The scheduler a case names as a call, `EulerDiscreteScheduler(beta_start=0.00085, ...)`, built
    from the literal arguments only (nothing of the string is run)."""
    call = ast.parse(description, mode="eval").body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
        raise ValueError(f"not a scheduler call with keyword arguments: {description!r}")
    return getattr(diffusers, call.func.id)(**{k.arg: ast.literal_eval(k.value) for k in call.keywords})


def case_roles(case: dict) -> dict[str, str]:
    """Each network role of a case -> the class case.json names for it: `modules.<role>.cls`
    (v2 to v4) or `classes.<role>` (v5 family)."""
    if "modules" in case:
        return {role: spec["cls"] for role, spec in case["modules"].items()}
    return dict(case.get("classes", {}))


def weight_folder(folder: Path, case: dict, role: str) -> Path | None:
    """Where a case keeps a role's weights (None where it has none): its `weights` map, relative
    to the case folder (the v5 family's cases share one set), else weights/<role>."""
    if isinstance(case.get("weights"), dict):
        path = folder / case["weights"][role] if role in case["weights"] else None
    else:
        path = folder / "weights" / role
    return path.resolve() if path is not None and path.is_dir() else None


def init_arguments(case: dict, role: str) -> dict:
    """The constructor arguments case.json gives where the official class does not write them
    into config.json (v2's control nets)."""
    spec = case.get("modules", {}).get(role, {})
    return {} if spec.get("config_json_has_init_args", True) else spec["init_kwargs"]


def case_module(case: dict, weights: Path, name: str, cls: type, dtype: torch.dtype):
    """weights/<name> as `cls`, with the case's constructor arguments."""
    return load_folder(cls, weights / name, torch_dtype=dtype, **init_arguments(case, name))


@dataclasses.dataclass(frozen=True)
class ModuleFamily:
    """What the module conformance runner (test_conformance_modules.py) needs of a family of
    versions: the classes its cases and manifests name, and how our networks compute a case."""

    versions: tuple[str, ...]
    classes: Mapping[str, type]  # class name in case.json or a manifest -> ours
    # (case folder, case.json, its inputs) -> every output the case holds, under its names
    run: Callable[[Path, dict, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    released_classes: Mapping[str, type] = dataclasses.field(default_factory=dict)  # manifest entry -> class, where it names none
    widths: Callable[[dict, type], dict] = lambda case, cls: {}  # arguments for the widths the official class hard-codes

    def load(self, folder: Path, case: dict, role: str, **kwargs):
        """The case's `role` network, as the class the case names, from its weight folder."""
        cls = self.classes[case_roles(case)[role]]
        path = weight_folder(folder, case, role)
        assert path is not None, f"{folder}: no weight folder for {role}"
        return load_folder(cls, path, **init_arguments(case, role), **self.widths(case, cls), **kwargs)


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


def half_precision_tolerance(case: dict) -> float:
    """How far a case's latents in bfloat16 or float16 may end from the official float32: the
    documented rule (settings.half_precision_bound) at the case's guidance. Far below what one
    conditioning input changes (the READMEs' sensitivities: 3e-2 to 0.9)."""
    return half_precision_bound("image" if case["kind"] == "image" else "video", case["guidance_scale"])
