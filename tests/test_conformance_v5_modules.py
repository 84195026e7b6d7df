"""Numerical conformance of the HelloMeme v5, v5b and v5c networks with the official code.

Runs every case folder below $HELLOMEME_CONFORMANCE_DIR (default ../shared/conformance)
whose case.json says `"kind": "module"` and a version of the v5 family (format:
v5/README.md there; v5b/ and v5c/ READMEs for what they change) and checks every `out.*`
tensor it holds. Weight folders (the shared hm5_weights), classes, sizes, frames, batch,
timestep and control kind all come from the case, so held-out cases run unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from conformance_case import load_case, relative_error
from conftest import CONFORMANCE_DIR, require
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
from hellomeme_cli.models.unet import load_folder

FLOAT32_TOLERANCE = 1e-4
VERSIONS = ("v5", "v5b", "v5c")
# Versions whose reference net also gets the reference image's own control (v5c README).
REFERENCE_WITH_OWN_CONTROL = ("v5c",)

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


def _is_v5_module_case(case_json: Path) -> bool:
    case = json.loads(case_json.read_text())
    return case.get("kind") == "module" and case.get("version") in VERSIONS


def _cases():
    if not CONFORMANCE_DIR.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no conformance data at {CONFORMANCE_DIR}"))]
    cases = sorted(p.parent for p in CONFORMANCE_DIR.rglob("case.json") if _is_v5_module_case(p))
    if not cases:
        reason = f"no v5/v5b/v5c module cases below {CONFORMANCE_DIR}"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    return [pytest.param(p, id=str(p.relative_to(CONFORMANCE_DIR))) for p in cases]


def _manifest_entries():
    params = []
    for version in VERSIONS:
        path = CONFORMANCE_DIR / version / "manifest_full.json"
        if not path.is_file():
            params.append(pytest.param(version, None, marks=pytest.mark.skip(reason=f"no {path}")))
            continue
        names = [name for name in json.loads(path.read_text()) if "__" not in name]
        params += [pytest.param(version, name, id=f"{version}-{name}") for name in names]
    return params


def _weights(folder: Path, case: dict, role: str) -> Path:
    path = (folder / case["weights"][role]).resolve()
    if not path.is_dir():
        pytest.skip(f"{folder.name}: weights for {role} not found at {path}")
    return path


def _load(folder: Path, case: dict, role: str, **kwargs):
    return load_folder(CLASSES[case["classes"][role]], _weights(folder, case, role), **kwargs)


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


@torch.no_grad()
def run_v5_module_case(folder: Path) -> dict[str, torch.Tensor]:
    """Every output of the module case, computed by our networks, under the case's names;
    plus `in.motion_pad.*` rebuilt from `in.pad_latents` by the case's recipe."""
    case, io = load_case(folder)
    inputs = {name[3:]: tensor for name, tensor in io.items() if name.startswith("in.")}
    kind = case["control"]
    if kind not in EXPRESSION_INPUTS:
        raise AssertionError(f"{folder}: unknown control kind {kind!r}")
    outputs: dict[str, torch.Tensor] = {}

    base = _load(folder, case, "hm_control_base")
    proj = _load(folder, case, "hm_control_proj")
    control = {}
    for each in EXPRESSION_INPUTS:
        result = _control(base, proj, inputs["condition"], inputs, each)
        if result is None:
            continue
        features, control[each] = result
        outputs.update({f"out.control_base.{each}.{k}": v for k, v in features.items()})
        outputs.update({f"out.control_proj.{each}.{k}": v for k, v in control[each].items()})

    unet = _load(folder, case, "unet")
    reference_net = HM5ReferenceNet(unet)
    reference = reference_net(inputs["ref_latents"], inputs["ref_text_embeds"])
    outputs.update({f"out.reference_cache.{k}": v for k, v in reference.items()})
    if case["version"] in REFERENCE_WITH_OWN_CONTROL:
        ref_features, ref_control = _control(base, proj, inputs["ref_condition"], inputs, kind, prefix="ref_")
        outputs.update({f"out.ref_control_base.{k}": v for k, v in ref_features.items()})
        outputs.update({f"out.ref_control_proj.{k}": v for k, v in ref_control.items()})
        reference = reference_net(inputs["ref_latents"], inputs["ref_text_embeds"], control=ref_control)
        outputs.update({f"out.reference_cache_ctrl.{k}": v for k, v in reference.items()})

    motion = _load(folder, case, "hm_motion") if "hm_motion" in case["weights"] else None
    denoiser = HM5DenoisingNet(unet, _load(folder, case, "hm_reference"), motion)
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


