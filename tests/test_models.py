"""Structure and loading of the HelloMeme v1 networks."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel

from conformance_case import is_module_case
from conftest import CONFORMANCE_DIR, require
from hellomeme_cli.models import (
    FanEncoder,
    HMControlNet,
    HMControlNet2,
    HMDenoisingNet,
    HMReferenceAdapter,
    HMReferenceNet,
    motion_unet,
)

RELEASED = {"hm_reference": HMReferenceAdapter, "hm_control": HMControlNet, "hm_control2": HMControlNet2}


def _first_module_case():
    cases = sorted(p for p in require(CONFORMANCE_DIR, "conformance data").iterdir() if is_module_case(p))
    if not cases:
        pytest.skip(f"no module case in {CONFORMANCE_DIR}")
    return cases[0]


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_default_config_has_exactly_the_released_tensors(name):
    manifest = json.loads(require(CONFORMANCE_DIR / "manifest_full.json", "tensor manifest").read_text())
    with torch.device("meta"):
        model = RELEASED[name]()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    released = manifest[name]
    assert sorted(set(released) - set(ours)) == [], "tensors we do not have"
    assert sorted(set(ours) - set(released)) == [], "tensors the release does not have"
    assert {k: v for k, v in ours.items() if v != released[k]} == {}
    config = {k: v for k, v in manifest[f"{name}.__config__"].items() if not k.startswith("_")}
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if k in config} == config


@pytest.mark.parametrize(
    "folder, cls",
    [
        ("hm_reference", HMReferenceAdapter),
        ("hm_control", HMControlNet),
        ("hm_control2", HMControlNet2),
        ("unet", UNet2DConditionModel),
        ("motion_adapter", MotionAdapter),
    ],
)
def test_official_folders_load_with_no_missing_or_unexpected_keys(folder, cls):
    _, info = cls.from_pretrained(_first_module_case() / "weights" / folder, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []


def test_wrappers_report_their_unets_device_and_dtype():
    weights = _first_module_case() / "weights"
    unet = UNet2DConditionModel.from_pretrained(weights / "unet", torch_dtype=torch.bfloat16)
    adapter = HMReferenceAdapter.from_pretrained(weights / "hm_reference", torch_dtype=torch.bfloat16)
    stage2 = HMDenoisingNet(motion_unet(unet, MotionAdapter.from_pretrained(weights / "motion_adapter")), adapter)
    for wrapper in (HMReferenceNet(unet), HMDenoisingNet(unet, adapter), stage2):
        assert (wrapper.device, wrapper.dtype) == (torch.device("cpu"), torch.bfloat16)
    assert stage2.is_motion and not HMDenoisingNet(unet, adapter).is_motion


def test_motion_unet_shares_the_2d_weights_instead_of_copying_them():
    weights = _first_module_case() / "weights"
    unet = UNet2DConditionModel.from_pretrained(weights / "unet")
    adapter = MotionAdapter.from_pretrained(weights / "motion_adapter")
    motion = motion_unet(unet, adapter)
    motion_tensors = dict(motion.named_parameters())
    for name, tensor in [*unet.named_parameters(), *adapter.named_parameters()]:
        assert motion_tensors[name] is tensor, name
    assert len(motion_tensors) == len(list(unet.parameters())) + len(list(adapter.parameters()))


def test_motion_unet_rejects_an_adapter_for_another_unet():
    weights = _first_module_case() / "weights"
    unet = UNet2DConditionModel.from_pretrained(weights / "unet")
    adapter = MotionAdapter(block_out_channels=(32, 64, 64, 128), motion_layers_per_block=2, motion_norm_num_groups=32)
    with pytest.raises(ValueError, match="does not fit this UNet"):
        motion_unet(unet, adapter)


def test_reference_adapter_rejects_unknown_versions():
    with pytest.raises(ValueError, match="version 'v9' is none of"):
        HMReferenceAdapter(version="v9")


def test_pd_fgc_encoder_output_and_round_trip(tmp_path):
    torch.manual_seed(0)
    encoder = FanEncoder().eval()
    faces = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        embedding = encoder(faces)
    assert embedding.shape == (2, 548)
    # heads: 6 eye + 30 emotion values, then the 512-d mouth feature
    assert torch.isfinite(embedding).all() and embedding[:, 36:].std() > 0

    encoder.save_pretrained(tmp_path)
    loaded, info = FanEncoder.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert "model.m0.b2_plus_1.conv3.weight" in loaded.state_dict()  # the released checkpoint's names
    with torch.no_grad():
        assert torch.equal(loaded.eval()(faces), embedding)
