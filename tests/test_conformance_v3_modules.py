"""Numerical conformance of the HelloMeme v3 and v4 networks with the official code.

Runs every case folder below $HELLOMEME_CONFORMANCE_DIR (default ../shared/conformance)
whose case.json says `"kind": "module"` and `"version"` v3 or v4 (format: v3/README.md
and v4/README.md there) and checks every `out.*` tensor it holds. Sizes, frames, batch,
timestep, control kind and the tiny constructor arguments all come from the case, so
held-out cases run unchanged.
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
    HM3DenoisingNet,
    HM3MotionAdapter,
    HM3ReferenceAdapter,
    HM3ReferenceNet,
    HM4SD15ControlProj,
    HMControlNetBase,
    HMV3ControlNet,
    motion_unet,
)
from test_conformance_v2_modules import FLOAT32_TOLERANCE

VERSIONS = ("v3", "v4")

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


def _is_v3_module_case(case_json: Path) -> bool:
    case = json.loads(case_json.read_text())
    return case.get("kind") == "module" and case.get("version") in VERSIONS


def _cases():
    if not CONFORMANCE_DIR.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no conformance data at {CONFORMANCE_DIR}"))]
    cases = sorted(p.parent for p in CONFORMANCE_DIR.rglob("case.json") if _is_v3_module_case(p))
    if not cases:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no v3/v4 module cases below {CONFORMANCE_DIR}"))]
    return [pytest.param(p, id=str(p.relative_to(CONFORMANCE_DIR))) for p in cases]


def _width_arguments(case: dict, cls) -> dict:
    """The widths the official classes hard-code to SD1.5's (README: "Hard-coded
    widths"), which our classes take as arguments, from the case's UNet."""
    if cls is HM3MotionAdapter:
        return {"time_embed_dim": case["time_embed_dim"]}
    if cls in (HMV3ControlNet, HMControlNetBase, HM4SD15ControlProj):
        return {"unet_block_out_channels": case["unet_block_out_channels"]}
    return {}


def _load(case: dict, folder: Path, name: str, **kwargs):
    """Load weights/<name> with the case's class; constructor arguments from case.json
    where the official class does not write them into config.json."""
    spec = case["modules"][name]
    cls = CLASSES[spec["cls"]]
    init_kwargs = {} if spec.get("config_json_has_init_args", True) else spec["init_kwargs"]
    return cls.from_pretrained(folder / "weights" / name, **init_kwargs, **_width_arguments(case, cls), **kwargs)


# case.json `control` -> the control net's keyword arguments and the case inputs they take.
DRIVE_INPUTS = {
    "arkit": {"drive_coeff": "drive_coeff", "face_parts": "face_parts"},
    "pdfgc": {"emo_embedding": "pd_fpg"},
}