@pytest.mark.parametrize("folder", _cases())
def test_float32_matches_official(folder):
    case, io = load_case(folder)
    expected = {name: tensor for name, tensor in io.items() if name.startswith("out.")}
    listed = {n for n in case["tensors"] if n.startswith("out.")}
    assert set(expected) == listed, "io.safetensors and case.json disagree"
    assert case["final_output"] in expected
    ours = run_v5_module_case(folder)
    expected.update({name: io[name] for name in ours if name.startswith("in.motion_pad.")})

    assert set(expected) <= set(ours), f"outputs not computed: {sorted(set(expected) - set(ours))}"
    failures = []
    for name in sorted(expected):
        assert ours[name].shape == expected[name].shape, f"{name}: shape {tuple(ours[name].shape)}"
        error = relative_error(ours[name], expected[name])
        print(f"{case['version']}/{folder.name} {name:40s} relative error {error:.3e}")
        if not error < FLOAT32_TOLERANCE:
            failures.append(f"{name}: {error:.3e}")
    assert not failures, f"above {FLOAT32_TOLERANCE:g}: " + ", ".join(failures)


@pytest.mark.parametrize("folder", _cases())
def test_weight_folders_load_with_no_missing_or_unexpected_keys(folder):
    case, _ = load_case(folder)
    for role, class_name in case["classes"].items():
        if class_name not in CLASSES or role not in case["weights"]:
            continue
        _, info = _load(folder, case, role, output_loading_info=True)
        assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == ([], [], []), role


@pytest.mark.parametrize("version,name", _manifest_entries())
def test_default_config_has_exactly_the_released_tensors(version, name):
    manifest = json.loads((CONFORMANCE_DIR / version / "manifest_full.json").read_text())
    config = {k: v for k, v in manifest[f"{name}.__config__"].items() if not k.startswith("_")}
    cls = RELEASED_CLASSES[name]
    with torch.device("meta"):
        model = cls.from_config({"_class_name": cls.__name__, **config})
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(manifest[name]) - set(ours)) == [], "tensors we do not have"
    assert sorted(set(ours) - set(manifest[name])) == [], "tensors the release does not have"
    assert {k: v for k, v in ours.items() if v != manifest[name][k]} == {}
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if k in config} == config


@torch.no_grad()
def test_v5_runs_non_square_sizes_that_are_not_multiples_of_64():
    """The official v5 reference attention fails unless h == w, and the official control
    net unless H and W are multiples of 64; ours take any multiple of 8."""
    weights = require(CONFORMANCE_DIR / "hm5_weights", "v5 tiny weights")
    unet = load_folder(UNet2DConditionModel, weights / "unet")
    base = load_folder(HM5ControlNetBase, weights / "hm5_control_base")
    proj = load_folder(HM5SD15ControlProj, weights / "hm5_control_proj")
    adapter = load_folder(HM5ReferenceAdapter, weights / "hm5_reference")
    denoiser = HM5DenoisingNet(unet, adapter, load_folder(HM5MotionAdapter, weights / "hm5_motion"))
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
    noise = denoiser(latents, 500, text, reference, control, motion_pad_states(*pads), use_motion=True)
    assert noise.shape == latents.shape and torch.isfinite(noise).all()
    # The reference attention took part (it is what fails officially on these sizes).
    without_reference = denoiser(latents, 500, text, None, control, motion_pad_states(*pads), use_motion=True)
    assert not torch.allclose(noise, without_reference)


def test_denoiser_refuses_what_it_would_otherwise_silently_ignore():
    """The official UNet skips motion and reference without a word when their modules are absent."""
    weights = require(CONFORMANCE_DIR / "hm5_weights", "v5 tiny weights")
    unet = load_folder(UNet2DConditionModel, weights / "unet")
    denoiser = HM5DenoisingNet(unet)
    latents, text = torch.zeros(1, 4, 1, 8, 8), torch.zeros(1, 77, unet.config.cross_attention_dim)
    with pytest.raises(ValueError, match="motion adapter"):
        denoiser(latents, 0, text, use_motion=True)
    with pytest.raises(ValueError, match="reference adapter"):
        denoiser(latents, 0, text, reference={"up_0": torch.zeros(1, 32, 1, 1)})
    motion = HM5DenoisingNet(unet, motion_adapter=load_folder(HM5MotionAdapter, weights / "hm5_motion"))
    with pytest.raises(ValueError, match="motion_pad lacks up_0, up_1, up_2, up_3"):
        motion(latents, 0, text, motion_pad={f"down_{i}": None for i in range(4)}, use_motion=True)
