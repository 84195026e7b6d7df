"""Ours against the official HelloMeme code: the same full-size random weights, the same inputs and
seed, the sampler of each version run once per side in a fresh process.

    python -m benchmarks.vs_official --official PATH --json benchmarks/official.json    # make bench-official OFFICIAL=PATH

For each version (v1-v5 video, v5 and v5c image): full-size random weights in the released layout are
written once to a temporary folder (`tiny.make_full_size`, float16 on disk); one set of inputs is
drawn (reference image, pose images, PD-FGC embeddings, prompt embeddings); then our sampler (loaded by
`load_pipeline` from that folder) and the official pipeline (`HMVideoPipeline`, `HM3VideoPipeline`,
`HM5VideoPipeline`, `HM5ImagePipeline` from the checkout at PATH) each run in a fresh process with the
same seed. Measured: the sampler's seconds (denoising and decoding every frame, as the official
`__call__` does), the peak memory (CPU: the child's peak RSS, weights included; CUDA:
`torch.cuda.max_memory_allocated` during the sampler), the latents, and every network call (forward
hooks). The latents are compared by relative error against the conformance tests' tolerance.

The official package is imported without running its `__init__` (which loads the face toolkit and
onnxruntime): a stand-in package module points at its folder, `torchvision`'s `BasicBlock` is a local
stand-in (torchvision's structure and computation), and `onnxruntime` an empty module (the sampler path
uses neither). Its weights are found as it finds them: relative `songkey/<repo>` folders, linked to ours.
Nothing of the official checkout is changed or copied.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks import bench
from benchmarks.bench import ROOT, machine, quiet_libraries
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.settings import half_precision_bound
from hellomeme_cli.versions import DPM_SDE, SD15_SCHEDULE, Version, any_version, get_version

# The runs: (version, mode). The official app's defaults are v2 (video) and v5 (image); v5c is image only.
DEFAULT_RUNS = (("v1", "video"), ("v2", "video"), ("v3", "video"), ("v4", "video"), ("v5", "video"), ("v5", "image"), ("v5c", "image"))
# The conformance tests' float32 tolerance on the sampler latents (tests/test_conformance*.py); where
# either side runs in half precision, the documented bound (settings.half_precision_bound).
FLOAT32_TOLERANCE = 2e-5
TEXT_WIDTH = 768  # SD1.5's prompt embeddings
PD_FGC_WIDTH = 548
# What the official `insert_hm_modules` loads beyond what our run of the same control needs: v1 and v2
# load both control nets whatever drives them.
OFFICIAL_EXTRA = {"v1": ("hm_control",), "v2": ("hm2_control",)}
# Official pipeline class per (version family, mode), and the network roles of its attributes.
OFFICIAL_PIPELINES = {
    ("v1", "video"): "pipline_hm_video:HMVideoPipeline", ("v2", "video"): "pipline_hm_video:HMVideoPipeline",
    ("v3", "video"): "pipline_hm3_video:HM3VideoPipeline", ("v4", "video"): "pipline_hm3_video:HM3VideoPipeline",
    ("v5", "video"): "pipline_hm5_video:HM5VideoPipeline", ("v5b", "video"): "pipline_hm5_video:HM5VideoPipeline",
    ("v5", "image"): "pipline_hm5_image:HM5ImagePipeline", ("v5b", "image"): "pipline_hm5_image:HM5ImagePipeline",
    ("v5c", "image"): "pipline_hm5_image:HM5ImagePipeline",
}
ROLES = ("unet_2d", "unet_motion", "reference_net", "control_net", "control_proj", "vae_encode", "vae_decode", "text_encoder", "image_encoder")
OFFICIAL_ROLES = {
    "unet_2d": ("unet_pre",), "unet_motion": ("unet",), "reference_net": ("unet_ref",), "control_net": ("mp_control", "mp_control2"),
    "control_proj": ("mp_control_proj",), "text_encoder": ("text_encoder", "text_encoder_ref"),
}
OUR_ROLES = {
    "unet_2d": ("denoiser_2d",), "unet_motion": ("denoiser_motion",), "reference_net": ("reference_net",), "control_net": ("control_net",),
    "control_proj": ("control_proj",), "text_encoder": ("reference_text_encoder", "text_encoder"), "image_encoder": ("image_encoder",),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one comparison measures. CPU defaults fit a full-size fp32 run of ours in a few GB and a
    few minutes on 2 cores; on CUDA the size defaults to the app's 512 px (`for_device`)."""

    official: Path | None = None
    runs: tuple[tuple[str, str], ...] = DEFAULT_RUNS
    size: int = 128
    frames: int = 13
    steps: int = 2
    guidance: float = 1.5
    device: str = "cpu"
    dtype: str = "float32"
    our_dtype: str | None = None  # ours in another dtype than the official (a CPU user's choice: bfloat16 against its float32)
    control: str = "pdfgc"  # the official app's default control (HMControlNet2 / PD-FGC)
    seed: int = 0
    weights: Path | None = None  # keep the full-size weights here for every version and the next run (else one temporary folder each)
    repeats: int = 1  # runs of each side, alternating which goes first; the fastest counts (single runs on a shared CPU vary by up to 50%)
    profile: bool = False  # also profile one call of each network on both sides (torch.profiler, by operator)

    @classmethod
    def for_device(cls, device: str, **given) -> Settings:
        """The defaults of `device`: 512 px on CUDA (the app's size), the CPU defaults elsewhere."""
        base = {"size": 512, "frames": 24, "steps": 25, "dtype": "float16"} if device.startswith("cuda") else {}
        return cls(device=device, **{**base, **{k: v for k, v in given.items() if v is not None}})


