"""The two-stage video sampler: the stage-2 window plan, and its behaviour on tiny random
networks (short clips, seeds, bounded control requests, windows at any overlap, the
schedule from a scheduler config). Conformance with the official `HMVideoPipeline.__call__`
runs in test_conformance.py (every `sampler` case under $HELLOMEME_CONFORMANCE_DIR)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, MotionAdapter, UNet2DConditionModel

from conformance_case import control_from_tensors, relative_error
from hellomeme_cli.samplers import two_stage as sampler_module
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.models import (
    HMControlNet,
    HMControlNet2,
    HMDenoisingNet,
    HMReferenceAdapter,
    HMReferenceNet,
    HMV2ControlNet,
    motion_unet,
)
from hellomeme_cli.progress import ProgressEvent
from hellomeme_cli.samplers.common import SamplerInputs, SamplerSettings, plan_windows
from hellomeme_cli.samplers.two_stage import VideoSampler
from hellomeme_cli.versions import get_version

# --- the stage-2 window plan ----------------------------------------------------------


def _official_plan(num_frames: int, window: int, overlap: int) -> tuple[int, list[list[int]]]:
    """The index arithmetic of the official stage 2 (padded length, frame lists per
    window), for the overlaps it accepts unclamped (<= 5) and clips of at least
    max(2, overlap) frames (it fails on shorter ones)."""
    stride = window - overlap
    pad = stride - (num_frames - overlap) % stride
    padded = num_frames + pad
    chunks = [list(range(padded))[i : i + window] for i in range(0, padded - stride + 1, stride)]
    chunks[-1] = list(range(chunks[-1][0], padded))
    return padded, chunks


LENGTHS = (1, 5, 11, 12, 13, 38, 84)
OVERLAPS = (0, 2, 4, 5, 11)


@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize("num_frames", LENGTHS)
def test_window_plan_covers_every_frame(num_frames, overlap):
    plan = plan_windows(num_frames, 12, overlap)
    coverage = plan.coverage()
    assert all(stop - start == 12 for start, stop in plan.windows)
    assert plan.windows[0][0] == 0 and plan.length >= num_frames
    assert (coverage[:num_frames] >= 1).all(), "a real frame no window holds"
    assert (coverage >= 1).all()
    for (start, _), (next_start, _) in zip(plan.windows, plan.windows[1:]):
        assert next_start - start == 12 - overlap  # consecutive windows share exactly `overlap` frames
    assert all(start < num_frames for start, _ in plan.windows), "a window of padding only"
    assert plan.noise_frames >= plan.length
    expected = torch.zeros(plan.length)
    for start, stop in plan.windows:
        expected[start:stop] += 1
    assert torch.equal(coverage, expected)


@pytest.mark.parametrize(
    "num_frames, overlap",
    [(f, o) for f in (4, 5, 11, 12, 13, 14, 20, 38, 84, 100) for o in (1, 2, 3, 4, 5) if f >= o],
)
def test_window_plan_is_the_official_one_where_the_official_code_works(num_frames, overlap):
    padded, chunks = _official_plan(num_frames, 12, overlap)
    plan = plan_windows(num_frames, 12, overlap)
    assert plan.noise_frames == padded == plan.length
    assert [list(range(start, stop)) for start, stop in plan.windows] == chunks


def test_window_plan_at_overlap_4_pads_as_the_official_code():
    assert plan_windows(14, 12, 4).windows == ((0, 12), (8, 20))
    assert plan_windows(12, 12, 4).windows == ((0, 12), (8, 20))  # an exact fit still gets a padded window
    assert plan_windows(5, 12, 4).windows == ((0, 12),)


def test_window_plan_drops_windows_of_padding_only():
    plan = plan_windows(12, 12, 0)
    assert plan.windows == ((0, 12),) and plan.noise_frames == 24  # the official draw, one window run


@pytest.mark.parametrize("overlap", (-1, 12, 13))
def test_settings_refuse_overlaps_outside_the_window(overlap):
    with pytest.raises(HellomemeError, match="overlap"):
        SamplerSettings(overlap=overlap)


# --- behaviour on tiny random networks ------------------------------------------------

SIZE = 128  # pixels; latents 16x16, the smallest control level 2x2
TEXT_DIM = 32
UNET_CHANNELS = (32, 64, 64, 64)
CONTROL_CHANNELS = (16, 32, 64, 64)  # control level i feeds UNet down block i


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised output layers random values, so every path contributes."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_nets():
    torch.manual_seed(0)
    blocks = {
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    }
    unet = _randomize(
        UNet2DConditionModel(
            sample_size=SIZE // 8, block_out_channels=UNET_CHANNELS, layers_per_block=1, cross_attention_dim=TEXT_DIM,
            attention_head_dim=8, norm_num_groups=32, **blocks,
        )
    )
    adapter = _randomize(HMReferenceAdapter(block_out_channels=UNET_CHANNELS, **blocks))
    motion_adapter = _randomize(
        MotionAdapter(
            block_out_channels=UNET_CHANNELS, motion_layers_per_block=1, motion_norm_num_groups=32,
            motion_num_attention_heads=8, motion_max_seq_length=32,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=32, sample_size=SIZE,
    ).eval()
    return {
        "reference_net": HMReferenceNet(unet),
        "denoiser_2d": HMDenoisingNet(unet, adapter),
        "denoiser_motion": HMDenoisingNet(motion_unet(unet, motion_adapter).eval(), adapter),
        "blendshapes": _randomize(HMControlNet(cross_attention_dim=TEXT_DIM, block_out_channels=CONTROL_CHANNELS)),
        "pdfgc": _randomize(HMControlNet2(cross_attention_dim=TEXT_DIM, block_out_channels=CONTROL_CHANNELS)),
        "vae": vae,
    }


# The schedule of the SD1.5 scheduler_config.json (PNDM's there; the official code runs Euler on it).
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def _tiny_sampler(nets, control="blendshapes", denoiser_motion=None, scheduler=None) -> VideoSampler:
    return VideoSampler(
        nets["reference_net"], nets["denoiser_2d"], denoiser_motion or nets["denoiser_motion"], nets[control], nets["vae"],
        scheduler=scheduler or EulerDiscreteScheduler(**SD15_SCHEDULER), control=get_version("v1").control(control),
    )


def _tiny_inputs(num_frames: int, seed: int = 1, requests: list | None = None) -> SamplerInputs:
    """Random driving signals for both control nets; `requests` records every frame range asked for."""
    g = torch.Generator().manual_seed(seed)
    source = control_from_tensors(
        torch.rand(1, 3, num_frames, SIZE, SIZE, generator=g) * 2 - 1,
        torch.rand(1, num_frames, 52, generator=g),
        torch.randn(1, num_frames, 3, 1024, generator=g),
        torch.randn(1, num_frames, 548, generator=g),
    )

    def control(start: int, stop: int):
        if requests is not None:
            requests.append((start, stop))
        return source(start, stop)

    return SamplerInputs(
        ref_image=torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1,
        text_embeds=torch.randn(1, 77, TEXT_DIM, generator=g),
        negative_text_embeds=torch.randn(1, 77, TEXT_DIM, generator=g),
        control=control,
        num_frames=num_frames,
        neg_pd_fpg=torch.randn(1, 1, 548, generator=g),
    )


FAST = SamplerSettings(steps=2, stage1_steps=2, guidance=1.5)


def _sample(sampler, inputs, settings=FAST, seed=0, progress=None):
    kwargs = {"progress": progress} if progress else {}
    return sampler.sample(inputs, settings, torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("num_frames", (1, 5))
def test_clips_shorter_than_a_window_work(tiny_nets, num_frames):
    sampler = _tiny_sampler(tiny_nets)
    latents = _sample(sampler, _tiny_inputs(num_frames))
    assert latents.shape == (1, 4, num_frames, SIZE // 8, SIZE // 8) and torch.isfinite(latents).all()
    frames = np.concatenate(list(sampler.decode(latents, batch=2)))
    assert frames.shape == (num_frames, SIZE, SIZE, 3) and frames.dtype == np.uint8


def test_same_seed_same_latents_other_seed_other_latents(tiny_nets):
    sampler, inputs = _tiny_sampler(tiny_nets), _tiny_inputs(3)
    first, again, other = (_sample(sampler, inputs, seed=s) for s in (7, 7, 8))
    assert torch.equal(first, again)
    assert relative_error(other, first) > 0.1


@pytest.mark.parametrize("coefficients", (51, 52))
def test_the_v2_control_takes_any_coefficient_count(tiny_nets, coefficients):
    """v2's blendshape net makes one token per coefficient: the official cases' 51 and MediaPipe's 52 both drive it."""
    torch.manual_seed(3)
    unet = tiny_nets["denoiser_2d"].unet
    adapter = _randomize(HMReferenceAdapter(block_out_channels=UNET_CHANNELS, version="v2"))
    control_net = _randomize(HMV2ControlNet(cross_attention_dim=TEXT_DIM, block_out_channels=(16, *UNET_CHANNELS[1:], UNET_CHANNELS[-1])))
    sampler = VideoSampler(
        HMReferenceNet(unet), HMDenoisingNet(unet, adapter), None, control_net, tiny_nets["vae"],
        scheduler=EulerDiscreteScheduler(**SD15_SCHEDULER), control=get_version("v2").control("blendshapes"),
    )
    inputs = _tiny_inputs(1)
    g = torch.Generator().manual_seed(5)
    drives = [torch.rand(1, 1, coefficients, generator=g) for _ in range(2)]
    latents = [
        sampler.sample_image(
            dataclasses.replace(inputs, control=control_from_tensors(inputs.control(0, 1).condition, drive, inputs.control(0, 1).face_parts)),
            FAST, torch.Generator().manual_seed(0),
        )
        for drive in drives
    ]
    assert latents[0].shape == (1, 4, 1, SIZE // 8, SIZE // 8) and torch.isfinite(latents[0]).all()
    # The coefficients reach the denoiser (deterministic on the CPU: dropped, the two would be equal).
    assert relative_error(latents[1], latents[0]) > 1e-5


def test_guidance_off_and_the_pdfgc_control_net_work(tiny_nets):
    inputs = _tiny_inputs(3)
    guided = _sample(_tiny_sampler(tiny_nets, "pdfgc"), inputs)
    unguided = _sample(_tiny_sampler(tiny_nets, "pdfgc"), inputs, SamplerSettings(steps=2, stage1_steps=2, guidance=1.0))
    assert torch.isfinite(guided).all() and torch.isfinite(unguided).all()
    assert relative_error(unguided, guided) > 1e-3


def test_networks_run_once_per_clip_or_step_with_guidance_batched(tiny_nets):
    """The reference cache is computed once; each denoiser call carries both guidance halves."""
    calls = {"reference": [], "2d": [], "motion": []}
    hooks = [
        tiny_nets[name].register_forward_pre_hook(lambda module, args, key=key: calls[key].append(tuple(args[0].shape)))
        for name, key in (("reference_net", "reference"), ("denoiser_2d", "2d"), ("denoiser_motion", "motion"))
    ]
    try:
        _sample(_tiny_sampler(tiny_nets), _tiny_inputs(14), SamplerSettings(steps=3, stage1_steps=2, guidance=1.5))
    finally:
        for hook in hooks:
            hook.remove()
    h = SIZE // 8
    assert calls["reference"] == [(2, 4, 1, h, h)]
    assert calls["2d"] == [(2, 4, 1, h, h)] * (14 * 2)
    assert calls["motion"] == [(2, 4, 12, h, h)] * (3 * 2)  # 14 frames: windows [0, 12) and [8, 20)


def test_control_is_asked_for_bounded_frame_ranges(tiny_nets):
    requests: list[tuple[int, int]] = []
    settings = SamplerSettings(steps=2, stage1_steps=1, guidance=1.5, overlap=4)
    _sample(_tiny_sampler(tiny_nets), _tiny_inputs(30, requests=requests), settings)
    assert all(0 <= start < stop <= 30 and stop - start <= settings.window for start, stop in requests)
    assert {f for start, stop in requests for f in range(start, stop)} == set(range(30))
    assert max(stop - start for start, stop in requests) == settings.window


class _PerFrameMotion(torch.nn.Module):
    """The 2D denoiser in the motion denoiser's place: no frame sees another, so a frame's
    stage-2 result must not depend on how the windows are laid out."""

    is_motion = True

    def __init__(self, denoiser_2d: HMDenoisingNet):
        super().__init__()
        self.denoiser_2d = denoiser_2d

    def forward(self, *args):
        return self.denoiser_2d(*args)


def _noise_by_frame(generator, shape, device):
    """Noise whose frame f is the same whatever the number of frames drawn."""
    if len(shape) != 5:
        return torch.randn(shape, generator=generator).to(device)
    b, c, frames, h, w = shape
    noise = [torch.randn((b, c, h, w), generator=torch.Generator().manual_seed(f)) for f in range(frames)]
    return torch.stack(noise, dim=2).to(device)


def test_every_overlap_covers_and_averages_every_frame(tiny_nets, monkeypatch):
    monkeypatch.setattr(sampler_module, "draw_noise", _noise_by_frame)
    sampler = _tiny_sampler(tiny_nets, denoiser_motion=_PerFrameMotion(tiny_nets["denoiser_2d"]))
    inputs = _tiny_inputs(17)
    results = {
        overlap: _sample(sampler, inputs, SamplerSettings(steps=2, stage1_steps=1, guidance=1.5, overlap=overlap))
        for overlap in (0, 2, 4, 5, 11)
    }
    for overlap, latents in results.items():
        assert torch.isfinite(latents).all()
        assert relative_error(latents, results[4]) < 1e-5, f"overlap {overlap}"


def test_progress_reports_each_stage_to_its_total(tiny_nets):
    events: list[ProgressEvent] = []
    sampler = _tiny_sampler(tiny_nets)
    latents = _sample(sampler, _tiny_inputs(3), progress=events.append)
    list(sampler.decode(latents, batch=2, progress=events.append))
    by_task: dict[str, list[tuple[int, int | None, str]]] = {}
    for event in events:
        by_task.setdefault(event.task, []).append((event.completed, event.total, event.unit))
    assert by_task["stage 1"] == [(i, 3, "frames") for i in range(4)]
    assert by_task["stage 2"] == [(i, 2, "steps") for i in range(3)]
    assert by_task["decode"] == [(0, 3, "frames"), (2, 3, "frames"), (3, 3, "frames")]


def test_the_schedule_is_the_given_schedulers_and_it_is_left_as_it_was(tiny_nets):
    from diffusers import PNDMScheduler

    inputs = _tiny_inputs(2)
    euler = EulerDiscreteScheduler(**SD15_SCHEDULER)
    first = _sample(_tiny_sampler(tiny_nets, scheduler=euler), inputs)
    assert euler.num_inference_steps is None  # the sampler stepped copies of it
    # The official code's scheduler: Euler from the SD1.5 folder's (PNDM) config.
    from_pndm_config = EulerDiscreteScheduler.from_config(PNDMScheduler(**SD15_SCHEDULER).config)
    assert torch.equal(_sample(_tiny_sampler(tiny_nets, scheduler=from_pndm_config), inputs), first)
    other = EulerDiscreteScheduler(**{**SD15_SCHEDULER, "beta_end": 0.02})
    assert relative_error(_sample(_tiny_sampler(tiny_nets, scheduler=other), inputs), first) > 1e-3


def test_the_control_kind_names_the_control_inputs(tiny_nets):
    inputs = _tiny_inputs(2)
    without_pd_fpg = dataclasses.replace(inputs, control=lambda start, stop: dataclasses.replace(inputs.control(start, stop), pd_fpg=None))
    with pytest.raises(ValueError, match="pdfgc control needs pd_fpg"):
        _sample(_tiny_sampler(tiny_nets, "pdfgc"), without_pd_fpg)
    with pytest.raises(ValueError, match="pdfgc control needs neg_pd_fpg"):
        _sample(_tiny_sampler(tiny_nets, "pdfgc"), dataclasses.replace(inputs, neg_pd_fpg=None))
    _sample(_tiny_sampler(tiny_nets, "blendshapes"), dataclasses.replace(without_pd_fpg, neg_pd_fpg=None))  # needs neither
