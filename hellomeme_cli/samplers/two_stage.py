"""The two-stage HelloMeme v1 video sampler (official `HMVideoPipeline.__call__`).

1. Reference: the VAE encodes the reference image (its latent distribution sampled
   with the generator); the reference net caches its features once per clip.
2. Stage 1: every frame alone with the 2D denoiser, a few Euler steps; frame 0 starts
   from noise, each later frame from the previous result re-noised to the first step.
3. Stage 2: the stage-1 latents re-noised, then denoised with the motion UNet over
   overlapping windows whose noise predictions are averaged.
4. Decode: the VAE turns the latents into frames, batch by batch, as an iterator.

The noise schedule is diffusers' scheduler built from the downloaded SD1.5
`scheduler/scheduler_config.json` (`EulerDiscreteScheduler` for v1, as official): a fresh
copy per stage (or per stage-1 frame), so the pipeline's own scheduler keeps no state.
Which control inputs the control net takes, and its unconditional inputs, come from the
version's `ControlKind`.

Randomness comes from one CPU `torch.Generator`, drawn in float32 on the CPU in the
official order (reference latent, stage-1 noise, stage-2 noise), so a seed gives the
same video on any device. Latents stay float32 on the compute device; the networks
run in their own dtype.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import AutoencoderKL
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from hellomeme_cli.models import HMDenoisingNet, HMReferenceNet
from hellomeme_cli.models.unet import ControlFeatures, ReferenceCache
from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress
from hellomeme_cli.samplers.common import (
    ControlSource, DrivingFrames, LatentCodec, LoadedNetworks, SamplerInputs, SamplerSettings,
    cfg_batch, draw_noise, fresh_schedule, guide, or_default, plan_windows,
)
from hellomeme_cli.versions import ControlKind



"""Gives the control inputs of frames [start, stop); asked for at most one window at a time."""


@dataclasses.dataclass(frozen=True)
class _Clip:
    """What every denoiser call for one clip shares (computed once per clip)."""

    settings: SamplerSettings
    num_frames: int
    source: ControlSource
    text: torch.Tensor
    reference: ReferenceCache
    negative_control: ControlFeatures | None


class VideoSampler(LatentCodec):
    """Turns a reference image, prompt embeddings and per-frame driving signals into video
    latents with the HelloMeme v1 networks (on any one device, any dtype)."""

    def __init__(
        self,
        reference_net: HMReferenceNet,
        denoiser_2d: HMDenoisingNet,
        denoiser_motion: HMDenoisingNet | None,
        control_net: torch.nn.Module,
        vae_encoder: AutoencoderKL,
        vae_decoder: AutoencoderKL | None = None,
        *,
        scheduler: SchedulerMixin,
        control: ControlKind,
        device: torch.device | None = None,
    ):
        """`vae_encoder` encodes the reference (base SD1.5 in the official recipe);
        `vae_decoder` (default: the same VAE) decodes the frames. Without `denoiser_motion`
        only `sample_image` works (image runs load no motion module). `control_net` takes the
        condition and the `control.inputs`; `device` (default: the 2D UNet's) is where the
        latents live, which offloaded networks cannot tell."""
        if denoiser_2d.is_motion or (denoiser_motion is not None and not denoiser_motion.is_motion):
            raise ValueError("denoiser_2d must be the 2D denoiser and denoiser_motion the motion denoiser")
        self.reference_net = reference_net
        self.denoiser_2d = denoiser_2d
        self.denoiser_motion = denoiser_motion
        self.control_net = control_net
        self.vae_encoder = vae_encoder
        self.vae_decoder = vae_decoder or vae_encoder
        self.scheduler = scheduler
        self.control = control
        self.device = device or denoiser_2d.unet.device

    @classmethod
    def from_pipeline(cls, pipeline: LoadedNetworks) -> VideoSampler:
        """On a loaded pipeline's networks (v1, v2: one scheduler for video and image)."""
        return cls(
            pipeline.reference_net, pipeline.denoiser_2d, pipeline.denoiser_motion, pipeline.control_net,
            pipeline.vae_encoder, pipeline.vae_decoder, scheduler=pipeline.scheduler, control=pipeline.control_kind,
            device=pipeline.device,
        )

    @torch.no_grad()
    def sample(
        self,
        inputs: SamplerInputs,
        settings: SamplerSettings,
        generator: torch.Generator,
        progress: ProgressCallback = no_progress,
    ) -> torch.Tensor:
        """-> final latents divided by the VAE scaling factor, (1, 4, F, h, w) float32."""
        if self.denoiser_motion is None:
            raise ValueError("video sampling needs the motion denoiser (loaded for video runs)")
        # 1. Reference latent and the reference net's cache, once per clip, and the unconditional control.
        clip, ref_latents = self._prepare(inputs, settings, generator)

        # 2. Stage 1: frames one by one with the 2D denoiser.
        stage1 = self._stage1(clip, generator, ref_latents.shape, progress)

        # 3. Stage 2: all frames with the motion denoiser over overlapping windows.
        latents = self._stage2(clip, generator, stage1, progress)
        return latents[:, :, : inputs.num_frames] / self.vae_encoder.config.scaling_factor

    @torch.no_grad()
    def sample_image(
        self,
        inputs: SamplerInputs,
        settings: SamplerSettings,
        generator: torch.Generator,
        progress: ProgressCallback = no_progress,
    ) -> torch.Tensor:
        """One frame, as the official `HMImagePipeline` (v1 and v2 at e0c7fe1): pure noise
        (`noise * init_noise_sigma`, the reference only through the reference net), then every
        step with the 2D denoiser -> (1, 4, 1, h, w) / scaling factor."""
        clip, ref_latents = self._prepare(inputs, settings, generator)
        schedule = fresh_schedule(self.scheduler, settings.steps, self.device)
        latent = draw_noise(generator, ref_latents.shape, self.device) * schedule.init_noise_sigma
        control = self._control(clip, 0, 1)
        steps = len(schedule.timesteps)
        progress(ProgressEvent("denoise", 0, steps, "steps"))
        for step, timestep in enumerate(schedule.timesteps):
            noise = guide(self._predict(self.denoiser_2d, latent, schedule, timestep, clip, control), settings)
            latent = schedule.step(noise, timestep, latent).prev_sample
            progress(ProgressEvent("denoise", step + 1, steps, "steps"))
        return latent / self.vae_encoder.config.scaling_factor

    def _prepare(
        self, inputs: SamplerInputs, settings: SamplerSettings, generator: torch.Generator
    ) -> tuple[_Clip, torch.Tensor]:
        """What every denoiser call of a clip shares, and the scaled reference latent (1, 4, 1, h, w);
        with guidance the reference net's unconditional half sees a zero latent, as official."""
        guided = settings.uses_guidance
        reference_text = cfg_batch(
            or_default(inputs.reference_negative_text_embeds, inputs.negative_text_embeds),
            or_default(inputs.reference_text_embeds, inputs.text_embeds),
            guided,
        ).to(self.device)
        ref_latents = self._encode_reference(inputs, generator)
        clip = _Clip(
            settings=settings,
            num_frames=inputs.num_frames,
            source=inputs.control,
            text=cfg_batch(inputs.negative_text_embeds, inputs.text_embeds, guided).to(self.device),
            reference=self.reference_net(cfg_batch(torch.zeros_like(ref_latents), ref_latents, guided), reference_text),
            negative_control=self._negative_control(inputs) if guided else None,
        )
        return clip, ref_latents

    def _stage1(
        self, clip: _Clip, generator: torch.Generator, latent_shape: torch.Size, progress: ProgressCallback
    ) -> torch.Tensor:
        """Each frame alone: frame 0 from the base noise, frame i from frame i-1's result
        re-noised to the first step with the same base noise."""
        steps = min(clip.settings.stage1_steps, clip.settings.steps)
        base_noise = draw_noise(generator, latent_shape, self.device)
        latent = base_noise * fresh_schedule(self.scheduler, steps, self.device).init_noise_sigma
        frames = []
        progress(ProgressEvent("stage 1", 0, clip.num_frames, "frames"))
        for index in range(clip.num_frames):
            schedule = fresh_schedule(self.scheduler, steps, self.device)
            control = self._control(clip, index, index + 1)
            if index > 0:
                latent = schedule.add_noise(latent, base_noise, schedule.timesteps[:1])
            for timestep in schedule.timesteps:
                noise = guide(self._predict(self.denoiser_2d, latent, schedule, timestep, clip, control), clip.settings)
                latent = schedule.step(noise, timestep, latent).prev_sample
            frames.append(latent)
            progress(ProgressEvent("stage 1", index + 1, clip.num_frames, "frames"))
        return torch.cat(frames, dim=2)

    def _stage2(
        self, clip: _Clip, generator: torch.Generator, stage1: torch.Tensor, progress: ProgressCallback
    ) -> torch.Tensor:
        """The stage-1 latents, padded and re-noised, denoised window by window; each
        step averages the windows' noise predictions frame by frame, then guides."""
        plan = plan_windows(clip.num_frames, clip.settings.window, clip.settings.overlap)
        schedule = fresh_schedule(self.scheduler, clip.settings.steps, self.device)
        # The official padding repeats the second-to-last stage-1 latent (with the last frame's control).
        pad_source = max(clip.num_frames - 2, 0)
        padding = stage1[:, :, pad_source : pad_source + 1].expand(-1, -1, plan.length - clip.num_frames, -1, -1)
        latents = torch.cat([stage1, padding], dim=2)
        _, channels, _, h, w = latents.shape
        base_noise = draw_noise(generator, (1, channels, plan.noise_frames, h, w), self.device)[:, :, : plan.length]
        latents = schedule.add_noise(latents, base_noise, schedule.timesteps[:1])
        coverage = plan.coverage().to(self.device).view(1, 1, -1, 1, 1)
        noise_sum = torch.zeros((2 if clip.settings.uses_guidance else 1, *latents.shape[1:]), device=self.device)

        steps = len(schedule.timesteps)
        progress(ProgressEvent("stage 2", 0, steps, "steps"))
        for step, timestep in enumerate(schedule.timesteps):
            noise_sum.zero_()
            for start, stop in plan.windows:
                control = self._control(clip, start, stop)
                window = latents[:, :, start:stop]
                noise_sum[:, :, start:stop] += self._predict(self.denoiser_motion, window, schedule, timestep, clip, control)
            noise = guide(noise_sum / coverage, clip.settings)
            latents = schedule.step(noise, timestep, latents).prev_sample
            progress(ProgressEvent("stage 2", step + 1, steps, "steps"))
        return latents

    @staticmethod
    def _predict(
        denoiser: HMDenoisingNet,
        latents: torch.Tensor,
        schedule: SchedulerMixin,
        timestep: torch.Tensor,
        clip: _Clip,
        control: ControlFeatures,
    ) -> torch.Tensor:
        """The (unconditional, conditional) noise predictions in one network call, float32."""
        model_input = schedule.scale_model_input(cfg_batch(latents, latents, clip.settings.uses_guidance), timestep)
        return denoiser(model_input, timestep, clip.text, clip.reference, control).float()

    def _control(self, clip: _Clip, start: int, stop: int) -> ControlFeatures:
        """Control features of frames [start, stop) of the padded clip, computed now (only
        the window in hand is ever held): frames past the clip repeat the last real
        frame's; with guidance the unconditional features come first in the batch."""
        real_stop = min(stop, clip.num_frames)
        features = self._control_features(clip.source(start, real_stop))
        if stop > real_stop:
            repeats = stop - real_stop
            features = {k: torch.cat([v, v[:, :, -1:].expand(-1, -1, repeats, -1, -1)], dim=2) for k, v in features.items()}
        if clip.negative_control is None:
            return features
        negative = clip.negative_control
        return {k: torch.cat([negative[k].expand(-1, -1, stop - start, -1, -1), v], dim=0) for k, v in features.items()}

    def _control_features(self, frames: DrivingFrames) -> ControlFeatures:
        """The control net on the condition and the inputs the control kind names."""
        missing = [name for name in self.control.inputs if getattr(frames, name) is None]
        if missing:
            raise ValueError(f"the {self.control.name} control needs {', '.join(missing)} in the driving frames")
        inputs = [getattr(frames, name).to(self.device) for name in self.control.inputs]
        return self.control_net(frames.condition.to(self.device), *inputs)

    def _negative_control(self, inputs: SamplerInputs) -> ControlFeatures:
        """The unconditional control of one frame: a blank (-1) condition image, and each input
        from the SamplerInputs field the control kind's `unconditional` names, else zeros."""
        first = inputs.control(0, 1)
        given = dict(self.control.unconditional)
        negative = {}
        for name in self.control.inputs:
            if name in given:
                negative[name] = getattr(inputs, given[name])
                if negative[name] is None:
                    raise ValueError(f"guidance with the {self.control.name} control needs {given[name]}")
            elif getattr(first, name) is None:
                raise ValueError(f"the {self.control.name} control needs {name} in the driving frames")
            else:
                negative[name] = torch.zeros_like(getattr(first, name))
        return self._control_features(DrivingFrames(torch.full_like(first.condition, -1.0), **negative))