@dataclasses.dataclass(frozen=True)
class Run:
    """One side's run of one version, as handed to a worker process (JSON)."""

    side: str  # "ours" or "official"
    version: str
    mode: str
    home: str  # the weight cache
    inputs: str  # safetensors of `draw_inputs`
    size: int
    frames: int
    steps: int
    guidance: float
    device: str
    dtype: str
    control: str
    seed: int
    official: str | None = None
    options: dict = dataclasses.field(default_factory=dict)  # our speed options (compile, channels_last, low_memory)
    flops: bool = False  # ours: also the FLOPs of each UNet role's first call, replayed after the timed run
    profile: bool = False  # also each role's first call replayed under torch.profiler (`profile_call`)


def parse_run(text: str) -> tuple[str, str]:
    """`v1` (video where the version makes video, else image) or `v5:image` -> (version, mode)."""
    name, _, mode = text.partition(":")
    mode = mode or ("video" if "video" in any_version(name).modes else "image")
    return get_version(name, mode).name, mode


def weight_components(version: Version, modes: Sequence[str], control: str) -> list[str]:
    """The components both sides need for `modes` of `version`, the face model aside (no sampler reads it)."""
    names = [name for mode in modes for name in version.components(control, mode) if name != "face_landmarker"]
    return list(dict.fromkeys([*names, *OFFICIAL_EXTRA.get(version.name, ())]))


def draw_inputs(
    version: Version, mode: str, size: int, frames: int, control: str, seed: int, text_width: int = TEXT_WIDTH
) -> dict[str, torch.Tensor]:
    """One set of sampler inputs for a run: reference image and pose images in [-1, 1], the control's
    per-frame features, the unconditional PD-FGC input (v1, v2), the reference's own control (v5c),
    prompt embeddings; float32, from a generator seeded with `seed` (a seed gives the same inputs)."""
    generator = torch.Generator().manual_seed(seed)
    frames = frames if mode == "video" else 1

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator) * 2 - 1

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    def features(prefix: str, count: int) -> dict[str, torch.Tensor]:
        if control == "pdfgc":
            return {f"{prefix}pd_fpg": normal(1, count, PD_FGC_WIDTH)}
        return {f"{prefix}drive_coeff": torch.rand((1, count, 51), generator=generator), f"{prefix}face_parts": normal(1, count, 3, 1024)}

    inputs = {"ref_image": uniform(1, 3, size, size), "condition": uniform(1, 3, frames, size, size), **features("", frames)}
    inputs["text_embeds"], inputs["negative_text_embeds"] = normal(1, 77, text_width), normal(1, 77, text_width)
    if control == "pdfgc" and version.control(control).unconditional:
        inputs["neg_pd_fpg"] = normal(1, 1, PD_FGC_WIDTH)
    if version.reference_control:
        inputs.update({"ref_condition": uniform(1, 3, 1, size, size), **features("ref_", 1)})
    return inputs


# ------------------------------------------------------------------------------------------
# Counting network calls (forward hooks), the same way on both sides
# ------------------------------------------------------------------------------------------


