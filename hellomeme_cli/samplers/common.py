"""What every sampler shares: its settings and inputs, the window plan, a fresh schedule per stage,
the VAE's part (`LatentCodec`), noise drawn from the run's CPU generator, classifier-free guidance,
and `Sampler`, the base of the three families: their networks, `from_pipeline`, `sample`'s step 1
(the clip's preparation), the image sampler whole, and the denoising loops they are built of
(frames on their own, or overlapping windows averaged), with their progress events.

Samplers reach a loaded pipeline's networks through `LoadedNetworks`, a description of the
attributes they read, so this room never imports the engine that builds them.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import ClassVar, Protocol

import diffusers
import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.models.unet import ControlFeatures, ReferenceCache
from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress
from hellomeme_cli.versions import SCHEDULERS, ControlKind, SchedulerChoice, Version


class LoadedNetworks(Protocol):
    """The attributes of a loaded pipeline (engine.HelloMemePipeline) that `from_pipeline` reads."""

    reference_net: torch.nn.Module
    denoiser_2d: torch.nn.Module | None
    denoiser_motion: torch.nn.Module | None
    control_net: torch.nn.Module
    control_proj: torch.nn.Module | None
    vae_encoder: torch.nn.Module
    vae_decoder: torch.nn.Module
    scheduler: SchedulerMixin
    image_scheduler: SchedulerMixin | None
    control_kind: ControlKind
    version: Version
    device: torch.device
    low_memory: bool


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """steps: stage-2 Euler steps; stage-1 runs min(stage1_steps, steps). guidance <= 1
    turns classifier-free guidance off. Windows of `window` frames overlap by `overlap`."""

    steps: int = 25
    guidance: float = 1.5
    window: int = 12
    overlap: int = 4
    stage1_steps: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "window", "stage1_steps"):
            if getattr(self, name) < 1:
                raise HellomemeError(f"sampler setting {name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.overlap < self.window:
            raise HellomemeError(f"sampler overlap must be between 0 and window - 1 = {self.window - 1}, got {self.overlap}")

    @property
    def uses_guidance(self) -> bool:
        return self.guidance > 1.0


@dataclasses.dataclass(frozen=True)
class DrivingFrames:
    """Control-net inputs for n consecutive frames: condition (1, 3, n, H, W) in [-1, 1], then
    the fields the control kind's `inputs` name: drive_coeff (1, n, k) and face_parts
    (1, n, 3, 1024) for the blendshapes nets (k = 51 ARKit coefficients; v1's and v2's nets
    take any k), pd_fpg (1, n, 548) for pdfgc."""

    condition: torch.Tensor
    drive_coeff: torch.Tensor | None = None
    face_parts: torch.Tensor | None = None
    pd_fpg: torch.Tensor | None = None


# Gives the control inputs of frames [start, stop); asked for at most one window at a time.
ControlSource = Callable[[int, int], DrivingFrames]


@dataclasses.dataclass(frozen=True)
class SamplerInputs:
    """ref_image (1, 3, H, W) in [-1, 1]; prompt embeddings (1, 77, C) for the denoisers
    and, where they differ (a LoRA in the denoisers' text encoder), for the reference net
    (default: the denoisers'); neg_pd_fpg (1, 1, 548) is the pdfgc control's unconditional
    input (needed with guidance; the control kind's `unconditional` names it)."""

    ref_image: torch.Tensor
    text_embeds: torch.Tensor
    negative_text_embeds: torch.Tensor
    control: ControlSource
    num_frames: int
    neg_pd_fpg: torch.Tensor | None = None
    reference_text_embeds: torch.Tensor | None = None
    reference_negative_text_embeds: torch.Tensor | None = None
    # v5c: the reference image's own control inputs (one frame), given to its reference net.
    reference_control: DrivingFrames | None = None


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """Stage-2 windows [start, stop) over the clip padded at its end.

    The official padding: `noise_frames = overlap + k * stride` (stride = window - overlap),
    the smallest such length above the clip's, so at least one padding frame. Every window is `window` frames
    long; windows holding no real frame (only possible at overlap 0) are dropped, since
    they cannot change a real frame. The stage-2 base noise is still drawn for
    `noise_frames` frames, which keeps the random stream the official one.
    """

    num_frames: int
    noise_frames: int
    windows: tuple[tuple[int, int], ...]

    @property
    def length(self) -> int:
        """Frames the latents have during stage 2 (real + padding)."""
        return self.windows[-1][1]

    def coverage(self) -> torch.Tensor:
        """How many windows hold each frame, (length,)."""
        return window_coverage(self.windows, self.length)


def window_coverage(windows: Iterable[tuple[int, int]], length: int) -> torch.Tensor:
    """How many of the windows [start, stop) hold each of `length` frames, (length,)."""
    counts = torch.zeros(length)
    for start, stop in windows:
        counts[start:stop] += 1
    return counts


def plan_windows(num_frames: int, window: int, overlap: int) -> WindowPlan:
    """The official window layout, extended to every overlap in [0, window) and every clip length."""
    if num_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_frames}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, {window}), got {overlap}")
    stride = window - overlap
    count = max(1, (num_frames - overlap) // stride + 1)
    starts = [i * stride for i in range(count) if i * stride < num_frames]
    return WindowPlan(num_frames, overlap + count * stride, tuple((s, s + window) for s in starts))


def named_scheduler(name: str, schedule: SchedulerMixin) -> SchedulerMixin:
    """`--scheduler NAME` (a short name of `SCHEDULERS` or a diffusers class name) on `schedule`'s
    config, the diffusers way (`from_config`): the version's betas and training steps are kept."""
    choice = SCHEDULERS.get(name) or SchedulerChoice(name)
    cls = getattr(diffusers, choice.cls, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise HellomemeError(f"unknown --scheduler {name!r}: diffusers {diffusers.__version__} has no scheduler class {choice.cls}")
    return cls.from_config(schedule.config, **choice.overrides)


def fresh_schedule(scheduler: SchedulerMixin, steps: int, device: torch.device) -> SchedulerMixin:
    """A new scheduler of the same class and config, its timesteps set: diffusers' schedulers
    count their steps internally, and every stage (every stage-1 frame) starts from step 0."""
    schedule = type(scheduler).from_config(scheduler.config)
    schedule.set_timesteps(steps, device=device)
    return schedule


class LatentCodec:
    """The VAE's part, shared by every sampler: the reference image into its latent (checked,
    drawn from the run's generator), and latents into frames batch by batch, as an iterator, so
    frames stream to the writer and memory stays flat in clip length. Needs `vae_encoder`,
    `vae_decoder` and `device`."""

    def _encode_reference(self, inputs: SamplerInputs, generator: torch.Generator) -> torch.Tensor:
        """(1, 4, 1, h, w) scaled reference latent, sampled from the VAE's latent distribution."""
        if generator.device.type != "cpu":
            raise ValueError("the sampler draws its noise from a CPU generator (same video on every device)")
        if inputs.num_frames < 1:
            raise HellomemeError("the driving clip has no frames")
        if inputs.ref_image.ndim != 4 or inputs.ref_image.shape[:2] != (1, 3):
            raise ValueError(f"ref_image must be (1, 3, H, W), got {tuple(inputs.ref_image.shape)}")
        vae = self.vae_encoder
        distribution = vae.encode(inputs.ref_image.to(self.device, vae.dtype)).latent_dist
        noise = draw_noise(generator, distribution.mean.shape, self.device).to(distribution.mean.dtype)
        latent = distribution.mean + distribution.std * noise
        return (vae.config.scaling_factor * latent.float()).unsqueeze(2)

    @torch.no_grad()
    def decode_tensors(
        self, latents: torch.Tensor, batch: int = 8, progress: ProgressCallback = no_progress
    ) -> Iterator[torch.Tensor]:
        """latents from `sample` -> (n, 3, H, W) float32 frames in [0, 1] on the device, n <= batch."""
        num_frames = latents.shape[2]
        progress(ProgressEvent("decode", 0, num_frames, "frames"))
        for start in range(0, num_frames, batch):
            stop = min(start + batch, num_frames)
            z = latents[0, :, start:stop].transpose(0, 1).to(self.device, self.vae_decoder.dtype)
            images = (self.vae_decoder.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)
            # Reported before the batch is handed on, so the consumer's time is not counted as decoding.
            progress(ProgressEvent("decode", stop, num_frames, "frames"))
            yield images

    def decode(
        self, latents: torch.Tensor, batch: int = 8, progress: ProgressCallback = no_progress
    ) -> Iterator[np.ndarray]:
        """latents from `sample` -> RGB uint8 frames (n, H, W, 3), batch by batch, ready to stream to a writer."""
        for images in self.decode_tensors(latents, batch, progress):
            yield (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def draw_noise(generator: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Standard normal noise from the CPU generator, in float32 whatever the device."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def cfg_batch(unconditional: torch.Tensor, conditional: torch.Tensor, guided: bool) -> torch.Tensor:
    """Classifier-free guidance runs both halves in one network call, unconditional first."""
    return torch.cat([unconditional, conditional], dim=0) if guided else conditional


def or_default(value: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return fallback if value is None else value


def guide(noise: torch.Tensor, settings: SamplerSettings) -> torch.Tensor:
    """Classifier-free guidance on a batch of (unconditional, conditional) predictions."""
    if not settings.uses_guidance:
        return noise
    unconditional, conditional = noise.chunk(2)
    return unconditional + settings.guidance * (conditional - unconditional)



def scheduler_step(
    schedule: SchedulerMixin, noise: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """One scheduler step; a stochastic one draws from `generator` (a `step` without a
    generator parameter draws nothing; Euler's takes one and draws nothing either)."""
    if "generator" in inspect.signature(schedule.step).parameters:
        return schedule.step(noise, timestep, latents, generator=generator).prev_sample
    return schedule.step(noise, timestep, latents).prev_sample


class StepCount:
    """Denoising steps reported as `task` progress events against `total`: 0 at once, then one
    event after every step, which counts `weight` (a step over n windows can count n)."""

    def __init__(self, progress: ProgressCallback, task: str, total: int):
        self.progress, self.task, self.total, self.done = progress, task, total, 0
        progress(ProgressEvent(task, 0, total, "steps"))

    def steps(self, schedule: SchedulerMixin, weight: int = 1) -> Iterator[torch.Tensor]:
        """The schedule's timesteps; each one's event is sent once its step is done."""
        for timestep in schedule.timesteps:
            yield timestep
            self.done += weight
            self.progress(ProgressEvent(self.task, self.done, self.total, "steps"))


def denoising_steps(schedule: SchedulerMixin, task: str, progress: ProgressCallback) -> Iterator[torch.Tensor]:
    """The timesteps of one pass that reports its own steps, 0 to n."""
    return StepCount(progress, task, len(schedule.timesteps)).steps(schedule)


def consecutive_runs(frames: Sequence[int]) -> list[tuple[int, int]]:
    """`frames` in order as runs [start, stop) of consecutive frames: a ControlSource is asked
    for one run at a time (a repeated frame starts a new run)."""
    runs: list[list[int]] = []
    for frame in frames:
        if runs and frame == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([frame, frame + 1])
    return [(start, stop) for start, stop in runs]


def require_control_inputs(kind: ControlKind, frames: DrivingFrames, names: Iterable[str] | None = None) -> None:
    """Refuses driving frames without one of `names` (default: every input the control kind takes)."""
    missing = [name for name in (kind.inputs if names is None else names) if getattr(frames, name) is None]
    if missing:
        raise ValueError(f"the {kind.name} control needs {', '.join(missing)} in the driving frames")


def unconditional_frames(first: DrivingFrames, zeroed: Iterable[str], given: Mapping[str, torch.Tensor] | None = None) -> DrivingFrames:
    """The driving frame of guidance's unconditional half, from frame 0's shapes (as official): a
    blank (-1) condition image, zeros for the `zeroed` inputs and the `given` ones as they are."""
    zeros = {name: torch.zeros_like(getattr(first, name)) for name in zeroed}
    return DrivingFrames(torch.full_like(first.condition, -1.0), **zeros, **(given or {}))


def batched(*parts: DrivingFrames) -> DrivingFrames:
    """Driving frames of several samples as one batch, for one call of the control net (a field
    that any part lacks is left out: the control kind does not take it)."""
    def joined(name: str) -> torch.Tensor | None:
        values = [getattr(part, name) for part in parts]
        return None if any(value is None for value in values) else torch.cat(values, dim=0)

    return DrivingFrames(*(joined(field.name) for field in dataclasses.fields(DrivingFrames)))


def with_unconditional(features: ControlFeatures, negative: ControlFeatures | None) -> ControlFeatures:
    """With guidance, the one-frame unconditional control repeated over the frames, first in the batch."""
    if negative is None:
        return features
    return {k: torch.cat([negative[k].expand(-1, -1, v.shape[2], -1, -1), v], dim=0) for k, v in features.items()}


@dataclasses.dataclass(frozen=True)
class DenoisingStep:
    """What a `StepCallback` sees after each denoising step: its timestep and the latents of the
    frames it denoised, as the scheduler holds them (float32, not divided by the VAE's factor)."""

    timestep: torch.Tensor
    latents: torch.Tensor


# Called after every denoising step of every stage; returns latents to go on with, or None to keep them.
StepCallback = Callable[[DenoisingStep], "torch.Tensor | None"]


@dataclasses.dataclass(frozen=True)
class Clip:
    """What every denoiser call of one clip (or image) shares, computed once by `Sampler._prepare`."""

    settings: SamplerSettings
    inputs: SamplerInputs
    generator: torch.Generator
    ref_latents: torch.Tensor  # (1, 4, 1, h, w), scaled
    text: torch.Tensor  # the denoisers' prompt embeddings, guidance-batched
    reference: ReferenceCache
    negative_control: ControlFeatures | None  # one frame; None without guidance
    on_step: StepCallback | None = None
    picture_control: ControlFeatures | None = None  # a picture's, guidance-batched (`Sampler._picture_control`)

    def stepped(self, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The latents after a step, as `on_step` leaves them."""
        if self.on_step is None:
            return latents
        replaced = self.on_step(DenoisingStep(timestep, latents))
        return latents if replaced is None else replaced.to(latents)


def check_denoisers(denoiser_2d: torch.nn.Module, denoiser_motion: torch.nn.Module | None) -> None:
    """v1 to v4 load two denoisers: one without motion modules (images, stage 1, margins) and,
    for video, one with them; swapped, every frame would silently be denoised wrong."""
    if denoiser_2d.is_motion or (denoiser_motion is not None and not denoiser_motion.is_motion):
        raise ValueError("denoiser_2d must be the 2D denoiser and denoiser_motion the motion denoiser")


PipelineArguments = Mapping[str, Callable[[LoadedNetworks], object]]


def pipeline_attributes(*same: str, **renamed: str) -> dict[str, Callable[[LoadedNetworks], object]]:
    """Constructor arguments read off a loaded pipeline: the attributes named `same`, and
    `argument=attribute` where the names differ."""
    attributes = {**dict(zip(same, same)), **renamed}
    return {argument: operator.attrgetter(attribute) for argument, attribute in attributes.items()}


def _bytes(value) -> int:
    """Bytes of the tensors in `value` (control features and motion arguments: dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_bytes(item) for item in value)
    return 0


def free_memory(device: torch.device) -> int | None:
    """Bytes free where `device` keeps tensors (the GPU's, or the machine's RAM); None: unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # no such sysconf name (macOS)
        return None


class WindowInputs:
    """Every window's control features and motion arguments for one pass, made once: they depend on
    the window's driving frames, not on the step. Kept until they fill a quarter of the memory free
    when the pass starts (`free_memory`); windows past that are made again at each step."""

    def __init__(self, conditions: Callable[[int, int], tuple[ControlFeatures, dict]], windows: Sequence[tuple[int, int]], device: torch.device):
        free = free_memory(device)
        budget = free // 4 if free is not None else None
        self._conditions, self._kept, used = conditions, {}, 0
        for window in windows:
            self._kept[window] = conditions(*window)
            used += _bytes(self._kept[window])
            if budget is not None and used > budget:  # at most one window past it
                break

    def get(self, start: int, stop: int) -> tuple[ControlFeatures, dict]:
        kept = self._kept.get((start, stop))
        return kept if kept is not None else self._conditions(start, stop)


class Sampler(LatentCodec):
    """The base of the three sampler families: the networks every version has, `from_pipeline`,
    step 1 of `sample` (`_prepare`), `sample_image` whole, and the two denoising loops the
    families are made of. A family supplies `denoiser_2d` and `denoiser_motion`, `_denoise_video`
    (the rest of `sample`), `_control` (a clip's frames -> control features) and
    `_unconditional_driving` (the driving inputs of guidance's unconditional half)."""

    # Constructor argument -> how `from_pipeline` reads it off a loaded pipeline, besides the shared ones.
    pipeline_arguments: ClassVar[PipelineArguments] = {}
    # Each window's control features and motion inputs depend on the window, not the step: made once per
    # pass and kept (`WindowInputs`); False makes them again at each step (`--low-memory`: memory flat in clip length).
    keep_window_inputs: bool = True

    def __init__(
        self,
        reference_net: torch.nn.Module,
        control_net: torch.nn.Module,
        vae_encoder: torch.nn.Module,
        vae_decoder: torch.nn.Module | None = None,
        *,
        scheduler: SchedulerMixin,
        image_scheduler: SchedulerMixin | None = None,
        device: torch.device,
    ):
        """`vae_decoder` defaults to the encoder's VAE, `image_scheduler` to the video one."""
        self.reference_net = reference_net
        self.control_net = control_net
        self.vae_encoder = vae_encoder
        self.vae_decoder = vae_decoder or vae_encoder
        self.scheduler = scheduler
        self.image_scheduler = image_scheduler or scheduler
        self.device = device

    @classmethod
    def from_pipeline(cls, pipeline: LoadedNetworks) -> Sampler:
        """On a loaded pipeline's networks and schedulers."""
        shared = pipeline_attributes("reference_net", "control_net", "vae_encoder", "vae_decoder", "scheduler", "device")
        sampler = cls(**{name: read(pipeline) for name, read in {**shared, **cls.pipeline_arguments}.items()})
        sampler.keep_window_inputs = not pipeline.low_memory
        return sampler

    def use_scheduler(self, name: str) -> None:
        """Sample with the scheduler `name` (`named_scheduler`) in place of the version's own."""
        self.scheduler, self.image_scheduler = named_scheduler(name, self.scheduler), named_scheduler(name, self.image_scheduler)

    @torch.no_grad()
    def sample(
        self,
        inputs: SamplerInputs,
        settings: SamplerSettings,
        generator: torch.Generator,
        progress: ProgressCallback = no_progress,
        *,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """-> final latents divided by the VAE scaling factor, (1, 4, F, h, w) float32; `on_step`
        sees (and may replace) the latents after every denoising step of every stage."""
        self._check_video_networks()
        # 1. The reference latent, the prompt embeddings, the reference cache and the unconditional control.
        clip = self._prepare(inputs, settings, generator, on_step)
        # 2. and on: the family's passes (`_denoise_video` in its file).
        return self._denoise_video(clip, progress) / self.vae_encoder.config.scaling_factor

    # Alike in shape only to `sample`: both entry points take the same arguments.
    @torch.no_grad()
    def sample_image(
        self,
        inputs: SamplerInputs,
        settings: SamplerSettings,
        generator: torch.Generator,
        progress: ProgressCallback = no_progress,
        *,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """One frame, as the official image pipelines (`HMImagePipeline`, `HM3ImagePipeline`,
        `HM5ImagePipeline`): pure noise (`noise * init_noise_sigma`, the reference only through
        the reference net), then every step of `image_scheduler` with the denoiser without
        motion -> (1, 4, 1, h, w) / scaling factor."""
        # 1. The reference latent, the prompt embeddings, the reference cache and the unconditional control.
        clip = self._prepare(inputs, settings, generator, on_step, picture=True)
        # 2. The base noise, then every step.
        schedule = fresh_schedule(self.image_scheduler, settings.steps, self.device)
        latent = draw_noise(generator, clip.ref_latents.shape, self.device) * schedule.init_noise_sigma
        latent = self._denoise_alone(clip, latent, schedule, [0], denoising_steps(schedule, "denoise", progress), clip.picture_control)
        return latent / self.vae_encoder.config.scaling_factor

    @staticmethod
    def windows(num_frames: int, settings: SamplerSettings) -> tuple[tuple[int, int], ...]:
        """The motion windows [start, stop) over the clip's frames in the pass that makes them: where a
        window begins or ends the frames may jump (the seams `hellomeme eval` measures)."""
        raise NotImplementedError

    def _check_video_networks(self) -> None:
        """Video needs the motion networks, which image runs do not load."""
        if self.denoiser_motion is None:
            raise ValueError("video sampling needs the motion denoiser (loaded for video runs)")

    def _prepare(
        self, inputs: SamplerInputs, settings: SamplerSettings, generator: torch.Generator, on_step: StepCallback | None, picture: bool = False
    ) -> Clip:
        """The reference latent (the generator's first draw), the unconditional control (a
        `picture`'s in the same control-net call as its own), the reference cache and the
        guidance-batched prompt embeddings, as official."""
        guided = settings.uses_guidance
        ref_latents = self._encode_reference(inputs, generator)
        picture_control = self._picture_control(inputs, guided) if picture else None
        if not guided:
            negative_control = None
        elif picture_control is not None:
            negative_control = {key: value[:1] for key, value in picture_control.items()}
        else:
            negative_control = self._control_features(self._unconditional_driving(inputs))
        reference_text = cfg_batch(
            or_default(inputs.reference_negative_text_embeds, inputs.negative_text_embeds),
            or_default(inputs.reference_text_embeds, inputs.text_embeds),
            guided,
        ).to(self.device)
        reference = self._reference_cache(ref_latents, reference_text, guided, **self._reference_inputs(inputs, negative_control))
        text = cfg_batch(inputs.negative_text_embeds, inputs.text_embeds, guided).to(self.device)
        return Clip(settings, inputs, generator, ref_latents, text, reference, negative_control, on_step, picture_control)

    def _picture_control(self, inputs: SamplerInputs, guided: bool) -> ControlFeatures:
        """A picture's control features, with guidance its unconditional half first, from one call
        of the control net on both (the official image pipelines batch them so)."""
        frame = inputs.control(0, 1)
        return self._control_features(batched(self._unconditional_driving(inputs), frame) if guided else frame)

    def _reference_inputs(self, inputs: SamplerInputs, negative_control: ControlFeatures | None) -> dict[str, object]:
        """What the reference net takes besides a latent and the prompt (only v5c: a control)."""
        return {}

    def _reference_cache(self, latent: torch.Tensor, text: torch.Tensor, guided: bool, **inputs) -> ReferenceCache:
        """The reference net's features of `latent`; with guidance the unconditional half is
        those of a zero latent, as official (for the reference image and for motion pads)."""
        return self.reference_net(cfg_batch(torch.zeros_like(latent), latent, guided), text, **inputs)

    def _predict(
        self,
        denoiser: torch.nn.Module,
        latents: torch.Tensor,
        schedule: SchedulerMixin,
        timestep: torch.Tensor,
        clip: Clip,
        control: ControlFeatures,
        **motion,
    ) -> torch.Tensor:
        """The (unconditional, conditional) noise predictions in one network call, float32;
        `motion`: the denoiser's motion arguments, if any."""
        model_input = schedule.scale_model_input(cfg_batch(latents, latents, clip.settings.uses_guidance), timestep)
        return denoiser(model_input, timestep, clip.text, clip.reference, control, **motion).float()

    def _denoise_alone(
        self,
        clip: Clip,
        latents: torch.Tensor,
        schedule: SchedulerMixin,
        frames: Sequence[int],
        timesteps: Iterable[torch.Tensor],
        control: ControlFeatures | None = None,
    ) -> torch.Tensor:
        """The latents of the clip's `frames`, each frame on its own (the denoiser without
        motion), through `timesteps` of `schedule`; `control`: the frames' (default: `_control`'s)."""
        control = self._control(clip, frames) if control is None else control
        for timestep in timesteps:
            noise = guide(self._predict(self.denoiser_2d, latents, schedule, timestep, clip, control), clip.settings)
            latents = clip.stepped(timestep, scheduler_step(schedule, noise, timestep, latents, clip.generator))
        return latents

    def _denoise_windows(
        self,
        clip: Clip,
        latents: torch.Tensor,
        schedule: SchedulerMixin,
        windows: Sequence[tuple[int, int]],
        conditions: Callable[[int, int], tuple[ControlFeatures, dict]],
        timesteps: Iterable[torch.Tensor],
    ) -> torch.Tensor:
        """`latents` through `timesteps` with the motion denoiser over overlapping windows [start,
        stop): each step averages the windows' predictions frame by frame, then guides.
        `conditions(start, stop)` gives a window's control and motion arguments."""
        coverage = window_coverage(windows, latents.shape[2]).to(self.device).view(1, 1, -1, 1, 1)
        noise_sum = torch.zeros((2 if clip.settings.uses_guidance else 1, *latents.shape[1:]), device=self.device)
        kept = WindowInputs(conditions, windows, self.device) if self.keep_window_inputs else None
        for timestep in timesteps:
            noise_sum.zero_()
            for start, stop in windows:
                control, motion = kept.get(start, stop) if kept else conditions(start, stop)
                window = latents[:, :, start:stop]
                noise_sum[:, :, start:stop] += self._predict(self.denoiser_motion, window, schedule, timestep, clip, control, **motion)
            noise = guide(noise_sum / coverage, clip.settings)
            latents = clip.stepped(timestep, scheduler_step(schedule, noise, timestep, latents, clip.generator))
        return latents
