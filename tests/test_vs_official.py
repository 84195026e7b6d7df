"""`benchmarks/vs_official.py` (make bench-official) without the official code (CI has no GitHub): the
inputs it draws, our side of a run on tiny weights through the worker's code path (latents and the
network calls per frame it counts), the comparison and the table from made-up numbers, and the
stand-ins it imports the official package with."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import save_file

from benchmarks import vs_official
from benchmarks.vs_official import Run, Settings, compare, draw_inputs, format_table, parse_run
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.versions import get_version
from hellomeme_cli.weights.tiny import TEXT_DIM


def test_inputs_are_drawn_from_the_seed_with_each_versions_fields():
    v1, v5c = get_version("v1"), get_version("v5c", "image")
    first, again = draw_inputs(v1, "video", 128, 5, "pdfgc", seed=3), draw_inputs(v1, "video", 128, 5, "pdfgc", seed=3)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["pd_fpg"], draw_inputs(v1, "video", 128, 5, "pdfgc", seed=4)["pd_fpg"])
    assert {name: tuple(t.shape) for name, t in first.items()} == {
        "ref_image": (1, 3, 128, 128), "condition": (1, 3, 5, 128, 128), "pd_fpg": (1, 5, 548),
        "text_embeds": (1, 77, 768), "negative_text_embeds": (1, 77, 768), "neg_pd_fpg": (1, 1, 548),
    }
    assert first["condition"].min() >= -1 and first["condition"].max() <= 1
    image = draw_inputs(v5c, "image", 128, 5, "blendshapes", seed=0)
    assert image["condition"].shape[2] == 1 and "neg_pd_fpg" not in image  # v3+ take zeros, not a negative embedding
    assert {"ref_condition", "ref_drive_coeff", "ref_face_parts", "drive_coeff", "face_parts"} <= set(image)


def test_runs_are_named_by_version_and_mode():
    assert parse_run("v2") == ("v2", "video")
    assert parse_run("v5c") == ("v5c", "image")
    assert parse_run("v5:image") == ("v5", "image")
    with pytest.raises(HellomemeError):
        parse_run("v5c:video")


def test_cuda_defaults_to_the_apps_size():
    assert Settings.for_device("cuda").size == 512
    assert Settings.for_device("cpu").size == 128 and Settings.for_device("cpu", size=256).size == 256


def test_our_side_on_tiny_weights_counts_every_network_call(tiny_cache, tmp_path):
    """v1 video, 5 frames, 1 step, guidance: stage 1 one 2D call per frame, stage 2 one 12-frame window,
    the reference net and VAE encoder once per clip, one decode batch of 5 frames; the control net once
    per frame in stage 1, once for the unconditional input and once for the stage-2 window."""
    version = get_version("v1")
    inputs = tmp_path / "inputs.safetensors"
    save_file(draw_inputs(version, "video", 128, 5, "pdfgc", seed=0, text_width=TEXT_DIM), str(inputs))
    run = Run("ours", "v1", "video", str(tiny_cache), str(inputs), 128, 5, 1, 1.5, "cpu", "float32", "pdfgc", 0)
    latents, measured = vs_official.run_ours(run)
    assert latents.shape == (1, 4, 5, 16, 16) and torch.isfinite(latents).all()
    assert measured["seconds"] > 0 and measured["peak_memory_gb"] > 0
    calls = {role: numbers["calls"] for role, numbers in measured["calls_per_frame"].items()}
    assert calls == pytest.approx({"unet_2d": 1.0, "unet_motion": 0.2, "reference_net": 0.2, "control_net": 1.4, "vae_encode": 0.2, "vae_decode": 0.2})
    frames = measured["calls_per_frame"]
    assert frames["unet_motion"]["frames"] == pytest.approx(2 * 12 / 5)  # one window of 12 (padded) frames, CFG-doubled
    assert frames["vae_decode"]["frames"] == pytest.approx(1.0)
    assert all(numbers["seconds"] > 0 and numbers["faults"] >= 0 for numbers in frames.values())
    assert sum(numbers["faults"] for numbers in frames.values()) > 0  # a fresh process touches new memory
    # The same seed gives the same latents: the comparison with the official ones rests on it. Profiled
    # (`--profile`), each network's first call is run again under the profiler, its operators counted.
    again, profiled = vs_official.run_ours(dataclasses.replace(run, profile=True))
    assert torch.equal(latents, again)
    assert set(profiled["profile"]) == set(calls)
    unet = profiled["profile"]["unet_2d"]
    assert unet["seconds"] > 0 and unet["operators"]["aten::convolution"][0] > 0 and unet["operators"]["aten::convolution"][1] > 0
    assert {role: numbers["calls"] for role, numbers in profiled["calls_per_frame"].items()} == pytest.approx(calls)  # replays not counted


def _side(seconds: float, peak: float) -> dict:
    return {"seconds": seconds, "peak_memory_gb": peak, "calls_per_frame": {"unet_2d": {"calls": 2.0, "frames": 4.0}}}


def test_comparison_and_table_from_made_up_numbers():
    official = torch.ones(1, 4, 3, 2, 2)
    settings = Settings(size=128, steps=2)
    row = compare((official * (1 + 1e-5), _side(10.0, 4.0)), (official, _side(30.0, 12.0)), "video", settings)
    assert row["speedup"] == pytest.approx(3.0) and row["memory_ratio"] == pytest.approx(1 / 3)
    assert row["latent_relative_error"] == pytest.approx(1e-5, rel=0.01) and row["within_tolerance"]
    far = compare((official * 1.01, _side(10.0, 4.0)), (official, _side(30.0, 12.0)), "video", settings)
    assert not far["within_tolerance"]
    shapes = compare((torch.ones(1, 4, 2, 2, 2), _side(1, 1)), (official, _side(1, 1)), "video", settings)
    assert math.isinf(shapes["latent_relative_error"]) and not shapes["within_tolerance"]

    machine = {"cpu": "Test CPU", "cpu_cores": 2, "gpu": None, "torch": "2.13"}
    result = {"machine": machine, "settings": dataclasses.asdict(settings), "runs": [{**row, "version": "v1", "mode": "video", "frames": 3}]}
    table = format_table(result)
    assert "| v1 video | 128 | 3 | 2 | 30.0 | 10.0 | 3.00x | 12.00 | 4.00 | 0.33 | 1.0e-05 | yes (< 2e-05) |" in table
    assert "| v1 video | 2.00 / 2.00 |" in table


def test_the_table_gives_each_networks_seconds_per_frame_and_the_profiled_difference():
    official = torch.ones(1, 4, 3, 2, 2)
    ours_side, official_side = _side(10.0, 4.0), _side(12.0, 5.0)
    ours_side["calls_per_frame"]["unet_2d"]["seconds"], official_side["calls_per_frame"]["unet_2d"]["seconds"] = 2.2, 2.0
    ours_side["calls_per_frame"]["unet_2d"]["faults"], official_side["calls_per_frame"]["unet_2d"]["faults"] = 455e3, 120e3
    ours_side["profile"] = {"unet_2d": {"seconds": 1.1, "operators": {"aten::copy_": [40, 0.030, 0.0, ""], "aten::convolution": [10, 0.5, 0.0, ""]}}}
    official_side["profile"] = {"unet_2d": {"seconds": 1.0, "operators": {"aten::copy_": [4, 0.002, 0.0, ""], "aten::convolution": [10, 0.5, 0.0, ""]}}}
    row = compare((official, ours_side), (official, official_side), "video", Settings())
    machine = {"cpu": "Test CPU", "cpu_cores": 2, "gpu": None, "torch": "2.13"}
    table = format_table({"machine": machine, "settings": dataclasses.asdict(Settings()), "runs": [{**row, "version": "v2", "mode": "video", "frames": 3}]})
    assert "| v2 video | 2.20 / 2.00 (1.10x) |" in table
    assert "| v2 video | 455 / 120 |" in table  # thousands of page faults per frame
    assert "| unet_2d | 1.100 / 1.000 (1.10x) | 40, 30.0 / 4, 2.0 | copy_ 40, 30.0 / 4, 2.0 |" in table


def test_half_precision_on_either_side_is_held_to_the_documented_bound():
    assert vs_official.tolerance(("float32", "float32"), "video", "cpu", 1.5) == 2e-5
    assert vs_official.tolerance(("auto", "float32"), "video", "cpu", 3.0) == 2e-5  # auto is float32 on a CPU
    assert vs_official.tolerance(("bfloat16", "bfloat16"), "image", "cpu", 1.5) == 5e-2
    assert vs_official.tolerance(("float32", "bfloat16"), "video", "cpu", 1.5) == 3e-2  # ours in bfloat16, the official float32
    assert vs_official.tolerance(("float32", "bfloat16"), "video", "cpu", 2.5) == 5e-2
    assert vs_official.tolerance(("auto", "auto"), "video", "cuda", 1.5) == 3e-2


def test_basic_block_stand_in_is_a_resnet_basic_block():
    downsample = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, stride=2, bias=False), torch.nn.BatchNorm2d(16))
    block = vs_official._BasicBlock(8, 16, stride=2, downsample=downsample).eval()
    assert [name for name, _ in block.named_children()] == ["conv1", "bn1", "relu", "conv2", "bn2", "downsample"]
    out = block(torch.randn(2, 8, 8, 8))
    assert out.shape == (2, 16, 4, 4) and out.min() >= 0  # ReLU after the residual sum


def test_a_folder_that_is_no_official_checkout_is_one_line(tmp_path):
    with pytest.raises(HellomemeError, match="not an official HelloMeme checkout"):
        vs_official.import_official(tmp_path)
    with pytest.raises(HellomemeError, match="--official"):
        vs_official.run_comparison(Settings(official=None))


def test_repeats_alternate_the_sides_and_the_fastest_run_counts(monkeypatch, tmp_path):
    """Single CPU runs vary by up to 50%: with `repeats` each side runs that often, which side goes first
    alternates, and the fastest of each side's runs is the one compared (every run's seconds kept)."""
    order, seconds = [], {"ours": iter([9.0, 6.0, 7.0]), "official": iter([12.0, 15.0, 11.0])}

    def run_side(run: Run):
        order.append(run.side)
        return torch.ones(1, 4, 3, 2, 2), _side(next(seconds[run.side]), 1.0)

    monkeypatch.setattr(vs_official, "import_official", lambda checkout: None)
    monkeypatch.setattr(vs_official.bench, "full_size_weights", lambda home, components: 0.0)
    monkeypatch.setattr(vs_official, "run_side", run_side)
    settings = Settings(official=tmp_path, runs=(("v1", "video"),), frames=3, repeats=3, weights=tmp_path / "weights")
    result = vs_official.run_comparison(settings)
    assert order == ["ours", "official", "official", "ours", "ours", "official"]
    (row,) = result["runs"]
    assert row["ours"]["seconds"] == 6.0 and row["official"]["seconds"] == 11.0 and row["speedup"] == pytest.approx(11 / 6)
    assert row["ours"]["seconds_runs"] == [9.0, 6.0, 7.0]
    assert "the fastest of 3 runs per side" in format_table(result)


def test_our_side_may_run_in_bfloat16_against_the_official_float32(monkeypatch, tmp_path):
    """A CPU user's real choice: ours in bfloat16, the official in float32; the latents held to the
    half-precision bound and the table saying which side ran in which."""
    dtypes = {}

    def run_side(run: Run):
        dtypes[run.side] = run.dtype
        return torch.ones(1, 4, 3, 2, 2) * (1.02 if run.side == "ours" else 1.0), _side(5.0 if run.side == "ours" else 10.0, 1.0)

    monkeypatch.setattr(vs_official, "import_official", lambda checkout: None)
    monkeypatch.setattr(vs_official.bench, "full_size_weights", lambda home, components: 0.0)
    monkeypatch.setattr(vs_official, "run_side", run_side)
    settings = Settings(official=tmp_path, runs=(("v2", "video"),), frames=3, our_dtype="bfloat16", weights=tmp_path / "weights")
    result = vs_official.run_comparison(settings)
    assert dtypes == {"ours": "bfloat16", "official": "float32"}
    (row,) = result["runs"]
    assert row["latent_relative_error"] == pytest.approx(0.02, rel=1e-3) and row["tolerance"] == 3e-2 and row["within_tolerance"]
    result["machine"] = {"cpu": "Test CPU", "cpu_cores": 2, "gpu": None, "torch": "2.13"}
    assert "ours bfloat16 against the official float32" in format_table(result)
    assert "| 2.00x |" in format_table(result)
