"""The official app's checkpoint and LoRA presets by name: the table, resolution to the right repo
and files through the fake hub on 127.0.0.1 (into the Hugging Face cache, once), the listing, and
`animate --checkpoint NAME --lora NAME:SCALE` end to end on tiny weights served as the presets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import MEDIA, require
from hellomeme_cli.weights.checkpoints import load_sd15
from hellomeme_cli.cli import app
from hellomeme_cli.model_options import check_options, resolve_checkpoint, resolve_loras
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.weights.presets import CHECKPOINT_FILES, DISTILLATION_LORAS, PRESETS, all_presets, checkpoint_preset, lora_preset
from hellomeme_cli.settings import ModelOptions, from_values
from hellomeme_cli.media.video import read_frames
from hellomeme_cli.weights.cache import WeightCache
from test_animate import kohya_attention_lora
from test_weights import COMMIT, serve_hub

runner = CliRunner()
LORA = b"lora bytes" * 100
REALISTIC = "songkey/realisticVisionV60B1_v51VAE"


def _snapshot(hf: Path, repo: str) -> Path:
    return hf / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The fake hub serving MoreDetails' LoRA and RealisticVisionV60B1's files."""
    files = {"songkey/loras_sd_1_5/more_details.safetensors": LORA}
    files.update({f"{REALISTIC}/{path}": f"{path} content".encode() for path in CHECKPOINT_FILES})
    server = serve_hub(files, tmp_path, monkeypatch)
    yield server
    server.stop()


def test_the_table_holds_the_official_apps_14_checkpoints_and_9_loras():
    kinds = [preset.kind for preset in all_presets() if preset.name in PRESETS]
    assert kinds.count("base") + kinds.count("checkpoint") == 14 and kinds.count("lora") == 9
    assert PRESETS["RealisticVisionV60B1"] == ("checkpoint", REALISTIC, "")
    assert PRESETS["toonyou_beta6"] == ("checkpoint", "songkey/toonyou_beta6", "")
    assert PRESETS["MoreDetails"] == ("lora", "songkey/loras_sd_1_5", "more_details.safetensors")
    assert PRESETS["zyd232_InkStyle_v1_0"] == ("lora", "songkey/loras_sd_1_5", "zyd232_InkStyle_v1_0.safetensors")
    assert all(preset.repo.startswith("songkey/") for preset in all_presets() if preset.name in PRESETS)
    # Then the few-step recipes' distillation LoRAs, from their authors' repos.
    assert [preset.name for preset in all_presets()][len(PRESETS):] == list(DISTILLATION_LORAS)


def test_names_match_in_any_case_and_a_local_file_of_that_name_wins(tmp_path, monkeypatch):
    assert checkpoint_preset("realisticvisionv60b1").repo == REALISTIC
    assert lora_preset("RealisticVisionV60B1") is None and checkpoint_preset("MoreDetails") is None
    monkeypatch.chdir(tmp_path)
    Path("MoreDetails").write_bytes(b"mine")
    assert lora_preset("MoreDetails") is None


def test_lora_name_and_scale_parse_as_a_file_option_does():
    settings = from_values({"loras": ["MoreDetails:0.8", "Drawing"]})
    assert settings.models.loras == ((Path("MoreDetails"), 0.8), (Path("Drawing"), 1.0))


def test_a_lora_preset_is_fetched_into_the_hf_cache_on_first_use_only(hub, tmp_path):
    (path, scale), = resolve_loras(((Path("MoreDetails"), 0.8),), WeightCache())
    assert path == _snapshot(tmp_path / "hf", "songkey/loras_sd_1_5") / "more_details.safetensors"
    assert path.read_bytes() == LORA and scale == 0.8
    assert hub.gets() == ["/songkey/loras_sd_1_5/resolve/main/more_details.safetensors"]
    hub.requests.clear()
    assert resolve_loras(((Path("MoreDetails"), 0.8),), WeightCache()) == ((path, 0.8),)
    assert hub.requests == []  # there and checked: not one request
    listing = runner.invoke(app, ["weights", "presets"]).output
    assert any(line.split()[0] == "MoreDetails" and line.endswith("in cache") for line in listing.splitlines())


