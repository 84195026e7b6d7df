"""The two-stage HelloMeme v1 video sampler (official `HMVideoPipeline.__call__`).

1. Reference: the VAE encodes the reference image (its latent distribution sampled
   with the generator); the reference net caches its features once per clip
   (`Sampler._prepare`, common.py, as for every family).
2. Stage 1: every frame alone with the 2D denoiser, a few Euler steps; frame 0 starts
   from noise, each later frame from the previous result re-noised to the first step.
3. Stage 2: the stage-1 latents re-noised, then denoised with the motion UNet over
   overlapping windows whose noise predictions are averaged.
4. Decode: the VAE turns the latents into frames, batch by batch, as an iterator.

The noise schedule is diffusers' `EulerDiscreteScheduler` on SD1.5's betas with its default
(linspace) spacing, as the official pipelines build it whatever the checkpoint's config says:
a fresh copy per stage (or per stage-1 frame), so the pipeline's own scheduler keeps no state.
Which control inputs the control net takes, and its unconditional inputs, come from the
version's `ControlKind`.

Randomness comes from one CPU `torch.Generator`, drawn in float32 on the CPU in the
official order (reference latent, stage-1 noise, stage-2 noise), so a seed gives the
same video on any device. Latents stay float32 on the compute device; the networks
run in their own dtype.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from hellomeme_cli.models import HMDenoisingNet, HMReferenceNet
from hellomeme_cli.models.unet import ControlFeatures
from hellomeme_cli.progress import ProgressCallback, ProgressEvent
from hellomeme_cli.samplers.common import (
    Clip, DrivingFrames, Sampler, SamplerInputs, SamplerSettings, check_denoisers, denoising_steps, draw_noise, fresh_schedule,
    pipeline_attributes, plan_windows, require_control_inputs, unconditional_frames, with_unconditional,
)
from hellomeme_cli.versions import ControlKind


class VideoSampler(Sampler):
    """Turns a reference image, prompt embeddings and per-frame driving signals into video
    latents with the HelloMeme v1 networks (on any one device, any dtype)."""

    # v1 and v2: one scheduler for video and image.
    pipeline_arguments = pipeline_attributes("denoiser_2d", "denoiser_motion", control="control_kind")

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
        check_denoisers(denoiser_2d, denoiser_motion)
        super().__init__(
            reference_net, control_net, vae_encoder, vae_decoder, scheduler=scheduler, device=device or denoiser_2d.unet.device
        )
        self.denoiser_2d = denoiser_2d
        self.denoiser_motion = denoiser_motion
        self.control = control

    @staticmethod
    def windows(num_frames: int, settings: SamplerSettings) -> tuple[tuple[int, int], ...]:
        """Stage 2's windows, the padding past the clip cut off."""
        plan = plan_windows(num_frames, settings.window, settings.overlap)
        return tuple((start, min(stop, num_frames)) for start, stop in plan.windows)

    def _denoise_video(self, clip: Clip, progress: ProgressCallback) -> torch.Tensor:
        """`sample` after step 1: the clip's latents, (1, 4, F, h, w)."""
        # 2. Stage 1: frames one by one with the 2D denoiser.
        stage1 = self._stage1(clip, progress)

        # 3. Stage 2: all frames with the motion denoiser over overlapping windows.
        latents = self._stage2(clip, stage1, progress)
        return latents[:, :, : clip.inputs.num_frames]

    def _stage1(self, clip: Clip, progress: ProgressCallback) -> torch.Tensor:
        """Each frame alone: frame 0 from the base noise, frame i from frame i-1's result
        re-noised to the first step with the same base noise."""
        num_frames = clip.inputs.num_frames
        steps = min(clip.settings.stage1_steps, clip.settings.steps)
        base_noise = draw_noise(clip.generator, clip.ref_latents.shape, self.device)
        latent = base_noise * fresh_schedule(self.scheduler, steps, self.device).init_noise_sigma
        frames = []
        progress(ProgressEvent("stage 1", 0, num_frames, "frames"))
        for index in range(num_frames):
            schedule = fresh_schedule(self.scheduler, steps, self.device)
            if index > 0:
                latent = schedule.add_noise(latent, base_noise, schedule.timesteps[:1])
            latent = self._denoise_alone(clip, latent, schedule, [index], schedule.timesteps)
            frames.append(latent)
            progress(ProgressEvent("stage 1", index + 1, num_frames, "frames"))
        return torch.cat(frames, dim=2)

    def _stage2(self, clip: Clip, stage1: torch.Tensor, progress: ProgressCallback) -> torch.Tensor:
        """The stage-1 latents, padded and re-noised, denoised window by window; each
        step averages the windows' noise predictions frame by frame, then guides."""
        num_frames = clip.inputs.num_frames
        plan = plan_windows(num_frames, clip.settings.window, clip.settings.overlap)
        schedule = fresh_schedule(self.scheduler, clip.settings.steps, self.device)
        # The official padding repeats the second-to-last stage-1 latent (with the last frame's control).
        pad_source = max(num_frames - 2, 0)
        padding = stage1[:, :, pad_source : pad_source + 1].expand(-1, -1, plan.length - num_frames, -1, -1)
        latents = torch.cat([stage1, padding], dim=2)
        _, channels, _, h, w = latents.shape
        base_noise = draw_noise(clip.generator, (1, channels, plan.noise_frames, h, w), self.device)[:, :, : plan.length]
        latents = schedule.add_noise(latents, base_noise, schedule.timesteps[:1])

        def conditions(start: int, stop: int) -> tuple[ControlFeatures, dict]:
            return self._control(clip, range(start, stop)), {}

        steps = denoising_steps(schedule, "stage 2", progress)
        return self._denoise_windows(clip, latents, schedule, plan.windows, conditions, steps)

    def _control(self, clip: Clip, frames: range | list[int]) -> ControlFeatures:
        """Control features of consecutive frames of the padded clip, computed now (only the
        window in hand is ever held): frames past the clip repeat the last real frame's;
        with guidance the unconditional features come first in the batch."""
        start, stop = frames[0], frames[-1] + 1
        real_stop = min(stop, clip.inputs.num_frames)
        features = self._control_features(clip.inputs.control(start, real_stop))
        if stop > real_stop:
            repeats = stop - real_stop
            features = {k: torch.cat([v, v[:, :, -1:].expand(-1, -1, repeats, -1, -1)], dim=2) for k, v in features.items()}
        return with_unconditional(features, clip.negative_control)

    def _control_features(self, frames: DrivingFrames) -> ControlFeatures:
        """The control net on the condition and the inputs the control kind names."""
        require_control_inputs(self.control, frames)
        inputs = [getattr(frames, name).to(self.device) for name in self.control.inputs]
        return self.control_net(frames.condition.to(self.device), *inputs)

    def _unconditional_driving(self, inputs: SamplerInputs) -> DrivingFrames:
        """The driving frame of guidance's unconditional half: a blank (-1) condition image, and each input
        from the SamplerInputs field the control kind's `unconditional` names, else zeros."""
        given = {name: getattr(inputs, field) for name, field in self.control.unconditional}
        absent = [field for name, field in self.control.unconditional if given[name] is None]
        if absent:
            raise ValueError(f"guidance with the {self.control.name} control needs {', '.join(absent)}")
        first = inputs.control(0, 1)
        zeroed = [name for name in self.control.inputs if name not in given]
        require_control_inputs(self.control, first, zeroed)
        return unconditional_frames(first, zeroed, given)
