"""What every sampler shares: its settings and inputs, the window plan, a fresh schedule per stage,
the VAE's part (`LatentCodec`), noise drawn from the run's CPU generator, and classifier-free guidance.

Samplers reach a loaded pipeline's networks through `LoadedNetworks`, a description of the
attributes they read, so this room never imports the engine that builds them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress
from hellomeme_cli.versions import ControlKind, Version


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
        counts = torch.zeros(self.length)
        for start, stop in self.windows:
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

