"""The HelloMeme v3/v4 samplers (official `HM3VideoPipeline.gen_video`, `HM3ImagePipeline`).

Video, coarse to fine over windows of `window` (12) frames, consecutive windows sharing
one frame (stride 11):

1. Reference: the VAE encodes the reference image (its latent distribution sampled with
   the generator); the reference net caches its features (`Sampler._prepare`, common.py).
2. Noise: the clip's base noise is drawn.
3. Plan: a clip longer than a window is cut into windows; the first and last frame of
   every window form a shorter clip, planned the same way, until one window holds it all.
4. Deepest level: a margin pass (the 2D denoiser, no motion) makes that level's first and
   last frame; their reference-net features are their motion pads.
5. Every level, deepest first: the motion denoiser on each window, with the pads of the
   window's first and last frame; the predictions averaged where windows share a frame.
   A level above the clip leaves a pad for each frame it made.
6. Decode: the VAE turns the latents into frames, batch by batch, as an iterator.

Image (`Sampler.sample_image`): one frame with the 2D denoiser and DPM-Solver++ SDE, which
draws noise each step.

Control features are made per window once per pass (common.WindowInputs; never for the
whole clip at once), like v1's. Randomness comes from one CPU `torch.Generator` in the official order:
reference latent, base noise (F + window + 1 frames, only the first F used), then, for
the image only, one draw inside every SDE step: we always pass the generator to the
scheduler's `step` (the official image pipeline does only when its `scheduler`
component's `step` takes one, else the SDE noise comes from torch's global RNG).

Where the official code is wrong we are not: a clip whose window list ends in a 1-frame
window (23, 34, 45 ... frames) crashes officially (`pipline_hm3_video.py` line 219); we
drop that window, as the official v5 pipeline does (its frame is already the last frame of
the window before it).
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from hellomeme_cli.models import HM3DenoisingNet, HM3ReferenceNet
from hellomeme_cli.models.unet import ControlFeatures, ReferenceCache
from hellomeme_cli.progress import ProgressCallback
from hellomeme_cli.samplers.common import (
    Clip, DrivingFrames, Sampler, SamplerInputs, SamplerSettings, StepCount, check_denoisers, consecutive_runs, draw_noise, fresh_schedule,
    pipeline_attributes, unconditional_frames, with_unconditional,
)
from hellomeme_cli.versions import DPM_SDE, SD15_SCHEDULE


def official_video_scheduler() -> EulerDiscreteScheduler:
    """The official video schedule (every level and every margin pass), built by the official
    pipeline itself whatever the checkpoint's scheduler config."""
    return EulerDiscreteScheduler(**SD15_SCHEDULE)


def official_image_scheduler() -> DPMSolverMultistepScheduler:
    """The official image schedule: DPM-Solver++ SDE (draws noise at every step)."""
    return DPMSolverMultistepScheduler(**DPM_SDE)


@dataclasses.dataclass(frozen=True)
class Level:
    """One level of the coarse-to-fine recursion: the clip frames it generates, in order,
    and its windows as positions into `indexes` (noise is taken by position)."""

    depth: int
    indexes: tuple[int, ...]
    windows: tuple[tuple[int, ...], ...]

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        """The windows as positions [start, stop): each window is a run of consecutive positions."""
        return tuple((window[0], window[-1] + 1) for window in self.windows)


def plan_levels(num_frames: int, window: int = 12) -> list[Level]:
    """The recursion of `gen_video` over frames 0..num_frames-1, top level first.

    Windows start every `window - 1` positions; a trailing 1-frame window is dropped
    (officially a crash), its frame being the last of the window before it."""
    if num_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_frames}")
    if window < 2:
        raise ValueError(f"the v3 window must hold at least 2 frames, got {window}")
    levels = []
    indexes = tuple(range(num_frames))
    while True:
        count = len(indexes)
        if count <= window:
            levels.append(Level(len(levels), indexes, (tuple(range(count)),)))
            return levels
        stride = window - 1
        windows = [tuple(range(i, min(i + window, count))) for i in range(0, count, stride)]
        if len(windows[-1]) == 1:
            windows.pop()
        levels.append(Level(len(levels), indexes, tuple(windows)))
        indexes = tuple(sorted({indexes[w[0]] for w in windows} | {indexes[w[-1]] for w in windows}))