def _controls(case: dict, folder: Path, inputs: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """out.<name>.<key> of the control stack for both drive signals, by <name>."""
    net = _load(case, folder, "hm_control")
    proj = _load(case, folder, "hm_control_proj") if "hm_control_proj" in case["modules"] else None
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


@torch.no_grad()
def run_v3_module_case(folder: Path) -> dict[str, torch.Tensor]:
    """Every output of the module case, computed by our networks, under the case's names."""
    case, io = load_case(folder)
    inputs = {name[3:]: tensor for name, tensor in io.items() if name.startswith("in.")}
    timestep = inputs["timestep"]
    if case["control"] not in CONTROL_SUFFIX:
        raise AssertionError(f"{folder}: unknown control kind {case['control']!r}")
    outputs: dict[str, torch.Tensor] = {}

    controls = _controls(case, folder, inputs)
    for prefix, features in controls.items():
        outputs.update({f"out.{prefix}.{key}": value for key, value in features.items()})
    control = controls[f"control{CONTROL_SUFFIX[case['control']]}"]

    unet = _load(case, folder, "unet")
    reference_net = HM3ReferenceNet(unet)
    reference = reference_net(inputs["ref_latents"], inputs["ref_text_embeds"])
    outputs.update({f"out.reference_cache.{key}": value for key, value in reference.items()})
    pad_latents, text = inputs["pad_latents"], inputs["text_embeds"]
    pads = reference_net.motion_pads(pad_latents[:, :, 0], pad_latents[:, :, -1], text)
    outputs.update({f"out.pad_cache.{key}": value for key, value in pads.items()})

    latents = inputs["latents"]
    reference_adapter, motion_adapter = _load(case, folder, "hm_reference"), _load(case, folder, "hm_motion")
    outputs["out.plain_noise"] = HM3DenoisingNet(unet, reference_adapter, motion_adapter)(latents[:, :, :1], timestep, text)
    stage1 = HM3DenoisingNet(unet, reference_adapter, motion_adapter)
    outputs["out.stage1_noise"] = stage1(latents, timestep, text, reference, control)

    motion = HM3DenoisingNet(motion_unet(unet, _load(case, folder, "motion_adapter")), reference_adapter, motion_adapter)
    outputs["out.stage2_nomotion_noise"] = motion(latents, timestep, text, reference, control)
    outputs["out.stage2_noise"] = motion(latents, timestep, text, reference, control, motion_pads=pads)
    return outputs


@pytest.mark.parametrize("folder", _cases())
def test_float32_matches_official(folder):
    case, io = load_case(folder)
    expected = {name: tensor for name, tensor in io.items() if name.startswith("out.")}
    assert set(expected) == {n for n in case["tensors"] if n.startswith("out.")}, "io.safetensors and case.json disagree"
    ours = run_v3_module_case(folder)

    assert set(expected) <= set(ours), f"outputs not computed: {sorted(set(expected) - set(ours))}"
    failures = []
    for name in sorted(expected):
        assert ours[name].shape == expected[name].shape, f"{name}: shape {tuple(ours[name].shape)}"
        error = relative_error(ours[name], expected[name])
        print(f"{folder.parent.name}/{folder.name} {name:36s} relative error {error:.3e}")
        if not error < FLOAT32_TOLERANCE:
            failures.append(f"{name}: {error:.3e}")
    assert not failures, f"above {FLOAT32_TOLERANCE:g}: " + ", ".join(failures)


@pytest.mark.parametrize("folder", _cases())
def test_official_folders_load_with_no_missing_or_unexpected_keys(folder):
    case, _ = load_case(folder)
    for name, spec in case["modules"].items():
        if spec["cls"] not in CLASSES or not (folder / "weights" / name).is_dir():
            continue
        model, info = _load(case, folder, name, output_loading_info=True)
        assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == ([], [], []), name
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items()}
        assert {k: config[k] for k in spec["init_kwargs"]} == spec["init_kwargs"], name
        # the tiny widths the case put in place of the official hard-coded ones
        for layer, override in spec.get("overrides", {}).items():
            if isinstance(override.get("here"), list):  # [in, out] of one Linear / Conv2d
                weight = model.get_submodule(layer).weight
                assert [weight.shape[1], weight.shape[0]] == override["here"], f"{name}.{layer}"


def _manifest_names():
    params = []
    for version in VERSIONS:
        path = CONFORMANCE_DIR / version / "manifest_full.json"
        names = [k for k in json.loads(path.read_text()) if "__" not in k] if path.is_file() else ["hm_reference"]
        params += [pytest.param(version, name, id=f"{version}-{name}") for name in names]
    return params


@pytest.mark.parametrize(("version", "name"), _manifest_names())
def test_default_config_has_exactly_the_released_tensors(version, name):
    manifest_path = require(CONFORMANCE_DIR / version / "manifest_full.json", f"{version} tensor manifest")
    manifest = json.loads(manifest_path.read_text())
    config = manifest[f"{name}.__config__"]
    cls = CLASSES[manifest[f"{name}.__class__"]]
    # Built from what the released config.json holds: no arguments at all for v3's
    # control net, so its class defaults must be the release.
    released_config = {"_class_name": cls.__name__, **(config if manifest[f"{name}.__config_json_has_args__"] else {})}
    with torch.device("meta"):
        model = cls.from_config(released_config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(manifest[name]) - set(ours)) == [], "tensors we do not have"
    assert sorted(set(ours) - set(manifest[name])) == [], "tensors the release does not have"
    assert {k: v for k, v in ours.items() if v != manifest[name][k]} == {}
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if k in config} == config


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
