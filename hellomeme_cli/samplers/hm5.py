"""The HelloMeme v5, v5b and v5c samplers (official `HM5VideoPipeline` and `HM5ImagePipeline`).

Video (v5, v5b):

1. Reference: the VAE encodes the reference image (its latent distribution sampled with
   the generator); the reference net caches its features once per clip, the unconditional
   half on a zero latent.
2. Noise: one tensor of F + 13 frames for every pass; a pass over n frames takes its
   first n frames, whatever the frames are.
3. Recursive passes (official `gen_video`): more than 12 frames are split into windows of
   12 sharing one frame (stride 11); the windows' first and last frames are denoised first
   by a pass one level deeper, and the reference net's caches of their results become the
   motion pad states of every window at this level. Each pass is a fresh DPM-Solver++ SDE
   schedule; each step averages the windows' predictions frame by frame, guides, steps.
4. Decode: the VAE turns the latents into frames, batch by batch, as an iterator.

Image (v5, v5b, v5c): one frame, no motion modules, the same schedule; v5c's reference
net also gets the reference image's own control (`SamplerInputs.reference_control`).

Control features are computed per window when a window is denoised (never for the whole
clip), from the `ControlSource`; only the frames of the clip's latents (4 x h x w each)
and the margin frames' pad states are held for the whole clip.

Randomness comes from one CPU `torch.Generator`, drawn in float32 in the official order:
reference latent, input noise, then one draw per scheduler step (deepest pass first). The
generator is always handed to the scheduler's step: the official pipelines hand it over
only when their own, never stepped, `scheduler` component accepts one, else the SDE noise
comes from torch's global random state.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from hellomeme_cli.models import HM5ControlNetBase, HM5DenoisingNet, HM5ReferenceNet, HM5SD15ControlProj, motion_pad_states
from hellomeme_cli.models.unet import ControlFeatures, ReferenceCache
from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress
from hellomeme_cli.samplers.common import LoadedNetworks, ControlSource, DrivingFrames, LatentCodec, SamplerInputs, SamplerSettings, cfg_batch, or_default, draw_noise, guide, fresh_schedule
from hellomeme_cli.versions import DPM_SDE, ControlKind


# The official windows: 12 frames, neighbours sharing one frame (`HM5VideoPipeline.num_frames`).
WINDOW = 12
STRIDE = WINDOW - 1


# DrivingFrames field -> HM5ControlNetBase keyword.
_CONTROL_KEYWORDS = {"drive_coeff": "drive_coeff", "face_parts": "face_parts", "pd_fpg": "emo_embedding"}


def hm5_scheduler() -> DPMSolverMultistepScheduler:
    """The official v5 schedule, built by every official pass itself whatever the checkpoint's:
    DPM-Solver++ (SDE), SD1.5's scaled-linear betas."""
    return DPMSolverMultistepScheduler(**DPM_SDE)


def plan_hm5_windows(num_frames: int) -> tuple[tuple[int, int], ...]:
    """Windows [start, stop) over n frames: one window up to 12 frames, else 12 frames
    with stride 11; a trailing window of one frame (already the previous window's last)
    is dropped, as official."""
    if num_frames < 1:
        raise ValueError(f"a pass needs at least one frame, got {num_frames}")
    if num_frames <= WINDOW:
        return ((0, num_frames),)
    windows = [(start, min(start + WINDOW, num_frames)) for start in range(0, num_frames, STRIDE)]
    if windows[-1][1] - windows[-1][0] == 1:
        windows.pop()
    return tuple(windows)


def margin_frames(frames: list[int]) -> list[int]:
    """The frames a pass over `frames` needs denoised first: its windows' first and last (sorted);
    none when one window covers them."""
    if len(frames) <= WINDOW:
        return []
    return sorted({frames[i] for start, stop in plan_hm5_windows(len(frames)) for i in (start, stop - 1)})


@dataclasses.dataclass(frozen=True)
class _Clip:
    """What every denoiser call of one clip (or image) shares."""

    settings: SamplerSettings
    source: ControlSource
    text: torch.Tensor
    reference: ReferenceCache
    negative_control: ControlFeatures | None


