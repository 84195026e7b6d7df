"""Numerical conformance of the HelloMeme v2 to v5c networks with the official code, module by module.

Runs every case folder below $HELLOMEME_CONFORMANCE_DIR (default ../shared/conformance), at any
depth, whose case.json says `"kind": "module"` and a version of one of `FAMILIES`, through that
family's networks, and checks every `out.*` tensor it holds; and checks each version's
`manifest_full.json` against our classes at their default configs. What is particular to a family
(the classes its folders load with, how its networks compute a case) is in
test_conformance_v2_modules.py, test_conformance_v3_modules.py (v3, v4) and
test_conformance_v5_modules.py (v5, v5b, v5c). Sizes, frames, batch, timestep, control kind,
weight folders and constructor arguments all come from the case, so other cases in this format
run unchanged. v1's module cases run in test_conformance.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from conformance_case import case_inputs, case_params, case_roles, check_outputs, load_case, weight_folder
from conftest import CONFORMANCE_DIR
from test_conformance_v2_modules import FAMILY as V2
from test_conformance_v3_modules import FAMILY as V3
from test_conformance_v5_modules import FAMILY as V5

FLOAT32_TOLERANCE = 1e-4
# Version -> the family that runs its module cases.
FAMILIES = {version: family for family in (V2, V3, V5) for version in family.versions}
MODULE_CASES = case_params(lambda kind, version: kind == "module" and version in FAMILIES, "v2 to v5c module cases")


@pytest.mark.parametrize("folder", MODULE_CASES)
def test_float32_matches_official(folder):
    case, io = load_case(folder)
    expected = {name: tensor for name, tensor in io.items() if name.startswith("out.")}
    assert set(expected) == {n for n in case["tensors"] if n.startswith("out.")}, "io.safetensors and case.json disagree"
    if "final_output" in case:
        assert case["final_output"] in expected
    with torch.no_grad():
        ours = FAMILIES[case["version"]].run(folder, case, case_inputs(io))
    # Inputs the case says how to make (v5's motion pads) are made too, and checked.
    expected.update({name: io[name] for name in ours if name.startswith("in.")})
    check_outputs(expected, ours, FLOAT32_TOLERANCE, str(folder.relative_to(CONFORMANCE_DIR)))


@pytest.mark.parametrize("folder", MODULE_CASES)
def test_weight_folders_load_with_no_missing_or_unexpected_keys(folder):
    """Every weight folder of ours the case has (diffusers' VAE is not ours) loads exactly, with
    the constructor arguments and the widths the case gives."""
    case, _ = load_case(folder)
    family = FAMILIES[case["version"]]
    for role, class_name in case_roles(case).items():
        if class_name not in family.classes or weight_folder(folder, case, role) is None:
            continue
        model = family.load(folder, case, role)  # load_folder refuses a file with missing, unexpected or mismatched tensors
        spec = case.get("modules", {}).get(role, {})
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items()}
        assert {k: config[k] for k in spec.get("init_kwargs", {})} == spec.get("init_kwargs", {}), role
        # the tiny widths the case put in place of the official hard-coded ones
        for layer, override in spec.get("overrides", {}).items():
            if isinstance(override.get("here"), list):  # [in, out] of one Linear / Conv2d
                weight = model.get_submodule(layer).weight
                assert [weight.shape[1], weight.shape[0]] == override["here"], f"{role}.{layer}"


def _manifest_entries():
    params = []
    for version in FAMILIES:
        path = CONFORMANCE_DIR / version / "manifest_full.json"
        if not path.is_file():
            params.append(pytest.param(version, None, id=f"{version}-manifest", marks=pytest.mark.skip(reason=f"no {path}")))
            continue
        names = [name for name in json.loads(path.read_text()) if "__" not in name]
        params += [pytest.param(version, name, id=f"{version}-{name}") for name in names]
    return params


@pytest.mark.parametrize(("version", "name"), _manifest_entries())
def test_default_config_has_exactly_the_released_tensors(version, name):
    manifest = json.loads((CONFORMANCE_DIR / version / "manifest_full.json").read_text())
    family = FAMILIES[version]
    cls = family.classes[manifest[f"{name}.__class__"]] if f"{name}.__class__" in manifest else family.released_classes[name]
    config = {k: v for k, v in manifest[f"{name}.__config__"].items() if not k.startswith("_")}
    # Built from what the released config.json holds: no arguments at all for the classes
    # whose official config.json has none (v2's and v3's control nets), so their defaults must be the release.
    released = config if manifest.get(f"{name}.__config_json_has_args__", True) else {}
    with torch.device("meta"):
        model = cls.from_config({"_class_name": cls.__name__, **released})
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(manifest[name]) - set(ours)) == [], "tensors we do not have"
    assert sorted(set(ours) - set(manifest[name])) == [], "tensors the release does not have"
    assert {k: v for k, v in ours.items() if v != manifest[name][k]} == {}
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if k in config} == config
