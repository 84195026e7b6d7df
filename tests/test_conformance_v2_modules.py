"""Numerical conformance of the HelloMeme v2 networks with the official code.

Runs every case folder below $HELLOMEME_CONFORMANCE_DIR (default ../shared/conformance)
whose case.json says `"kind": "module", "version": "v2"` (format: v2/README.md there)
and checks every `out.*` tensor it holds. Sizes, frames, batch, timestep, control kind
and the tiny constructor arguments all come from the case, so held-out cases run
unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel

from conformance_case import load_case, relative_error
from conftest import CONFORMANCE_DIR, require
from hellomeme_cli.models import (
    HMDenoisingNet,
    HMReferenceAdapter,
    HMReferenceNet,
    HMV2ControlNet,
    HMV2ControlNet2,
    motion_unet,
)

FLOAT32_TOLERANCE = 1e-4
VERSION = "v2"

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
RELEASED = ("hm_reference", "hm_control", "hm_control2")


def _is_v2_module_case(case_json: Path) -> bool:
    case = json.loads(case_json.read_text())
    return case.get("kind") == "module" and case.get("version") == VERSION


def _cases():
    if not CONFORMANCE_DIR.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no conformance data at {CONFORMANCE_DIR}"))]
    cases = sorted(p.parent for p in CONFORMANCE_DIR.rglob("case.json") if _is_v2_module_case(p))
    if not cases:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {VERSION} module cases below {CONFORMANCE_DIR}"))]
    return [pytest.param(p, id=str(p.relative_to(CONFORMANCE_DIR))) for p in cases]


def _load(case: dict, folder: Path, name: str, **kwargs):
    """Load weights/<name> with the case's class; constructor arguments from case.json
    where the official class does not write them into config.json."""
    spec = case["modules"][name]
    init_kwargs = {} if spec.get("config_json_has_init_args", True) else spec["init_kwargs"]
    return CLASSES[spec["cls"]].from_pretrained(folder / "weights" / name, **init_kwargs, **kwargs)


def _run_control_net(name: str, net, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The net's forward on the case inputs it takes, or None when the case lacks them."""
    if name == "hm_control" and {"drive_coeff", "face_parts"} <= set(inputs):
        return net(inputs["condition"], inputs["drive_coeff"], inputs["face_parts"])
    if name == "hm_control2" and "pd_fpg" in inputs:
        return net(inputs["condition"], emo_embedding=inputs["pd_fpg"])
    return None


@torch.no_grad()
def run_v2_module_case(folder: Path) -> dict[str, torch.Tensor]:
    """Every output of the module case, computed by our networks, under the case's names."""
    case, io = load_case(folder)
    inputs = {name[3:]: tensor for name, tensor in io.items() if name.startswith("in.")}
    timestep = inputs["timestep"]
    outputs: dict[str, torch.Tensor] = {}

    if case["control"] not in DENOISER_CONTROL:
        raise AssertionError(f"{folder}: unknown control kind {case['control']!r}")
    control: dict[str, torch.Tensor] = {}
    for name, prefix in CONTROL_OUTPUT_PREFIX.items():
        if name not in case["modules"] or not (folder / "weights" / name).is_dir():
            continue
        features = _run_control_net(name, _load(case, folder, name), inputs)
        if features is None:
            continue
        outputs.update({f"out.{prefix}.{key}": value for key, value in features.items()})
        if name in DENOISER_CONTROL[case["control"]]:
            control.update(features)

    unet = _load(case, folder, "unet")
    reference = HMReferenceNet(unet)(inputs["ref_latents"], inputs["ref_text_embeds"])
    outputs.update({f"out.reference_cache.{key}": value for key, value in reference.items()})

    latents, text = inputs["latents"], inputs["text_embeds"]
    outputs["out.plain_noise"] = HMDenoisingNet(unet, None)(latents[:, :, :1], timestep, text)

    adapter = _load(case, folder, "hm_reference")
    stage1 = HMDenoisingNet(unet, adapter)
    frames = [
        stage1(latents[:, :, f : f + 1], timestep, text, reference, {k: v[:, :, f : f + 1] for k, v in control.items()})
        for f in range(latents.shape[2])
    ]
    outputs["out.stage1_noise"] = torch.cat(frames, dim=2)

    motion = motion_unet(unet, _load(case, folder, "motion_adapter"))
    outputs["out.stage2_noise"] = HMDenoisingNet(motion, adapter)(latents, timestep, text, reference, control)
    return outputs


@pytest.mark.parametrize("folder", _cases())
def test_float32_matches_official(folder):
    case, io = load_case(folder)
    expected = {name: tensor for name, tensor in io.items() if name.startswith("out.")}
    assert set(expected) == {n for n in case["tensors"] if n.startswith("out.")}, "io.safetensors and case.json disagree"
    ours = run_v2_module_case(folder)

    assert set(expected) <= set(ours), f"outputs not computed: {sorted(set(expected) - set(ours))}"
    failures = []
    for name in sorted(expected):
        assert ours[name].shape == expected[name].shape, f"{name}: shape {tuple(ours[name].shape)}"
        error = relative_error(ours[name], expected[name])
        print(f"{folder.name} {name:36s} relative error {error:.3e}")
        if not error < FLOAT32_TOLERANCE:
            failures.append(f"{name}: {error:.3e}")
    assert not failures, f"above {FLOAT32_TOLERANCE:g}: " + ", ".join(failures)


@pytest.mark.parametrize("folder", _cases())
def test_official_folders_load_with_no_missing_or_unexpected_keys(folder):
    case, _ = load_case(folder)
    for name in case["modules"]:
        if case["modules"][name]["cls"] not in CLASSES or not (folder / "weights" / name).is_dir():
            continue
        model, info = _load(case, folder, name, output_loading_info=True)
        assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == ([], [], []), name
        init_kwargs = case["modules"][name]["init_kwargs"]
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items()}
        assert {k: config[k] for k in init_kwargs} == init_kwargs, name


@pytest.mark.parametrize("name", RELEASED)
def test_default_config_has_exactly_the_released_tensors(name):
    manifest_path = require(CONFORMANCE_DIR / VERSION / "manifest_full.json", f"{VERSION} tensor manifest")
    manifest = json.loads(manifest_path.read_text())
    config = manifest[f"{name}.__config__"]
    cls = CLASSES[manifest[f"{name}.__class__"]]
    # Built from what the released config.json holds: no arguments at all for the
    # control nets, so their class defaults must be the release.
    released_config = {"_class_name": cls.__name__, **(config if manifest[f"{name}.__config_json_has_args__"] else {})}
    with torch.device("meta"):
        model = cls.from_config(released_config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(manifest[name]) - set(ours)) == [], "tensors we do not have"
    assert sorted(set(ours) - set(manifest[name])) == [], "tensors the release does not have"
    assert {k: v for k, v in ours.items() if v != manifest[name][k]} == {}
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if k in config} == config


def test_reference_adapter_rejects_an_unknown_version():
    with pytest.raises(ValueError, match="v9"):
        HMReferenceAdapter(block_out_channels=(16, 24, 32, 32), version="v9")