class HM5VideoSampler(LatentCodec):
    """Turns a reference image, prompt embeddings and per-frame driving signals into video
    latents (v5, v5b) or one image (v5, v5b, v5c) with the HelloMeme v5-family networks."""

    def __init__(
        self,
        reference_net: HM5ReferenceNet,
        denoiser: HM5DenoisingNet,
        control_net: HM5ControlNetBase,
        control_proj: HM5SD15ControlProj,
        vae_encoder: AutoencoderKL,
        vae_decoder: AutoencoderKL | None = None,
        *,
        control: ControlKind,
        scheduler: SchedulerMixin | None = None,
        reference_control: bool = False,
        device: torch.device | None = None,
    ):
        """`denoiser` carries the version's reference adapter and, for `sample`, the motion
        adapter. `control.inputs` names the expression inputs (ARKit `drive_coeff`,
        `face_parts` or PD-FGC `pd_fpg`); their unconditional values are zeros (v5 ignores
        `control.unconditional`). `scheduler` (default `hm5_scheduler()`, the official one)
        is copied fresh for every pass; its `step` must take a `generator`.
        `reference_control` (v5c): the reference net also gets the reference image's own control."""
        unknown = [name for name in control.inputs if name not in _CONTROL_KEYWORDS]
        if unknown:
            raise ValueError(f"HM5ControlNetBase takes no control input {', '.join(unknown)}")
        scheduler = scheduler or hm5_scheduler()
        if "generator" not in inspect.signature(scheduler.step).parameters:
            raise ValueError(f"{type(scheduler).__name__}.step takes no generator: the seed would not reproduce a result")
        self.reference_net = reference_net
        self.denoiser = denoiser
        self.control_net = control_net
        self.control_proj = control_proj
        self.vae_encoder = vae_encoder
        self.vae_decoder = vae_decoder or vae_encoder
        self.control = control
        self.scheduler = scheduler
        self.reference_control = reference_control
        self.device = device or denoiser.unet.device

    @classmethod
    def from_pipeline(cls, pipeline: LoadedNetworks) -> HM5VideoSampler:
        """On a loaded pipeline's networks: its one denoiser, with motion modules for video runs."""
        return cls(
            pipeline.reference_net, pipeline.denoiser_motion or pipeline.denoiser_2d, pipeline.control_net,
            pipeline.control_proj, pipeline.vae_encoder, pipeline.vae_decoder, control=pipeline.control_kind,
            scheduler=pipeline.scheduler, reference_control=pipeline.version.reference_control, device=pipeline.device,
        )

    @torch.no_grad()
    def sample(
        self,
        inputs: SamplerInputs,
        settings: SamplerSettings,
        generator: torch.Generator,
        progress: ProgressCallback = no_progress,
    ) -> torch.Tensor:
        """-> final latents divided by the VAE scaling factor, (1, 4, F, h, w) float32.
        Of `settings` only steps and guidance apply: the windows are fixed."""
        if self.denoiser.motion_adapter is None:
            raise ValueError("video sampling needs the motion adapter (hm5_motion) in the denoiser")
        # 1. Reference latent, the reference net's cache and the unconditional control.
        clip, ref_latents = self._prepare(inputs, settings, generator)

        # 2. One noise tensor for every pass.
        _, channels, _, h, w = ref_latents.shape
        noise = draw_noise(generator, (1, channels, inputs.num_frames + WINDOW + 1, h, w), self.device)

        # 3. The recursive passes, margin frames first.
        latents = self._denoise(clip, list(range(inputs.num_frames)), {}, noise, generator, 0, progress)
        return latents / self.vae_encoder.config.scaling_factor

    @torch.no_grad()
    def sample_image(
        self,
        inputs: SamplerInputs,
        settings: SamplerSettings,
        generator: torch.Generator,
        progress: ProgressCallback = no_progress,
    ) -> torch.Tensor:
        """One frame from pure noise (official `HM5ImagePipeline`; strength is unused there)
        -> (1, 4, 1, h, w) / scaling factor."""
        # 1. Reference latent, the reference net's cache (v5c: with the reference's control).
        clip, ref_latents = self._prepare(inputs, settings, generator)

        # 2. Base noise, then every step with the denoiser without motion.
        schedule = fresh_schedule(self.scheduler, settings.steps, self.device)
        latent = draw_noise(generator, ref_latents.shape, self.device) * schedule.init_noise_sigma
        control = self._control(clip, [0])
        steps = len(schedule.timesteps)
        progress(ProgressEvent("denoise", 0, steps, "steps"))
        for step, timestep in enumerate(schedule.timesteps):
            model_input = schedule.scale_model_input(cfg_batch(latent, latent, settings.uses_guidance), timestep)
            noise = self.denoiser(model_input, timestep, clip.text, clip.reference, control).float()
            latent = schedule.step(guide(noise, settings), timestep, latent, generator=generator).prev_sample
            progress(ProgressEvent("denoise", step + 1, steps, "steps"))
        return latent / self.vae_encoder.config.scaling_factor

    def _prepare(
        self, inputs: SamplerInputs, settings: SamplerSettings, generator: torch.Generator
    ) -> tuple[_Clip, torch.Tensor]:
        """What every denoiser call shares, and the scaled reference latent (1, 4, 1, h, w)."""
        if self.reference_control and inputs.reference_control is None:
            raise ValueError("this version's reference net needs the reference image's own control (reference_control)")
        guided = settings.uses_guidance
        ref_latents = self._encode_reference(inputs, generator)
        negative = self._negative_control(inputs.control(0, 1)) if guided else None
        ref_control = None
        if self.reference_control:
            ref_control = _with_negative(self._control_features(inputs.reference_control), negative)
        reference_text = cfg_batch(
            or_default(inputs.reference_negative_text_embeds, inputs.negative_text_embeds),
            or_default(inputs.reference_text_embeds, inputs.text_embeds),
            guided,
        ).to(self.device)
        reference = self.reference_net(cfg_batch(torch.zeros_like(ref_latents), ref_latents, guided), reference_text, ref_control)
        text = cfg_batch(inputs.negative_text_embeds, inputs.text_embeds, guided).to(self.device)
        return _Clip(settings, inputs.control, text, reference, negative), ref_latents

    def _denoise(
        self,
        clip: _Clip,
        frames: list[int],
        pads: dict[int, ReferenceCache],
        noise: torch.Tensor,
        generator: torch.Generator,
        depth: int,
        progress: ProgressCallback,
    ) -> torch.Tensor:
        """One pass (official `gen_video`) over `frames` -> their latents (1, 4, n, h, w).
        A pass below the top leaves each of its frames' reference-net cache in `pads`."""
        margins = margin_frames(frames)
        if margins:
            self._denoise(clip, margins, pads, noise, generator, depth + 1, progress)

        windows = plan_hm5_windows(len(frames))
        schedule = fresh_schedule(self.scheduler, clip.settings.steps, self.device)
        latents = noise[:, :, : len(frames)] * schedule.init_noise_sigma
        coverage = torch.zeros(len(frames), device=self.device)
        for start, stop in windows:
            coverage[start:stop] += 1
        coverage = coverage.view(1, 1, -1, 1, 1)
        guided = clip.settings.uses_guidance
        noise_sum = torch.zeros((2 if guided else 1, *latents.shape[1:]), device=self.device)

        task = "denoise" if depth == 0 else f"margin frames (level {depth})"
        steps = len(schedule.timesteps)
        progress(ProgressEvent(task, 0, steps, "steps"))
        for step, timestep in enumerate(schedule.timesteps):
            noise_sum.zero_()
            model_input = schedule.scale_model_input(cfg_batch(latents, latents, guided), timestep)
            for start, stop in windows:
                window = frames[start:stop]
                pad = motion_pad_states(pads[window[0]], pads[window[-1]]) if window[0] in pads and window[-1] in pads else None
                noise_sum[:, :, start:stop] += self.denoiser(
                    model_input[:, :, start:stop],
                    timestep,
                    clip.text,
                    clip.reference,
                    self._control(clip, window),
                    motion_pad=pad,
                    use_motion=True,
                ).float()
            noise_pred = guide(noise_sum / coverage, clip.settings)
            latents = schedule.step(noise_pred, timestep, latents, generator=generator).prev_sample
            progress(ProgressEvent(task, step + 1, steps, "steps"))

        if depth > 0:
            # Pad states: the reference net on each result, with the denoiser's prompt (as official).
            for position, frame in enumerate(frames):
                latent = latents[:, :, position]
                pads[frame] = self.reference_net(cfg_batch(torch.zeros_like(latent), latent, guided), clip.text)
        return latents

    def _control(self, clip: _Clip, frames: list[int]) -> ControlFeatures:
        """The 8 control residuals of `frames` (any, in order; asked of the source run by run of
        consecutive frames), (b, c, n, h', w'); with guidance the unconditional half first."""
        runs: list[list[int]] = []
        for frame in frames:
            if runs and frame == runs[-1][-1] + 1:
                runs[-1].append(frame)
            else:
                runs.append([frame])
        parts = [self._control_features(clip.source(run[0], run[-1] + 1)) for run in runs]
        return _with_negative({key: torch.cat([part[key] for part in parts], dim=2) for key in parts[0]}, clip.negative_control)

    def _control_features(self, frames: DrivingFrames) -> ControlFeatures:
        """HM5SD15ControlProj(HM5ControlNetBase(condition, expression)) of the given frames."""
        missing = [name for name in self.control.inputs if getattr(frames, name) is None]
        if missing:
            raise ValueError(f"the {self.control.name} control needs {', '.join(missing)} in the driving frames")
        expression = {_CONTROL_KEYWORDS[name]: getattr(frames, name).to(self.device) for name in self.control.inputs}
        return self.control_proj(self.control_net(frames.condition.to(self.device), **expression))

    def _negative_control(self, first: DrivingFrames) -> ControlFeatures:
        """The unconditional control of one frame (official: from frame 0's shapes): a blank (-1)
        condition image and zero expression inputs."""
        missing = [name for name in self.control.inputs if getattr(first, name) is None]
        if missing:
            raise ValueError(f"the {self.control.name} control needs {', '.join(missing)} in the driving frames")
        zeros = {name: torch.zeros_like(getattr(first, name)) for name in self.control.inputs}
        return self._control_features(DrivingFrames(torch.full_like(first.condition, -1.0), **zeros))


def _with_negative(features: ControlFeatures, negative: ControlFeatures | None) -> ControlFeatures:
    """With guidance, the one-frame unconditional control repeated over the frames, first in the batch."""
    if negative is None:
        return features
    return {k: torch.cat([negative[k].expand(-1, -1, v.shape[2], -1, -1), v], dim=0) for k, v in features.items()}
