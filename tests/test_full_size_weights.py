"""The full-size random weights (`tiny.make_full_size`, for benchmarks against the official code) have
exactly the released layout: every network component a version's `manifest_full.json` lists is built
with the tensor names and shapes the official classes hold at their default configs. Built on the meta
device: shapes, no memory, no GBs written."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CONFORMANCE_DIR
from hellomeme_cli.versions import VERSIONS
from hellomeme_cli.weights import tiny

MANIFESTS = {"v1": "manifest_full.json", **{name: f"{name}/manifest_full.json" for name in ("v2", "v3", "v4", "v5", "v5b", "v5c")}}


def manifest_component(version: str, role: str) -> str:
    """The weight component a manifest entry describes: v1 to v4 name roles (hm_reference, hm_control
    = the blendshapes net, hm_control2 = PD-FGC's, hm_motion, hm_control_proj), v5+ the components."""
    entry = VERSIONS[version]
    roles = {
        "hm_reference": entry.reference_component,
        "hm_motion": entry.motion_adapter_component,
        "hm_control": entry.control("blendshapes").control_component,
        "hm_control2": entry.control("pdfgc").control_component,
        "hm_control_proj": entry.control().control_proj_component,
    }
    return roles.get(role, role)


def _manifest_cases():
    cases = []
    for version, path in MANIFESTS.items():
        file = CONFORMANCE_DIR / path
        if not file.is_file():
            continue
        manifest = json.loads(file.read_text())
        cases += [pytest.param(version, role, manifest[role], id=f"{version}-{role}") for role in manifest if "." not in role]
    return cases or [pytest.param(None, None, None, marks=pytest.mark.skip(reason=f"no manifests under {CONFORMANCE_DIR}"))]


@pytest.mark.parametrize(("version", "role", "shapes"), _manifest_cases())
def test_full_size_component_has_the_released_tensors(version, role, shapes):
    component = manifest_component(version, role)
    assert component in VERSIONS[version].all_components()
    with torch.device("meta"):
        network = tiny.build_network(component, "full")
    ours = {name: list(tensor.shape) for name, tensor in network.state_dict().items()}
    assert sorted(set(shapes) - set(ours)) == [], "tensors of the release missing"
    assert sorted(set(ours) - set(shapes)) == [], "tensors the release does not have"
    assert {name: shape for name, shape in ours.items() if shape != shapes[name]} == {}


def test_full_size_sd15_is_sd15():
    """SD1.5's well-known sizes: UNet 859.5 M values, VAE 83.7 M, text encoder 123.1 M; the ViT-H encoder 632.1 M."""
    with torch.device("meta"):
        networks = {"unet": tiny.full_unet(), "vae": tiny.full_vae(), "text_encoder": tiny.full_text_encoder(vocab_size=515)}
        networks["image_encoder"] = tiny.build_network("image_encoder", "full")
    millions = {name: round(sum(p.numel() for p in network.parameters()) / 1e6, 1) for name, network in networks.items()}
    assert millions == {"unet": 859.5, "vae": 83.7, "text_encoder": 123.1, "image_encoder": 632.1}


def test_every_component_a_version_needs_has_a_full_size_writer():
    for version in VERSIONS.values():
        needed = [name for name in version.all_components() if name != "face_landmarker"]
        assert set(needed) <= set(tiny._writers("full")), version.name


def test_full_size_writes_only_what_is_asked_in_half_precision(tmp_path, monkeypatch):
    """make_full_size writes the components named, float16 on disk, loadable by the cache; checked on
    a cheap component (the PD-FGC encoder) so no GBs are written."""
    from safetensors import safe_open

    cache = tiny.make_full_size(tmp_path, ["pd_fgc_motion"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pd_fgc_motion"]
    folder = cache.require(["pd_fgc_motion"])["pd_fgc_motion"]
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} - {"I64"} == {"F16"}  # floats in half; counters stay int
    with pytest.raises(Exception, match="no full-size writer for esrgan"):
        tiny.make_full_size(tmp_path, ["esrgan"])