def test_weights_fetch_takes_preset_names_and_fetches_only_them(hub):
    result = runner.invoke(app, ["weights", "fetch", "moredetails"])
    assert result.exit_code == 0, result.output
    assert hub.gets() == ["/songkey/loras_sd_1_5/resolve/main/more_details.safetensors"]


def test_a_checkpoint_preset_resolves_to_its_repos_folder_in_the_hf_cache(hub, tmp_path):
    folder = resolve_checkpoint("RealisticVisionV60B1", WeightCache())
    assert folder == _snapshot(tmp_path / "hf", REALISTIC)
    assert sorted(hub.gets()) == sorted(f"/{REALISTIC}/resolve/main/{path}" for path in CHECKPOINT_FILES)
    assert (folder / "unet" / "config.json").read_bytes() == b"unet/config.json content"


def test_sd15_is_the_base_model_and_needs_nothing(hub):
    assert resolve_checkpoint("SD1.5", WeightCache()) is None and hub.requests == []


def test_preset_names_pass_the_checks_and_unknown_names_are_told_where_to_look():
    check_options(ModelOptions(checkpoint="dreamshaper_8", loras=((Path("ghibli_anime_v1"), 1.0),)))
    with pytest.raises(HellomemeError, match=r"LoRA not found: NoSuchStyle .*hellomeme weights presets"):
        check_options(ModelOptions(loras=((Path("NoSuchStyle"), 1.0),)))
    with pytest.raises(HellomemeError, match=r"checkpoint not found: no_such_model .*hellomeme weights presets"):
        check_options(ModelOptions(checkpoint="no_such_model"))


def test_presets_are_listed_with_their_sources():
    result = runner.invoke(app, ["weights", "presets"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:3] for line in result.output.splitlines()[1:]}
    assert len(rows) == 26
    assert rows["TCD-SD15-LoRA"] == ["lora", "h1t/TCD-SD15-LoRA/pytorch_lora_weights.safetensors"]
    assert rows["RealisticVisionV60B1"] == ["checkpoint", REALISTIC]
    assert rows["MoreDetails"] == ["lora", "songkey/loras_sd_1_5/more_details.safetensors"]


def test_animate_with_a_checkpoint_and_a_lora_by_name(tiny_cache, tmp_path, monkeypatch):
    """Tiny weights served as the presets' repos: the run fetches them and they change the video."""
    home = tmp_path / "home"
    shutil.copytree(tiny_cache, home)  # the run records the hub files' hashes in its home
    base = load_sd15(home / "sd15")
    for parameter in base.unet.parameters():
        parameter.data.mul_(1.05)
    base.unet.save_pretrained(tmp_path / "checkpoint" / "unet")
    served = {f"{REALISTIC}/{path}": (tmp_path / "checkpoint" / path).read_bytes() for path in CHECKPOINT_FILES if path.startswith("unet/")}
    served.update({f"{REALISTIC}/{path}": (home / "sd15" / path).read_bytes() for path in CHECKPOINT_FILES if not path.startswith("unet/")})
    save_file(kohya_attention_lora(base.unet), tmp_path / "style.safetensors")
    served["songkey/loras_sd_1_5/more_details.safetensors"] = (tmp_path / "style.safetensors").read_bytes()
    server = serve_hub(served, tmp_path, monkeypatch)
    monkeypatch.setenv("HELLOMEME_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip")
    common = [str(reference), str(clip), "--size", "128", "--steps", "2", "--max-frames", "3", "--seed", "2"]
    try:
        for name, extra in (("plain.mp4", []), ("styled.mp4", ["--checkpoint", "RealisticVisionV60B1", "--lora", "MoreDetails:0.8"])):
            result = runner.invoke(app, ["animate", *common, *extra, "-o", name])
            assert result.exit_code == 0, result.output
    finally:
        server.stop()
    assert len(server.gets()) == len(served)
    plain, styled = (np.stack(list(read_frames(tmp_path / name))).astype(int) for name in ("plain.mp4", "styled.mp4"))
    assert np.abs(plain - styled).mean() > 1