class HM3VideoSampler(Sampler):
    """Turns a reference image, prompt embeddings and per-frame driving signals into video
    latents with the HelloMeme v3 or v4 networks (same interface as `sampler.VideoSampler`).

    `SamplerSettings.window` is the window length (official 12); `overlap` and
    `stage1_steps` are not used: v3/v4 windows always share exactly one frame, and there is
    no stage 1 (the official pipeline accepts `chunk_overlap` and ignores it)."""

    pipeline_arguments = {
        **pipeline_attributes("denoiser_2d", "denoiser_motion", "control_proj"),
        "image_scheduler": lambda pipeline: pipeline.image_scheduler or pipeline.scheduler,
    }

    def __init__(
        self,
        reference_net: HM3ReferenceNet,
        denoiser_2d: HM3DenoisingNet,
        denoiser_motion: HM3DenoisingNet | None,
        control_net: torch.nn.Module,
        vae_encoder: AutoencoderKL,
        vae_decoder: AutoencoderKL | None = None,
        *,
        control_proj: torch.nn.Module | None = None,
        scheduler: SchedulerMixin | None = None,
        image_scheduler: SchedulerMixin | None = None,
        device: torch.device | None = None,
        pad_device: torch.device | None = None,
    ):
        """`control_net` is `HMV3ControlNet` (v3) or `HMControlNetBase` (v4, then
        `control_proj` = `HM4SD15ControlProj`). The drive signal follows the driving frames:
        ARKit when they carry drive_coeff (and face_parts), else PD-FGC (pd_fpg), as
        official. Schedulers default to the official ones (`official_video_scheduler`,
        `official_image_scheduler`). Without `denoiser_motion` only `sample_image` works.
        `pad_device` (default: `device`) keeps the motion pads, about one per 11 frames,
        each one reference-net feature cache; the CPU keeps long clips off the GPU, as
        the official code does."""
        check_denoisers(denoiser_2d, denoiser_motion)
        super().__init__(
            reference_net, control_net, vae_encoder, vae_decoder,
            scheduler=scheduler or official_video_scheduler(), image_scheduler=image_scheduler or official_image_scheduler(),
            device=device or denoiser_2d.unet.device,
        )
        self.denoiser_2d = denoiser_2d
        self.denoiser_motion = denoiser_motion
        self.control_proj = control_proj
        self.pad_device = pad_device or self.device

    @staticmethod
    def windows(num_frames: int, settings: SamplerSettings) -> tuple[tuple[int, int], ...]:
        """The top level's windows: every frame of the clip is made there."""
        return tuple((window[0], window[-1] + 1) for window in plan_levels(num_frames, settings.window)[0].windows)

    def _denoise_video(self, clip: Clip, progress: ProgressCallback) -> torch.Tensor:
        """`sample` after step 1: the clip's latents, (1, 4, F, h, w)."""
        # 2. The base noise: F + window + 1 frames drawn, as official; the first F used.
        num_frames, window = clip.inputs.num_frames, clip.settings.window
        _, channels, _, h, w = clip.ref_latents.shape
        base_noise = draw_noise(clip.generator, (1, channels, num_frames + window + 1, h, w), self.device)[:, :, :num_frames]

        # 3. The plan: every level's frames and windows, and the denoising passes to report.
        levels = plan_levels(num_frames, window)
        passes = sum(len(level.windows) for level in levels) + 1  # + the margin pass
        steps = len(fresh_schedule(self.scheduler, clip.settings.steps, self.device).timesteps)
        count = StepCount(progress, "denoise", passes * steps)

        # 4. The deepest level's margin pass: its first and last frame alone, then their pads.
        pads: dict[int, ReferenceCache] = {}
        deepest = levels[-1]
        self._margin_pass(clip, base_noise, (deepest.indexes[0], deepest.indexes[-1]), pads, count)

        # 5. Every level, deepest first; a level above the clip leaves pads for its frames.
        for level in reversed(levels):
            latents = self._generate_level(clip, level, base_noise, pads, count)
            if level.depth > 0:
                for window in level.windows:
                    for position in window:
                        self._make_pad(clip, pads, level.indexes[position], latents[:, :, position])
        return latents

    def _margin_pass(
        self, clip: Clip, base_noise: torch.Tensor, margin: tuple[int, int], pads: dict[int, ReferenceCache], count: StepCount
    ) -> None:
        """The deepest level's first and last frame, both from noise position 0, with the 2D
        denoiser; then their pads (a pad, once made, is never replaced)."""
        schedule = fresh_schedule(self.scheduler, clip.settings.steps, self.device)
        latents = base_noise[:, :, [0, 0]] * schedule.init_noise_sigma
        latents = self._denoise_alone(clip, latents, schedule, margin, count.steps(schedule))
        for position, index in enumerate(margin):
            self._make_pad(clip, pads, index, latents[:, :, position])

    def _generate_level(
        self, clip: Clip, level: Level, base_noise: torch.Tensor, pads: dict[int, ReferenceCache], count: StepCount
    ) -> torch.Tensor:
        """The frames of one level from the base noise by position, each window with the pads
        of its first and last frame."""
        schedule = fresh_schedule(self.scheduler, clip.settings.steps, self.device)
        latents = base_noise[:, :, : len(level.indexes)] * schedule.init_noise_sigma

        def conditions(start: int, stop: int) -> tuple[ControlFeatures, dict]:
            frames = level.indexes[start:stop]
            first, last = pads[frames[0]], pads[frames[-1]]
            motion_pads = {k: torch.cat([first[k], last[k]], dim=2).to(self.device) for k in first}
            return self._control(clip, frames), {"motion_pads": motion_pads}

        steps = count.steps(schedule, weight=len(level.windows))
        return self._denoise_windows(clip, latents, schedule, level.spans, conditions, steps)

    def _make_pad(self, clip: Clip, pads: dict[int, ReferenceCache], index: int, latent: torch.Tensor) -> None:
        """The motion pad of frame `index` from its latent (1, 4, h, w): the reference net's
        features with the denoiser's prompt, as official."""
        if index in pads:
            return
        cache = self._reference_cache(latent, clip.text, clip.settings.uses_guidance)
        pads[index] = {k: v.unsqueeze(2).to(self.pad_device) for k, v in cache.items()}

    def _control(self, clip: Clip, frames) -> ControlFeatures:
        """Control features of the given clip frames (any order, repeats allowed), computed
        now for this window only; with guidance the unconditional features come first."""
        parts = [clip.inputs.control(start, stop) for start, stop in consecutive_runs(frames)]
        driving = DrivingFrames(*(_cat_field(parts, field.name) for field in dataclasses.fields(DrivingFrames)))
        return with_unconditional(self._control_features(driving), clip.negative_control)

    def _control_features(self, frames: DrivingFrames) -> ControlFeatures:
        """The control net (then, for v4, the projector) on ARKit inputs when the frames have
        drive_coeff, else on PD-FGC's, as official."""
        condition = frames.condition.to(self.device)
        if frames.drive_coeff is not None:
            if frames.face_parts is None:
                raise ValueError("the ARKit control needs face_parts with drive_coeff in the driving frames")
            features = self.control_net(
                condition, drive_coeff=frames.drive_coeff.to(self.device), face_parts=frames.face_parts.to(self.device)
            )
        elif frames.pd_fpg is not None:
            features = self.control_net(condition, emo_embedding=frames.pd_fpg.to(self.device))
        else:
            raise ValueError("the v3/v4 control needs drive_coeff and face_parts, or pd_fpg, in the driving frames")
        return features if self.control_proj is None else self.control_proj(features)

    def _unconditional_driving(self, inputs: SamplerInputs) -> DrivingFrames:
        """The driving frame of guidance's unconditional half: a blank (-1) condition and zero drive
        inputs (zero pd_fpg too: v1's `neg_pd_fpg` is not used by v3/v4)."""
        first = inputs.control(0, 1)
        present = [name for name in ("drive_coeff", "face_parts", "pd_fpg") if getattr(first, name) is not None]
        return unconditional_frames(first, present)


def _cat_field(parts: list[DrivingFrames], name: str) -> torch.Tensor | None:
    """One DrivingFrames field of consecutive parts joined on its frame axis."""
    values = [getattr(part, name) for part in parts]
    if values[0] is None:
        return None
    return torch.cat(values, dim=2 if name == "condition" else 1)
