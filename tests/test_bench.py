"""`benchmarks/bench.py` (make bench) and the speed options: what they report and that they change
no result. No timing is asserted, only that every number is there and positive."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from safetensors.torch import save_file

from benchmarks import bench, vs_official
from benchmarks.bench import STAGES, StageClock, main
from benchmarks.vs_official import Run, draw_inputs
from conformance_case import control_from_tensors
from conftest import MEDIA, require
from hellomeme_cli.engine import compile_blocks, load_pipeline
from hellomeme_cli.settings import ModelOptions
from hellomeme_cli.versions import get_version
from hellomeme_cli.progress import ProgressEvent
from hellomeme_cli.samplers.common import SamplerInputs, SamplerSettings
from hellomeme_cli.weights.tiny import TEXT_DIM
from hellomeme_cli.weights.cache import WeightCache

SIZE = 128


def test_bench_writes_every_stage_with_positive_numbers(tiny_cache, tmp_path, monkeypatch, capsys):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip")
    monkeypatch.setenv("HELLOMEME_HOME", str(tiny_cache))
    arguments = ["--json", tmp_path / "bench.json", "--reference", reference, "--drive", clip,
                 "--size", "128", "--steps", "1", "--max-frames", "3", "--frames", "4", "--dtype-sizes"]
    assert main([str(a) for a in arguments]) == 0
    table = capsys.readouterr().out
    report = json.loads((tmp_path / "bench.json").read_text())

    clip_run = report["cpu_tiny"]
    assert clip_run["frames"] == 3
    assert set(clip_run["seconds_per_frame"]) == set(STAGES)
    assert all(value > 0 for value in clip_run["seconds_per_frame"].values()), clip_run["seconds_per_frame"]
    assert clip_run["peak_rss_mb"] >= clip_run["rss_after_loading_mb"] > 0
    assert [run["frames"] for run in report["memory"]] == [4]
    assert report["tracking"]["overall_fps"] > 0
    assert "skipped" in report["gpu_full_size"]
    machine = report["machine"]
    assert machine["cpu_cores"] > 0 and machine["torch"] == torch.__version__ and machine["hellomeme"]
    assert "face tracking" in table and "peak RSS" in table


def test_cpu_dtypes_time_float32_and_bfloat16_side_by_side(monkeypatch):
    """One guided UNet call per size and dtype (a tiny UNet here, SD1.5's in `make bench`), and the
    CPU's native bfloat16 feature beside them, as the table prints them."""
    from diffusers import UNet2DConditionModel

    from benchmarks.bench import cpu_dtype_lines, cpu_dtypes

    unet = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, layers_per_block=1, sample_size=8)
    measured = cpu_dtypes(unet, (64, 128), repeats=1)
    assert set(measured["seconds"]) == {"64", "128"}
    assert all(set(by_dtype) == {"float32", "bfloat16"} and min(by_dtype.values()) > 0 for by_dtype in measured["seconds"].values())
    lines = cpu_dtype_lines({**measured, "native_bfloat16": "avx512_bf16", "seconds": {"128": {"float32": 1.4, "bfloat16": 0.5}}})
    assert lines[0].endswith("native bfloat16: avx512_bf16") and lines[1] == "  128 px: float32 1.40 s, bfloat16 0.50 s (bfloat16 2.80x the float32 speed)"


def test_stage_clock_gives_the_time_before_stage_1_to_the_reference_and_the_tail_to_encoding():
    clock = StageClock()
    for task, completed in (("tracking", 1), ("driving signals", 0), ("stage 1", 0), ("stage 1", 1), ("decode", 1), ("writing", 1)):
        clock(ProgressEvent(task, completed, 1))
    seconds = clock.finish()
    assert set(seconds) == set(STAGES) and seconds["stage2"] == 0
    assert all(seconds[stage] > 0 for stage in ("tracking", "signals", "reference", "stage1", "decode", "encode"))


def _layer_by_layer_flops(module: torch.nn.Module, *args, **kwargs) -> int:
    """FLOPs of one call counted from the shapes each layer sees: 2 per multiply-add of every
    convolution, linear layer and attention product (bias, norms and activations left out)."""
    total = 0

    def convolution(layer, inputs, output):
        nonlocal total
        total += 2 * output.numel() * layer.weight[0].numel()  # weight[0]: in/groups x kernel

    def linear(layer, inputs, output):
        nonlocal total
        total += 2 * output.numel() * layer.in_features

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attention(query, key, value, *rest, **options):
        nonlocal total
        total += 2 * query.shape[:-1].numel() * key.shape[-2] * (query.shape[-1] + value.shape[-1])  # Q K^T, then P V
        return sdpa(query, key, value, *rest, **options)

    hooks = [
        layer.register_forward_hook(convolution if isinstance(layer, torch.nn.modules.conv._ConvNd) else linear)
        for layer in module.modules()
        if isinstance(layer, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))
    ]
    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for hook in hooks:
            hook.remove()
    return total


def _tiny_run(tiny_cache, tmp_path, version: str = "v1") -> Run:
    inputs = tmp_path / "inputs.safetensors"
    save_file(draw_inputs(get_version(version), "video", SIZE, 3, "pdfgc", seed=0, text_width=TEXT_DIM), str(inputs))
    return Run("ours", version, "video", str(tiny_cache), str(inputs), SIZE, 3, 1, 1.5, "cpu", "float32", "pdfgc", 0, flops=True)