class CallCounter:
    """Calls, frames (batch x frame axis of the first tensor argument: CFG halves count), seconds
    (wall clock, CUDA synchronised) and the process's minor page faults in each role's networks:
    where a side's time goes (on the CPU, fresh memory is a large part of a call's time)."""

    def __init__(self, device: torch.device = torch.device("cpu"), keep_first: Sequence[str] = ()):
        self.calls = dict.fromkeys(ROLES, 0)
        self.frames = dict.fromkeys(ROLES, 0)
        self.seconds = dict.fromkeys(ROLES, 0.0)
        self.faults = dict.fromkeys(ROLES, 0)
        self._device = device
        self._hooked: set[int] = set()
        self._keep_first = set(keep_first)
        self.first_calls: dict[str, tuple[torch.nn.Module, tuple, dict, int]] = {}  # role -> (module, args, kwargs, frames)

    def _now(self) -> float:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def watch(self, role: str, module: torch.nn.Module | None, motion_role: str | None = None) -> None:
        """Count `module`'s calls under `role` (once per module); with `motion_role`, the calls given
        `use_motion=True` count there instead (v5's one UNet serves both)."""
        if module is None or id(module) in self._hooked:
            return
        self._hooked.add(id(module))
        started: list[tuple[float, int]] = []

        def start(_module, _args, _kwargs) -> None:
            started.append((self._now(), _minor_faults()))

        def hook(_module, args, kwargs, _output) -> None:
            counted = motion_role if motion_role and kwargs.get("use_motion") else role
            began, faults = started.pop()
            self.seconds[counted] += self._now() - began
            self.faults[counted] += _minor_faults() - faults
            first = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
            self.calls[counted] += 1
            frames = first.shape[0] * (first.shape[2] if first.ndim == 5 else 1) if first is not None else 0
            self.frames[counted] += frames
            if counted in self._keep_first and counted not in self.first_calls:
                self.first_calls[counted] = (_module, args, kwargs, frames)

        module.register_forward_pre_hook(start, with_kwargs=True)
        module.register_forward_hook(hook, with_kwargs=True)

    def profiles(self) -> dict[str, dict]:
        """Each kept role's first call replayed under the profiler (`profile_call`)."""
        return {role: profile_call(module, args, kwargs, self._device) for role, (module, args, kwargs, _) in self.first_calls.items()}

    def flops_per_frame(self, roles: Sequence[str] = ("unet_2d", "unet_motion")) -> dict[str, float]:
        """FLOPs per frame through each kept role, from its first call run again under the FLOP counter
        (`bench.count_flops`): with the frames through the role and its seconds, the achieved rate."""
        kept = {role: call for role, call in self.first_calls.items() if role in roles}
        return {role: bench.count_flops(module, *args, **kwargs) / frames for role, (module, args, kwargs, frames) in kept.items() if frames}

    def per_frame(self, output_frames: int) -> dict[str, dict[str, float]]:
        """Per output frame, each role that ran: calls, frames through it, seconds and minor page faults in it."""
        return {
            role: {
                "calls": self.calls[role] / output_frames, "frames": self.frames[role] / output_frames,
                "seconds": self.seconds[role] / output_frames, "faults": self.faults[role] / output_frames,
            }
            for role in ROLES if self.calls[role]
        }


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# Operators that only move or reshape data: what a side adds around the same kernels shows here.
COPY_OPERATORS = (
    "aten::copy_", "aten::contiguous", "aten::clone", "aten::cat", "aten::_to_copy", "aten::repeat_interleave", "aten::repeat",
    "aten::index_select", "aten::stack", "aten::expand_as",
)


def profile_call(module: torch.nn.Module, args: tuple, kwargs: dict, device: torch.device) -> dict:
    """`module(*args, **kwargs)` once more untimed (kernels set up, weights touched), once timed, and
    once under torch.profiler: its seconds and, per operator, [calls, self CPU seconds, self device
    seconds], with the input shapes of each operator's costliest call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.type == "cuda" else [])]
    with torch.no_grad():
        module(*args, **kwargs)
        _, seconds = _timed(device, lambda: module(*args, **kwargs))
        with profile(activities=activities, record_shapes=True) as profiled:
            module(*args, **kwargs)
    operators: dict[str, list] = {}
    for event in profiled.key_averages(group_by_input_shape=True):
        entry = operators.setdefault(event.key, [0, 0.0, 0.0, ""])
        cost = event.self_cpu_time_total / 1e6
        if cost > entry[1] / max(entry[0], 1) * event.count:  # the shapes of the costliest group
            entry[3] = str(event.input_shapes)[:200]
        entry[0] += event.count
        entry[1] += cost
        entry[2] += getattr(event, "self_device_time_total", 0.0) / 1e6
    return {"seconds": seconds, "operators": operators}


def _vae_roles(counter: CallCounter, encoder_vae, decoder_vae) -> None:
    """VAE encoding and decoding are methods, not forward: their Encoder and Decoder modules are watched."""
    counter.watch("vae_encode", encoder_vae.encoder)
    counter.watch("vae_decode", decoder_vae.decoder)


# ------------------------------------------------------------------------------------------
# The two sides (each in its own worker process)
# ------------------------------------------------------------------------------------------


def _peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or this process's peak RSS, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return bench.peak_rss_mb() * 2**20 / 1e9


def _current_rss_gb() -> float:
    """This process's resident memory now: what the loaded networks hold, before the sampler runs."""
    return bench.current_rss_mb() * 2**20 / 1e9


