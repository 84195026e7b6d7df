"""The HelloMeme v5, v5b and v5c samplers (official `HM5VideoPipeline` and `HM5ImagePipeline`).

Video (v5, v5b):

1. Reference: the VAE encodes the reference image (its latent distribution sampled with
   the generator); the reference net caches its features once per clip, the unconditional
   half on a zero latent (`Sampler._prepare`, common.py).
2. Noise: one tensor of F + 13 frames for every pass; a pass over n frames takes its
   first n frames, whatever the frames are.
3. Recursive passes (official `gen_video`): more than 12 frames are split into windows of
   12 sharing one frame (stride 11); the windows' first and last frames are denoised first
   by a pass one level deeper, and the reference net's caches of their results become the
   motion pad states of every window at this level. Each pass is a fresh DPM-Solver++ SDE
   schedule; each step averages the windows' predictions frame by frame, guides, steps.
4. Decode: the VAE turns the latents into frames, batch by batch, as an iterator.

Image (v5, v5b, v5c; `Sampler.sample_image`): one frame, no motion modules, the same
schedule; v5c's reference net also gets the reference image's own control
(`SamplerInputs.reference_control`).

Control features are made once per window and pass (common.WindowInputs), from the
`ControlSource`, never for the whole clip at once; only the frames of the clip's latents (4 x h x w each)
and the margin frames' pad states are held for the whole clip.

Randomness comes from one CPU `torch.Generator`, drawn in float32 in the official order:
reference latent, input noise, then one draw per scheduler step (deepest pass first). The
generator is handed to every scheduler step that takes one: the official pipelines hand it over
only when their own, never stepped, `scheduler` component accepts one, else the SDE noise
comes from torch's global random state.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from hellomeme_cli.models import HM5ControlNetBase, HM5DenoisingNet, HM5ReferenceNet, HM5SD15ControlProj, motion_pad_states
from hellomeme_cli.models.unet import ControlFeatures, ReferenceCache
from hellomeme_cli.progress import ProgressCallback
from hellomeme_cli.samplers.common import (
    Clip, DrivingFrames, Sampler, SamplerInputs, SamplerSettings, StepCallback, consecutive_runs, denoising_steps, draw_noise, fresh_schedule,
    pipeline_attributes, require_control_inputs, unconditional_frames, with_unconditional,
)
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


class HM5VideoSampler(Sampler):
    """Turns a reference image, prompt embeddings and per-frame driving signals into video
    latents (v5, v5b) or one image (v5, v5b, v5c) with the HelloMeme v5-family networks.
    Of `SamplerSettings` only steps and guidance apply: the windows are fixed."""

    pipeline_arguments = {
        **pipeline_attributes("control_proj", control="control_kind"),
        # its one denoiser, with motion modules for video runs
        "denoiser": lambda pipeline: pipeline.denoiser_motion or pipeline.denoiser_2d,
        "reference_control": lambda pipeline: pipeline.version.reference_control,
    }

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
        is copied fresh for every pass.
        `reference_control` (v5c): the reference net also gets the reference image's own control."""
        unknown = [name for name in control.inputs if name not in _CONTROL_KEYWORDS]
        if unknown:
            raise ValueError(f"HM5ControlNetBase takes no control input {', '.join(unknown)}")
        super().__init__(
            reference_net, control_net, vae_encoder, vae_decoder, scheduler=scheduler or hm5_scheduler(), device=device or denoiser.unet.device
        )
        self.denoiser = denoiser
        self.control_proj = control_proj
        self.control = control
        self.reference_control = reference_control

    @property
    def denoiser_2d(self) -> HM5DenoisingNet:
        """The one denoiser, its motion modules off (images)."""
        return self.denoiser

    @property
    def denoiser_motion(self) -> HM5DenoisingNet:
        """The one denoiser, its motion modules on where a pass asks (`use_motion`)."""
        return self.denoiser

    def _check_video_networks(self) -> None:
        if self.denoiser.motion_adapter is None:
            raise ValueError("video sampling needs the motion adapter (hm5_motion) in the denoiser")

    def _prepare(
        self, inputs: SamplerInputs, settings: SamplerSettings, generator: torch.Generator, on_step: StepCallback | None, picture: bool = False
    ) -> Clip:
        """Refuses a v5c clip without the reference's own control before anything runs."""
        if self.reference_control and inputs.reference_control is None:
            raise ValueError("this version's reference net needs the reference image's own control (reference_control)")
        return super()._prepare(inputs, settings, generator, on_step, picture)

    def _reference_inputs(self, inputs: SamplerInputs, negative_control: ControlFeatures | None) -> dict[str, object]:
        """v5c: the reference image's own control, the unconditional control first with guidance."""
        if not self.reference_control:
            return {}
        return {"control": with_unconditional(self._control_features(inputs.reference_control), negative_control)}

    @staticmethod
    def windows(num_frames: int, settings: SamplerSettings) -> tuple[tuple[int, int], ...]:
        """The top pass's windows (the official 12 frames, neighbours sharing one)."""
        return plan_hm5_windows(num_frames)

    def _denoise_video(self, clip: Clip, progress: ProgressCallback) -> torch.Tensor:
        """`sample` after step 1: the clip's latents, (1, 4, F, h, w)."""
        # 2. One noise tensor for every pass.
        _, channels, _, h, w = clip.ref_latents.shape
        noise = draw_noise(clip.generator, (1, channels, clip.inputs.num_frames + WINDOW + 1, h, w), self.device)

        # 3. The recursive passes, margin frames first.
        return self._denoise(clip, list(range(clip.inputs.num_frames)), {}, noise, 0, progress)

    def _denoise(
        self,
        clip: Clip,
        frames: list[int],
        pads: dict[int, ReferenceCache],
        noise: torch.Tensor,
        depth: int,
        progress: ProgressCallback,
    ) -> torch.Tensor:
        """One pass (official `gen_video`) over `frames` -> their latents (1, 4, n, h, w).
        A pass below the top leaves each of its frames' reference-net cache in `pads`."""
        margins = margin_frames(frames)
        if margins:
            self._denoise(clip, margins, pads, noise, depth + 1, progress)

        schedule = fresh_schedule(self.scheduler, clip.settings.steps, self.device)
        latents = noise[:, :, : len(frames)] * schedule.init_noise_sigma

        def conditions(start: int, stop: int) -> tuple[ControlFeatures, dict]:
            window = frames[start:stop]
            pad = motion_pad_states(pads[window[0]], pads[window[-1]]) if window[0] in pads and window[-1] in pads else None
            return self._control(clip, window), {"motion_pad": pad, "use_motion": True}

        steps = denoising_steps(schedule, "denoise" if depth == 0 else f"margin frames (level {depth})", progress)
        latents = self._denoise_windows(clip, latents, schedule, plan_hm5_windows(len(frames)), conditions, steps)

        if depth > 0:
            # Pad states: the reference net on each result, with the denoiser's prompt (as official).
            for position, frame in enumerate(frames):
                pads[frame] = self._reference_cache(latents[:, :, position], clip.text, clip.settings.uses_guidance)
        return latents

    def _control(self, clip: Clip, frames: list[int]) -> ControlFeatures:
        """The 8 control residuals of `frames` (any, in order; asked of the source run by run of
        consecutive frames), (b, c, n, h', w'); with guidance the unconditional half first."""
        parts = [self._control_features(clip.inputs.control(start, stop)) for start, stop in consecutive_runs(frames)]
        return with_unconditional({key: torch.cat([part[key] for part in parts], dim=2) for key in parts[0]}, clip.negative_control)

    def _control_features(self, frames: DrivingFrames) -> ControlFeatures:
        """HM5SD15ControlProj(HM5ControlNetBase(condition, expression)) of the given frames."""
        require_control_inputs(self.control, frames)
        expression = {_CONTROL_KEYWORDS[name]: getattr(frames, name).to(self.device) for name in self.control.inputs}
        return self.control_proj(self.control_net(frames.condition.to(self.device), **expression))

    def _unconditional_driving(self, inputs: SamplerInputs) -> DrivingFrames:
        """The driving frame of guidance's unconditional half (official: from frame 0's shapes): a
        blank (-1) condition image and zero expression inputs."""
        first = inputs.control(0, 1)
        require_control_inputs(self.control, first)
        return unconditional_frames(first, self.control.inputs)