def test_counted_unet_flops_match_a_layer_by_layer_count(tiny_cache, tmp_path, monkeypatch):
    """The FLOPs behind the utilisation figure: each UNet role's first call (a stage-1 frame, a stage-2
    window, with guidance, reference features and control) counted again after the run."""
    run = _tiny_run(tiny_cache, tmp_path)
    counted = vs_official.run_ours(run)[1]["flops_per_frame"]
    monkeypatch.setattr(bench, "count_flops", _layer_by_layer_flops)
    expected = vs_official.run_ours(run)[1]["flops_per_frame"]
    assert set(counted) == {"unet_2d", "unet_motion"} and expected["unet_motion"] > expected["unet_2d"] > 0  # the motion modules
    for role in counted:
        assert abs(counted[role] - expected[role]) <= 0.02 * expected[role], (role, counted[role], expected[role])


def test_full_size_runs_report_every_versions_speed_memory_and_rate(tiny_cache, tmp_path):
    """The full-size path (CUDA in `make bench`) on the tiny weights and the CPU: one fresh process per
    run, with the speed options handed to it, every number there."""
    result = bench.measure_full_size(
        (("v2", "video"),), (3,), device="cpu", dtype="float32", steps=1, size=SIZE, options=ModelOptions(low_memory=True), weights=tiny_cache,
    )
    assert [(run["version"], run["mode"], run["frames"]) for run in result["runs"]] == [("v2", "video", 3)]
    assert result["options"] == {"compile": False, "channels_last": False, "low_memory": True}
    (run,) = result["runs"]
    assert run["seconds_per_frame"] > 0 and run["peak_memory_gb"] > 0 and run["unet"]["achieved_tflops"] > 0
    assert run["calls_per_frame"]["unet_motion"]["calls"] > 0 and run["calls_per_frame"]["unet_2d"]["calls"] == 1  # stage 1: one per frame
    lines = bench.full_size_lines(result)
    assert len(lines) == 2 and "v2 video, 3 frames" in lines[1]
    assert bench.FULL_SIZE_RUNS[-1] == ("v5c", "image") and len(bench.FULL_SIZE_RUNS) == 7  # every version by default


def test_every_attention_uses_pytorch_sdpa(tiny_cache):
    """SDPA (flash / memory-efficient kernels on GPUs) in the UNets, the motion modules and the
    Spatial Knitting blocks of the adapter and control net alike."""
    models = load_pipeline("v1", ModelOptions(device="cpu", control="blendshapes"), WeightCache(tiny_cache))
    networks = [models.denoiser_motion, models.control_net, models.vae_decoder]
    attentions = [module for network in networks for module in network.modules() if isinstance(module, Attention)]
    assert len(attentions) > 20
    assert all(isinstance(attention.processor, AttnProcessor2_0) for attention in attentions)


def _latents(models) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    frames = 3
    inputs = SamplerInputs(
        ref_image=torch.rand(1, 3, SIZE, SIZE, generator=generator) * 2 - 1,
        text_embeds=torch.randn(1, 77, TEXT_DIM, generator=generator),
        negative_text_embeds=torch.randn(1, 77, TEXT_DIM, generator=generator),
        control=control_from_tensors(
            torch.rand(1, 3, frames, SIZE, SIZE, generator=generator) * 2 - 1,
            torch.rand(1, frames, 51, generator=generator),
            torch.randn(1, frames, 3, 1024, generator=generator),
        ),
        num_frames=frames,
    )
    sampler = models.sampler()
    settings = SamplerSettings(steps=1, stage1_steps=1, guidance=1.5, window=2, overlap=1)
    latents = sampler.sample(inputs, settings, torch.Generator().manual_seed(0))
    frames_out = torch.cat(list(sampler.decode_tensors(latents, batch=2)))
    return torch.cat([latents.flatten(), frames_out.flatten()])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def default_latents(tiny_cache) -> torch.Tensor:
    return _latents(load_pipeline("v1", ModelOptions(device="cpu", control="blendshapes"), WeightCache(tiny_cache)))


# Offloading runs the same kernels on the same weights: the same numbers. Channels-last picks other
# float32 convolution kernels (another summation order), and guidance amplifies the rounding.
@pytest.mark.parametrize("option, tolerance", [("channels_last", 1e-4), ("low_memory", 1e-7)])
def test_speed_options_give_the_default_latents_and_frames(tiny_cache, default_latents, option, tolerance):
    options = dataclasses.replace(ModelOptions(device="cpu", control="blendshapes"), **{option: True})
    models = load_pipeline("v1", options, WeightCache(tiny_cache))
    assert _relative(_latents(models), default_latents) < tolerance


def test_compile_keeps_the_hooks_and_the_result(tiny_cache, default_latents):
    """The compiled regions are the blocks inside the UNets; the HelloMeme hooks around them
    still run. Checked with the `eager` backend: inductor's code generation on a 2-core CPU
    takes minutes, and the graph capture is what could break the hooks."""
    models = load_pipeline("v1", ModelOptions(device="cpu", control="blendshapes"), WeightCache(tiny_cache))
    torch._dynamo.reset()
    assert compile_blocks(models, backend="eager") > 10
    assert _relative(_latents(models), default_latents) < 1e-5