def _timed(device: torch.device, call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - started


def run_ours(run: Run) -> tuple[torch.Tensor, dict]:
    """Our sampler on the run's weights and inputs: `load_pipeline` through the weight cache, then
    `sample` (or `sample_image`) and the decoding of every frame -> latents, measurements."""
    from hellomeme_cli.engine import load_pipeline
    from hellomeme_cli.samplers.common import DrivingFrames, SamplerInputs, SamplerSettings
    from hellomeme_cli.settings import ModelOptions
    from hellomeme_cli.weights.cache import WeightCache

    version = get_version(run.version, run.mode)
    options = ModelOptions(version=run.version, control=run.control, device=run.device, dtype=run.dtype, **run.options)
    pipe = load_pipeline(run.version, options, WeightCache(Path(run.home)), mode=run.mode)
    device = pipe.device
    counter = CallCounter(device, keep_first=ROLES if run.profile else ("unet_2d", "unet_motion") if run.flops else ())
    motion_role = "unet_motion" if pipe.denoiser_2d is pipe.denoiser_motion else None
    for role, names in OUR_ROLES.items():
        for name in names:
            counter.watch(role, getattr(pipe, name), motion_role if role == "unet_2d" else None)
    _vae_roles(counter, pipe.vae_encoder, pipe.vae_decoder)
    tensors = load_file(run.inputs)
    num_frames = tensors["condition"].shape[2]

    def control(start: int, stop: int) -> DrivingFrames:
        fields = ("drive_coeff", "face_parts", "pd_fpg")
        return DrivingFrames(tensors["condition"][:, :, start:stop], **{f: tensors[f][:, start:stop] if f in tensors else None for f in fields})

    reference_control = None
    if version.reference_control:
        reference_control = DrivingFrames(tensors["ref_condition"], tensors.get("ref_drive_coeff"), tensors.get("ref_face_parts"), tensors.get("ref_pd_fpg"))
    inputs = SamplerInputs(
        ref_image=tensors["ref_image"], text_embeds=tensors["text_embeds"], negative_text_embeds=tensors["negative_text_embeds"],
        control=control, num_frames=num_frames, neg_pd_fpg=tensors.get("neg_pd_fpg"), reference_control=reference_control,
    )
    defaults = version.defaults
    settings = SamplerSettings(run.steps, run.guidance, defaults.window, defaults.overlap, defaults.stage1_steps)
    sampler = pipe.sampler()
    generator = torch.Generator().manual_seed(run.seed)

    def sample() -> torch.Tensor:
        latents = (sampler.sample if run.mode == "video" else sampler.sample_image)(inputs, settings, generator)
        for _frames in sampler.decode_tensors(latents):  # the official __call__ decodes every frame too
            pass
        return latents

    loaded = _current_rss_gb()
    latents, seconds = _timed(device, sample)
    measured = {"seconds": seconds, "peak_memory_gb": _peak_memory_gb(device), "rss_loaded_gb": loaded, "calls_per_frame": counter.per_frame(num_frames)}
    if run.flops:
        with torch.no_grad():
            measured["flops_per_frame"] = counter.flops_per_frame()
    if run.profile:
        measured["profile"] = counter.profiles()
    return latents.float().cpu(), measured


class _NoSafetyChecker(torch.nn.Module):
    """Holds nothing; answers what a diffusers pipeline asks of its components."""

    dtype = torch.float32
    device = torch.device("cpu")


class _BasicBlock(torch.nn.Module):
    """Stand-in for torchvision.models.resnet.BasicBlock (torchvision is not installed here): the
    standard ResNet basic block, conv3x3-BN-ReLU-conv3x3-BN plus the identity (or `downsample`), ReLU."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or torch.nn.BatchNorm2d
        self.conv1 = torch.nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, groups=groups, bias=False, dilation=dilation)
        self.bn1 = norm_layer(planes)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(planes, planes, 3, 1, padding=dilation, groups=groups, bias=False, dilation=dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def import_official(checkout: Path):
    """The official `hellomeme.pipelines` package from `checkout`, without its top-level `__init__`
    (face toolkit, onnxruntime): stand-in modules for the package, torchvision's BasicBlock and onnxruntime."""
    package = checkout / "hellomeme"
    if not (package / "pipelines").is_dir():
        raise HellomemeError(f"{checkout}: not an official HelloMeme checkout (no hellomeme/pipelines)")
    torchvision = types.ModuleType("torchvision")
    models, resnet = types.ModuleType("torchvision.models"), types.ModuleType("torchvision.models.resnet")
    resnet.BasicBlock = _BasicBlock
    torchvision.models, models.resnet = models, resnet
    hellomeme = types.ModuleType("hellomeme")
    hellomeme.__path__ = [str(package)]
    stubs = {"torchvision": torchvision, "torchvision.models": models, "torchvision.models.resnet": resnet, "hellomeme": hellomeme}
    stubs["onnxruntime"] = types.ModuleType("onnxruntime")
    stubs["onnxruntime"].InferenceSession = object  # named in an annotation of the face toolkit
    for name, module in stubs.items():
        sys.modules.setdefault(name, module)
    import importlib

    try:
        return importlib.import_module("hellomeme.pipelines")
    except (ImportError, AttributeError) as error:
        raise HellomemeError(f"{checkout}: the official pipelines do not import here ({type(error).__name__}: {error})") from None


def _official_scheduler(version: str):
    """The pipeline's `scheduler` component: it decides whether the seeded generator reaches the steps
    (conformance READMEs, official bug "scheduler component"); the conformance cases used these."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    return DPMSolverMultistepScheduler(**DPM_SDE) if version.startswith("v5") else EulerDiscreteScheduler(**SD15_SCHEDULE)


def run_official(run: Run) -> tuple[torch.Tensor, dict]:
    """The official pipeline built as its `Generator.load_pipeline` builds it (from_pretrained of the
    SD1.5 folder, `caryomitosis`, `insert_hm_modules`; `append_pipline_weights` left out: with the SD1.5
    base it reloads the same weights), then one `__call__` with our inputs -> latents, measurements."""
    import importlib

    pipelines = import_official(Path(run.official))
    module_name, _, class_name = OFFICIAL_PIPELINES[run.version, run.mode].partition(":")
    cls = getattr(importlib.import_module(f"hellomeme.pipelines.{module_name}"), class_name)
    del pipelines
    device = torch.device(run.device)
    dtype = _dtype(run.dtype, device)
    # creat_model_from_cloud takes a relative "songkey/<repo>" folder when there is one: ours, linked.
    home = Path(run.home)
    links = Path(tempfile.mkdtemp(prefix="official-weights-"))
    (links / "songkey").mkdir()
    for component in home.iterdir():
        if component.is_dir():
            (links / "songkey" / component.name).symlink_to(component.resolve())
    os.chdir(links)
    pipe = cls.from_pretrained(
        str(home / "sd15"), scheduler=_official_scheduler(run.version), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.to(dtype=dtype)
    # v1/v2 caryomitosis calls `self.safety_checker.cpu()` (and then deletes it): a module that holds nothing stands in.
    object.__setattr__(pipe, "safety_checker", _NoSafetyChecker())
    pipe.caryomitosis(version=run.version)
    pipe.insert_hm_modules(version=run.version, dtype=dtype)
    counter = CallCounter(device, keep_first=ROLES if run.profile else ())
    for role, names in official_roles(run.version, run.mode).items():
        for name in names:
            counter.watch(role, getattr(pipe, name, None), "unet_motion" if role == "unet_2d" else None)
    _vae_roles(counter, pipe.vae, pipe.vae_decode)

    tensors = {name: tensor.to(dtype) for name, tensor in load_file(run.inputs).items()}
    num_frames = tensors["condition"].shape[2]
    drive = {name: tensors[name] for name in ("condition", "drive_coeff", "face_parts", "pd_fpg", "neg_pd_fpg") if name in tensors}
    call = dict(
        prompt=None, image=tensors["ref_image"], drive_params=drive, num_inference_steps=run.steps, guidance_scale=run.guidance,
        prompt_embeds=tensors["text_embeds"], negative_prompt_embeds=tensors["negative_text_embeds"], output_type="pt",
        device=str(device), strength=1.0,
    )
    if run.version == "v5c":
        call["ref_params"] = {name[4:]: tensors[name] for name in tensors if name.startswith("ref_") and name != "ref_image"}

    def sample() -> torch.Tensor:
        return pipe(generator=torch.Generator().manual_seed(run.seed), **call)[1]

    loaded = _current_rss_gb()
    latents, seconds = _timed(device, sample)
    latents = latents.float().cpu()
    latents = latents.unsqueeze(2) if latents.ndim == 4 else latents[:, :, :num_frames]
    measured = {"seconds": seconds, "peak_memory_gb": _peak_memory_gb(device), "rss_loaded_gb": loaded, "calls_per_frame": counter.per_frame(num_frames)}
    if run.profile:
        measured["profile"] = counter.profiles()
    return latents, measured


def official_roles(version: str, mode: str) -> dict[str, tuple[str, ...]]:
    """The official pipeline's attributes per role: v5's one UNet (`unet`) is the 2D UNet, its calls with
    `use_motion=True` the motion UNet's; the image pipelines' `unet` is the 2D UNet."""
    if version.startswith("v5") or mode == "image":
        return {**{role: names for role, names in OFFICIAL_ROLES.items() if role != "unet_motion"}, "unet_2d": ("unet",)}
    return dict(OFFICIAL_ROLES)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    from hellomeme_cli.model_options import resolve_dtype

    return resolve_dtype(name, device)


def worker(run: Run, out: Path) -> None:
    """One side's run in this (fresh) process: latents to out/latents.safetensors, numbers to out/result.json.
    On Linux it offers itself first to the out-of-memory killer, so a run too big for a shared machine
    ends itself, not someone else's work."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    torch.manual_seed(run.seed)  # what global draws there are (none on the official path with these schedulers)
    latents, measured = (run_ours if run.side == "ours" else run_official)(run)
    save_file({"latents": latents.contiguous()}, str(out / "latents.safetensors"))
    (out / "result.json").write_text(json.dumps(measured))


def run_side(run: Run) -> tuple[torch.Tensor, dict]:
    """`worker` in a fresh interpreter (its peak RSS is this run's alone), the checkout first on the path."""
    with tempfile.TemporaryDirectory(prefix=f"vs-official-{run.side}-") as folder:
        bench.run_worker("benchmarks.vs_official", [json.dumps(dataclasses.asdict(run)), folder], f"{run.side} {run.version} {run.mode} failed", cwd=ROOT)
        return load_file(str(Path(folder) / "latents.safetensors"))["latents"], json.loads((Path(folder) / "result.json").read_text())


def fastest(runs: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, dict]:
    """One side's repeats as one: the fastest run's numbers, every run's seconds beside them (`seconds_runs`)
    and the latents of the first (a seed gives the same latents every run)."""
    _, numbers = min(runs, key=lambda run: run[1]["seconds"])
    profiled = next((run[1]["profile"] for run in runs if "profile" in run[1]), None)
    return runs[0][0], {**numbers, "seconds_runs": [run[1]["seconds"] for run in runs], **({"profile": profiled} if profiled else {})}


def relative_error(ours: torch.Tensor, official: torch.Tensor) -> float:
    official = official.double()
    return ((ours.double() - official).norm() / official.norm()).item()


def tolerance(dtypes: Sequence[str], mode: str, device: str, guidance: float) -> float:
    """How far the latents may be apart with the sides in `dtypes`: float32's where both compute in it
    (`auto` is float32 on a CPU), else the documented half-precision bound at `guidance`."""
    half = any(dtype in ("float16", "bfloat16") or (dtype == "auto" and device.startswith("cuda")) for dtype in dtypes)
    return half_precision_bound(mode, guidance) if half else FLOAT32_TOLERANCE


def compare(ours: tuple[torch.Tensor, dict], official: tuple[torch.Tensor, dict], mode: str, settings: Settings) -> dict:
    """One version's row: both sides' numbers, the ratios, the latents' relative error and whether it is within tolerance."""
    (our_latents, our_numbers), (official_latents, official_numbers) = ours, official
    allowed = tolerance((settings.dtype, settings.our_dtype or settings.dtype), mode, settings.device, settings.guidance)
    same_shape = our_latents.shape == official_latents.shape
    error = relative_error(our_latents, official_latents) if same_shape else float("inf")
    return {
        "ours": our_numbers,
        "official": official_numbers,
        "speedup": official_numbers["seconds"] / our_numbers["seconds"],
        "memory_ratio": our_numbers["peak_memory_gb"] / official_numbers["peak_memory_gb"],
        "latents_shape": list(our_latents.shape),
        "official_latents_shape": list(official_latents.shape),
        "latent_relative_error": error,
        "tolerance": allowed,
        "within_tolerance": error < allowed,
    }


def run_comparison(settings: Settings, progress: Callable[[str], None] = lambda line: None) -> dict:
    """Every run of `settings`, one process at a time: weights written once per version, inputs drawn,
    ours then the official -> a JSON-ready dict (machine, settings, one result per run)."""
    if settings.official is None:
        raise HellomemeError("give the official checkout with --official PATH")
    import_official(settings.official)  # fails here, with one line, rather than in every worker
    result = {"machine": machine(), "settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}, "runs": []}
    by_version: dict[str, list[str]] = {}
    for name, mode in settings.runs:
        by_version.setdefault(name, []).append(mode)
    for name, modes in by_version.items():
        version = get_version(name, modes[0])
        with tempfile.TemporaryDirectory(prefix=f"hellomeme-full-{name}-") as folder:
            progress(f"{name}: full-size random weights")
            home = settings.weights or Path(folder) / "weights"
            written = bench.full_size_weights(home, weight_components(version, modes, settings.control))
            for mode in modes:
                inputs = Path(folder) / f"inputs-{mode}.safetensors"
                save_file(draw_inputs(version, mode, settings.size, settings.frames, settings.control, settings.seed), str(inputs))
                runs: dict[str, list] = {"ours": [], "official": []}
                for repeat in range(settings.repeats):
                    # Alternate which side goes first: a neighbour's load or a warm page cache favours neither.
                    for side in ("ours", "official") if repeat % 2 == 0 else ("official", "ours"):
                        progress(f"{name} {mode}: {side}" + (f" ({repeat + 1}/{settings.repeats})" if settings.repeats > 1 else ""))
                        dtype = settings.our_dtype or settings.dtype if side == "ours" else settings.dtype
                        runs[side].append(run_side(Run(
                            side, name, mode, str(home), str(inputs), settings.size, settings.frames, settings.steps,
                            settings.guidance, settings.device, dtype, settings.control, settings.seed,
                            str(settings.official.resolve()), profile=settings.profile and repeat == 0,
                        )))
                row = compare(fastest(runs["ours"]), fastest(runs["official"]), mode, settings)
                row.update(version=name, mode=mode, frames=settings.frames if mode == "video" else 1, weights_seconds=written)
                result["runs"].append(row)
    return result


def _face_model_placeholder(home: Path) -> None:
    """`load_pipeline` asks for the face model (tracking); no sampler reads it, so a placeholder file does."""
    from hellomeme_cli.face.tracking import MODEL_FILE
    from hellomeme_cli.weights.cache import WeightCache

    cache = WeightCache(home)
    cache.path("face_landmarker").mkdir(parents=True, exist_ok=True)
    (cache.path("face_landmarker") / MODEL_FILE).write_bytes(b"not a model: the sampler reads none")
    cache.mark_tiny("face_landmarker")


# ------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    """The comparison as a Markdown table, then the network calls per output frame of each side."""
    settings = result["settings"]
    unit = "GB GPU" if str(settings["device"]).startswith("cuda") else "GB RSS"
    lines = [
        f"{result['machine']['cpu']} ({result['machine']['cpu_cores']} cores), GPU {result['machine']['gpu']}, torch {result['machine']['torch']}; "
        f"{settings['size']} px, {settings['steps']} steps, guidance {settings['guidance']}, "
        + (f"ours {settings['our_dtype']} against the official {settings['dtype']}" if settings.get("our_dtype") else settings["dtype"])
        + f", control {settings['control']}"
        + (f"; seconds: the fastest of {settings['repeats']} runs per side" if settings.get("repeats", 1) > 1 else ""),
        "",
        f"| version | size | frames | steps | official s | ours s | speed-up | official peak {unit} | ours peak {unit} | memory ratio | latent rel. error | within tolerance |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["runs"]:
        lines.append(
            f"| {row['version']} {row['mode']} | {settings['size']} | {row['frames']} | {settings['steps']} | {row['official']['seconds']:.1f} | "
            f"{row['ours']['seconds']:.1f} | {row['speedup']:.2f}x | {row['official']['peak_memory_gb']:.2f} | {row['ours']['peak_memory_gb']:.2f} | "
            f"{row['memory_ratio']:.2f} | {row['latent_relative_error']:.1e} | {'yes' if row['within_tolerance'] else 'no'} (< {row['tolerance']:g}) |"
        )
    lines += _role_table(result["runs"], "Network calls per output frame (ours / official):", "calls", _calls_cell)
    lines += _role_table(result["runs"], "Seconds per output frame in each network (ours / official, their ratio):", "seconds", _seconds_cell)
    lines += _role_table(
        result["runs"], "Thousands of minor page faults per output frame in each network (ours / official): memory touched for the first time",
        "faults", _faults_cell,
    )
    for row in result["runs"]:
        if "profile" in row["ours"] and "profile" in row["official"]:
            lines += ["", *profile_lines(row)]
    return "\n".join(lines)


def _role_table(runs: list[dict], title: str, measure: str, cell: Callable[[float | None, float | None], str]) -> list[str]:
    """One row per run, one column per role: `cell(ours, official)` of `measure` per output frame (None where a side has no number)."""
    lines = ["", title, "", "| version | " + " | ".join(ROLES) + " |", "|---|" + "---|" * len(ROLES)]
    for row in runs:
        cells = [cell(*(row[side]["calls_per_frame"].get(role, {}).get(measure) for side in ("ours", "official"))) for role in ROLES]
        lines.append(f"| {row['version']} {row['mode']} | " + " | ".join(cells) + " |")
    return lines


def _calls_cell(ours: float | None, official: float | None) -> str:
    ours, official = ours or 0.0, official or 0.0
    return f"{ours:.2f} / {official:.2f}" if ours or official else "-"


def _seconds_cell(ours: float | None, official: float | None) -> str:
    ours, official = ours or 0.0, official or 0.0
    return f"{ours:.2f} / {official:.2f} ({ours / official:.2f}x)" if ours and official else f"{ours:.2f} / {official:.2f}" if ours or official else "-"


def _faults_cell(ours: float | None, official: float | None) -> str:
    return f"{ours / 1e3:.0f} / {official / 1e3:.0f}" if ours is not None and official is not None and (ours or official) else "-"


def profile_lines(row: dict, shown: int = 6) -> list[str]:
    """One call of each network, profiled on both sides: its seconds, the time in operators that only
    move data (`COPY_OPERATORS`), and the operators where ours spends the most more than the official."""
    ours, official = row["ours"]["profile"], row["official"]["profile"]
    lines = [
        f"One call of each network, profiled ({row['version']} {row['mode']}): ours / official",
        "",
        "| network | seconds per call | copies: calls, ms | where ours spends more (calls, ms ours / official) |",
        "|---|---|---|---|",
    ]
    for role in ROLES:
        if role not in ours or role not in official:
            continue
        mine, theirs = ours[role]["operators"], official[role]["operators"]

        def copies(operators: dict) -> tuple[int, float]:
            return sum(operators.get(name, [0])[0] for name in COPY_OPERATORS), sum(operators.get(name, [0, 0.0])[1] for name in COPY_OPERATORS)

        (my_copies, my_time), (their_copies, their_time) = copies(mine), copies(theirs)
        more = sorted(mine, key=lambda name: mine[name][1] - theirs.get(name, [0, 0.0])[1], reverse=True)[:shown]
        extra = "; ".join(
            f"{name.removeprefix('aten::')} {mine[name][0]}, {mine[name][1] * 1e3:.1f} / {theirs.get(name, [0])[0]}, {theirs.get(name, [0, 0.0])[1] * 1e3:.1f}"
            for name in more if mine[name][1] > theirs.get(name, [0, 0.0])[1]
        )
        lines.append(
            f"| {role} | {ours[role]['seconds']:.3f} / {official[role]['seconds']:.3f} ({ours[role]['seconds'] / official[role]['seconds']:.2f}x) | "
            f"{my_copies}, {my_time * 1e3:.1f} / {their_copies}, {their_time * 1e3:.1f} | {extra or '-'} |"
        )
    return lines


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.vs_official",
        description="Our samplers against the official HelloMeme pipelines: same full-size random weights, inputs and seed; "
        "seconds, peak memory, latents and network calls per frame.",
    )
    parser.add_argument("--official", type=Path, help="a checkout of github.com/HelloVision/HelloMeme (the folder holding hellomeme/)")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument("--versions", nargs="+", type=parse_run, help="runs: v1 v2 v3 v4 v5 (video), v5:image v5c (default: all seven)")
    parser.add_argument("--size", type=int, help="working size in px (default: 128 on the CPU, 512 on CUDA)")
    parser.add_argument("--frames", type=int, help="clip length of the video runs (default: 13 on the CPU, 24 on CUDA)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 2 on the CPU, 25 on CUDA)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: 1.5, the app's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--dtype", help="float32, bfloat16, float16 or auto (default: float32 on the CPU, float16 on CUDA)")
    parser.add_argument("--our-dtype", help="run our side in this dtype, the official in --dtype (e.g. bfloat16 against float32 on a CPU that computes bfloat16 natively)")
    parser.add_argument("--control", choices=("pdfgc", "blendshapes"), help="the expression control (default: pdfgc, the app's)")
    parser.add_argument("--seed", type=int, help="seed of the inputs and the sampler (default: 0)")
    parser.add_argument("--weights", type=Path, help="keep the full-size random weights in this folder, for every version and the next run")
    parser.add_argument("--repeats", type=int, help="runs of each side, alternating which goes first; the fastest counts (default: 1)")
    parser.add_argument("--profile", action="store_true", help="also profile one call of each network on both sides (torch.profiler, by operator) and print where ours spends more")
    parser.add_argument("--worker", nargs=2, metavar=("RUN_JSON", "OUT_DIR"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The comparison, its tables on stdout and, with --json, the file; a bad input or a failed run is one line."""
    arguments = parse_arguments(argv)
    quiet_libraries()
    if arguments.worker:
        run_json, out = arguments.worker
        worker(Run(**json.loads(run_json)), Path(out))
        return 0
    given = dict(
        official=arguments.official, size=arguments.size, frames=arguments.frames, steps=arguments.steps, guidance=arguments.guidance,
        dtype=arguments.dtype, our_dtype=arguments.our_dtype, control=arguments.control, seed=arguments.seed, weights=arguments.weights, repeats=arguments.repeats,
        profile=arguments.profile or None,
        runs=tuple(arguments.versions) if arguments.versions else None,
    )
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    return bench.run_and_report(lambda: run_comparison(Settings.for_device(arguments.device, **given), progress), format_table, arguments.json)


if __name__ == "__main__":
    sys.exit(main())
