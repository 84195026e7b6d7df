"""The HelloMeme v3/v4 samplers (official `HM3VideoPipeline.gen_video`, `HM3ImagePipeline`).

Video, coarse to fine over windows of `window` (12) frames, consecutive windows sharing
one frame (stride 11):

1. Reference: the VAE encodes the reference image (its latent distribution sampled with
   the generator); the clip's base noise is drawn; the reference net caches its features.
2. Plan: a clip longer than a window is cut into windows; the first and last frame of
   every window form a shorter clip, planned the same way, until one window holds it all.
3. Deepest level: a margin pass (the 2D denoiser, no motion) makes that level's first and
   last frame; their reference-net features are their motion pads.
4. Every level, deepest first: the motion denoiser on each window, with the pads of the
   window's first and last frame; the predictions averaged where windows share a frame.
   A level above the clip leaves a pad for each frame it made.
5. Decode: the VAE turns the latents into frames, batch by batch, as an iterator.

Image: one frame with the 2D denoiser and DPM-Solver++ SDE, which draws noise each step.

Control features are computed per window when a window needs them (never for the whole
clip), like v1's. Randomness comes from one CPU `torch.Generator` in the official order:
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
import inspect

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from hellomeme_cli.models import HM3DenoisingNet, HM3ReferenceNet
from hellomeme_cli.models.unet import ControlFeatures, ReferenceCache
from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress
from hellomeme_cli.versions import DPM_SDE, SD15_SCHEDULE
from hellomeme_cli.samplers.common import LoadedNetworks, DrivingFrames, LatentCodec, SamplerInputs, SamplerSettings, cfg_batch, or_default, draw_noise, guide, fresh_schedule


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


@dataclasses.dataclass
class _Clip:
    """What every denoiser call of one clip shares."""

    settings: SamplerSettings
    inputs: SamplerInputs
    generator: torch.Generator
    text: torch.Tensor
    reference: ReferenceCache
    negative_control: ControlFeatures | None
    pads: dict[int, ReferenceCache]


class HM3VideoSampler(LatentCodec):
    """Turns a reference image, prompt embeddings and per-frame driving signals into video
    latents with the HelloMeme v3 or v4 networks (same interface as `sampler.VideoSampler`).

    `SamplerSettings.window` is the window length (official 12); `overlap` and
    `stage1_steps` are not used: v3/v4 windows always share exactly one frame, and there is
    no stage 1 (the official pipeline accepts `chunk_overlap` and ignores it)."""

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
        if denoiser_2d.is_motion or (denoiser_motion is not None and not denoiser_motion.is_motion):
            raise ValueError("denoiser_2d must be the 2D denoiser and denoiser_motion the motion denoiser")
        self.reference_net = reference_net
        self.denoiser_2d = denoiser_2d
        self.denoiser_motion = denoiser_motion
        self.control_net = control_net
        self.control_proj = control_proj
        self.vae_encoder = vae_encoder
        self.vae_decoder = vae_decoder or vae_encoder
        self.scheduler = scheduler or official_video_scheduler()
        self.image_scheduler = image_scheduler or official_image_scheduler()
        self.device = device or denoiser_2d.unet.device
        self.pad_device = pad_device or self.device

    @classmethod
    def from_pipeline(cls, pipeline: LoadedNetworks) -> HM3VideoSampler:
        """On a loaded pipeline's networks and its video and image schedulers."""
        return cls(
            pipeline.reference_net, pipeline.denoiser_2d, pipeline.denoiser_motion, pipeline.control_net,
            pipeline.vae_encoder, pipeline.vae_decoder, control_proj=pipeline.control_proj, scheduler=pipeline.scheduler,
            image_scheduler=pipeline.image_scheduler or pipeline.scheduler, device=pipeline.device,
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
        # 1. Reference latent, base noise, the reference cache and the unconditional control.
        ref_latents = self._encode_reference(inputs, generator)
        _, channels, _, h, w = ref_latents.shape
        base_noise = draw_noise(generator, (1, channels, inputs.num_frames + settings.window + 1, h, w), self.device)
        base_noise = base_noise[:, :, : inputs.num_frames]
        clip = self._prepare(inputs, settings, generator, ref_latents)

        # 2. The plan: every level's frames and windows, and the denoising passes to report.
        levels = plan_levels(inputs.num_frames, settings.window)
        passes = sum(len(level.windows) for level in levels) + 1  # + the margin pass
        total = passes * len(fresh_schedule(self.scheduler, settings.steps, self.device).timesteps)
        done = [0]

        def advance(count: int) -> None:
            done[0] += count
            progress(ProgressEvent("denoise", done[0], total, "steps"))

        progress(ProgressEvent("denoise", 0, total, "steps"))
        # 3. The deepest level's margin pass: its first and last frame alone, then their pads.
        deepest = levels[-1]
        self._margin_pass(clip, base_noise, (deepest.indexes[0], deepest.indexes[-1]), advance)

        # 4. Every level, deepest first; a level above the clip leaves pads for its frames.
        for level in reversed(levels):
            latents = self._generate_level(clip, level, base_noise, advance)
            if level.depth > 0:
                for window in level.windows:
                    for position in window:
                        self._make_pad(clip, level.indexes[position], latents[:, :, position])
        return latents / self.vae_encoder.config.scaling_factor

    @torch.no_grad()
    def sample_image(
        self,
        inputs: SamplerInputs,
        settings: SamplerSettings,
        generator: torch.Generator,
        progress: ProgressCallback = no_progress,
    ) -> torch.Tensor:
        """One frame, as the official `HM3ImagePipeline`: from noise, every step with the 2D
        denoiser and DPM-Solver++ SDE -> (1, 4, 1, h, w) / scaling factor."""
        schedule = fresh_schedule(self.image_scheduler, settings.steps, self.device)
        ref_latents = self._encode_reference(inputs, generator)
        latent = draw_noise(generator, ref_latents.shape, self.device) * schedule.init_noise_sigma
        clip = self._prepare(inputs, settings, generator, ref_latents)
        control = self._control(clip, (0,))
        steps = len(schedule.timesteps)
        progress(ProgressEvent("denoise", 0, steps, "steps"))
        for step, timestep in enumerate(schedule.timesteps):
            noise = guide(self._predict(self.denoiser_2d, latent, schedule, timestep, clip, control), settings)
            latent = _step(schedule, noise[:, :, 0], timestep, latent[:, :, 0], clip.generator).unsqueeze(2)
            progress(ProgressEvent("denoise", step + 1, steps, "steps"))
        return latent / self.vae_encoder.config.scaling_factor

    def _prepare(
        self, inputs: SamplerInputs, settings: SamplerSettings, generator: torch.Generator, ref_latents: torch.Tensor
    ) -> _Clip:
        """The reference cache (its unconditional half on a zero latent, as official), the
        guidance-batched prompt embeddings and the unconditional control."""
        guided = settings.uses_guidance
        reference_text = cfg_batch(
            or_default(inputs.reference_negative_text_embeds, inputs.negative_text_embeds),
            or_default(inputs.reference_text_embeds, inputs.text_embeds),
            guided,
        ).to(self.device)
        return _Clip(
            settings=settings,
            inputs=inputs,
            generator=generator,
            text=cfg_batch(inputs.negative_text_embeds, inputs.text_embeds, guided).to(self.device),
            reference=self.reference_net(cfg_batch(torch.zeros_like(ref_latents), ref_latents, guided), reference_text),
            negative_control=self._negative_control(inputs) if guided else None,
            pads={},
        )

    def _margin_pass(self, clip: _Clip, base_noise: torch.Tensor, margin: tuple[int, int], advance) -> None:
        """The deepest level's first and last frame, both from noise position 0, with the 2D
        denoiser; then their pads (a pad, once made, is never replaced)."""
        schedule = fresh_schedule(self.scheduler, clip.settings.steps, self.device)
        latents = base_noise[:, :, [0, 0]] * schedule.init_noise_sigma
        control = self._control(clip, margin)
        for timestep in schedule.timesteps:
            noise = guide(self._predict(self.denoiser_2d, latents, schedule, timestep, clip, control), clip.settings)
            latents = _step(schedule, noise, timestep, latents, clip.generator)
            advance(1)
        for position, index in enumerate(margin):
            self._make_pad(clip, index, latents[:, :, position])

    def _generate_level(self, clip: _Clip, level: Level, base_noise: torch.Tensor, advance) -> torch.Tensor:
        """The frames of one level from the base noise by position; each step averages the
        windows' predictions where they share a frame, then guides."""
        schedule = fresh_schedule(self.scheduler, clip.settings.steps, self.device)
        latents = base_noise[:, :, : len(level.indexes)] * schedule.init_noise_sigma
        coverage = torch.zeros(len(level.indexes), device=self.device)
        for window in level.windows:
            coverage[list(window)] += 1
        coverage = coverage.view(1, 1, -1, 1, 1)
        noise_sum = torch.zeros((2 if clip.settings.uses_guidance else 1, *latents.shape[1:]), device=self.device)
        for timestep in schedule.timesteps:
            noise_sum.zero_()
            for window in level.windows:
                frames = [level.indexes[p] for p in window]
                control = self._control(clip, frames)
                first, last = clip.pads[frames[0]], clip.pads[frames[-1]]
                pads = {k: torch.cat([first[k], last[k]], dim=2).to(self.device) for k in first}
                noise_sum[:, :, list(window)] += self._predict(
                    self.denoiser_motion, latents[:, :, list(window)], schedule, timestep, clip, control, pads
                )
            noise = guide(noise_sum / coverage, clip.settings)
            latents = _step(schedule, noise, timestep, latents, clip.generator)
            advance(len(level.windows))
        return latents

    def _make_pad(self, clip: _Clip, index: int, latent: torch.Tensor) -> None:
        """The motion pad of frame `index` from its latent (1, 4, h, w): the reference net's
        features (unconditional half on a zero latent) with the denoiser's prompt, as official."""
        if index in clip.pads:
            return
        guided = clip.settings.uses_guidance
        cache = self.reference_net(cfg_batch(torch.zeros_like(latent), latent, guided), clip.text)
        clip.pads[index] = {k: v.unsqueeze(2).to(self.pad_device) for k, v in cache.items()}

    @staticmethod
    def _predict(
        denoiser: HM3DenoisingNet,
        latents: torch.Tensor,
        schedule: SchedulerMixin,
        timestep: torch.Tensor,
        clip: _Clip,
        control: ControlFeatures,
        motion_pads: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The (unconditional, conditional) noise predictions in one network call, float32."""
        model_input = schedule.scale_model_input(cfg_batch(latents, latents, clip.settings.uses_guidance), timestep)
        return denoiser(model_input, timestep, clip.text, clip.reference, control, motion_pads).float()

    def _control(self, clip: _Clip, frames) -> ControlFeatures:
        """Control features of the given clip frames (any order, repeats allowed), computed
        now for this window only; with guidance the unconditional features come first."""
        runs: list[list[int]] = []  # consecutive frames are asked of the source in one call
        for frame in frames:
            if runs and frame == runs[-1][-1] + 1:
                runs[-1].append(frame)
            else:
                runs.append([frame])
        parts = [clip.inputs.control(run[0], run[-1] + 1) for run in runs]
        driving = DrivingFrames(*(_cat_field(parts, field.name) for field in dataclasses.fields(DrivingFrames)))
        features = self._control_features(driving)
        if clip.negative_control is None:
            return features
        negative = clip.negative_control
        return {k: torch.cat([negative[k].expand(-1, -1, len(frames), -1, -1), v], dim=0) for k, v in features.items()}

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

    def _negative_control(self, inputs: SamplerInputs) -> ControlFeatures:
        """The unconditional control of one frame: a blank (-1) condition and zero drive
        inputs (zero pd_fpg too: v1's `neg_pd_fpg` is not used by v3/v4)."""
        first = inputs.control(0, 1)
        zeros = {
            name: None if getattr(first, name) is None else torch.zeros_like(getattr(first, name))
            for name in ("drive_coeff", "face_parts", "pd_fpg")
        }
        return self._control_features(DrivingFrames(torch.full_like(first.condition, -1.0), **zeros))


def _cat_field(parts: list[DrivingFrames], name: str) -> torch.Tensor | None:
    """One DrivingFrames field of consecutive parts joined on its frame axis."""
    values = [getattr(part, name) for part in parts]
    if values[0] is None:
        return None
    return torch.cat(values, dim=2 if name == "condition" else 1)


def _step(
    schedule: SchedulerMixin,
    noise: torch.Tensor,
    timestep: torch.Tensor,
    latents: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """One scheduler step; a stochastic one draws from `generator` (a `step` without a
    generator parameter draws nothing)."""
    if "generator" in inspect.signature(schedule.step).parameters:
        return schedule.step(noise, timestep, latents, generator=generator).prev_sample
    return schedule.step(noise, timestep, latents).prev_sample
