"""The animate pipeline: reference and driving clip in, mp4 out, as numbered steps.

1. read the reference picture; track the driving clip (one decode) or load its motion template
2. the output's timing and the driving signals: crops, head pose, expression, face-part embeddings
3. the reference net's cache and the prompt (once per clip)
4. the two-stage sampler (stage 1 per frame, stage 2 over overlapping windows)
5. decode and write the mp4 with the driving audio, frames streamed to the encoder
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .engine import HelloMemeModels, ModelOptions
from .errors import HellomemeError
from .pasteback import PasteBack, head_travel
from .progress import ProgressCallback, no_progress
from .sampler import DrivingFrames, SamplerInputs, SamplerSettings, VideoSampler
from .driving import prepare_driving, prepare_driving_image
from .signals import DrivingSignals, ReferenceFace, prepare_reference
from .tracking import track_image
from .video import check_destination, read_image, write_image, write_video

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")
SEED_TAG = "hellomeme_seed"  # the output's metadata key holding the seed it was made with


@dataclasses.dataclass(frozen=True)
class AnimateSettings:
    """Everything a run depends on besides its inputs; the CLI builds it from its options."""

    models: ModelOptions = ModelOptions()
    steps: int = 25
    guidance: float = 2.0
    seed: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    trans_ratio: float = 0.0
    prompt: str = ""
    negative_prompt: str = ""
    window: int = 12
    overlap: int = 4
    crop: bool = True
    face_index: int = 0
    smoothing: bool = True
    size: int = 512
    paste_back: bool = False

    def __post_init__(self) -> None:
        problems = [
            (self.steps < 1, f"--steps must be at least 1 (got {self.steps})"),
            (not math.isfinite(self.guidance) or self.guidance < 1, f"--guidance must be at least 1 (got {self.guidance})"),
            (self.fps is not None and not (0 < self.fps <= 240), f"--fps must be in (0, 240] (got {self.fps})"),
            (self.max_frames is not None and self.max_frames < 1, f"--max-frames must be at least 1 (got {self.max_frames})"),
            (not 0 <= self.trans_ratio <= 1, f"--trans-ratio must be in [0, 1] (got {self.trans_ratio})"),
            (self.window < 2, f"--window must be at least 2 (got {self.window})"),
            (not 0 <= self.overlap < self.window, f"--overlap must be in [0, window) = [0, {self.window}) (got {self.overlap})"),
            (self.seed is not None and not 0 <= self.seed < 2**32, f"--seed must be in [0, 2^32) (got {self.seed})"),
            (self.face_index < 0, f"--face-index must be at least 0 (got {self.face_index})"),
            (self.size < 128 or self.size % 64, f"--size must be a multiple of 64, at least 128 (got {self.size})"),
        ]
        for bad, message in problems:
            if bad:
                raise HellomemeError(message)

    def with_seed(self) -> "AnimateSettings":
        """The same settings with a seed chosen now if none was given, so it can be reported."""
        return self if self.seed is not None else dataclasses.replace(self, seed=secrets.randbelow(2**32))


@dataclasses.dataclass(frozen=True)
class AnimateResult:
    output: Path
    frames: int
    fps: float
    seed: int
    faceless_frames: int  # driving frames with no face, filled from their neighbours
    seconds: float
    repeated_frames: int = 0  # output frames repeating a driving frame (the output rate is above the clip's)
    dropped_frames: int = 0  # driving frames no output frame shows (the output rate is below the clip's)


@dataclasses.dataclass(frozen=True)
class Reference:
    """The reference picture, read and its face found, before any model is loaded (so a picture
    without a face fails in a second, and a batch with one reference does this once)."""

    path: Path
    face: ReferenceFace
    picture: np.ndarray  # the whole picture, for --paste-back


def load_reference(path: Path, settings: AnimateSettings, face_model: Path) -> Reference:
    image = read_image(path)
    track = track_image(image, name=str(path), model_path=face_model)
    return Reference(path, prepare_reference(image, track, settings.size, settings.crop), image)


def animate(
    reference: Reference,
    driving: Path,
    output: Path,
    settings: AnimateSettings,
    models: HelloMemeModels,
    *,
    force: bool = False,
    progress: ProgressCallback = no_progress,
    extra_tags: Mapping[str, str] | None = None,
    track_cache: Path | None = None,
) -> AnimateResult:
    """Give the reference portrait the driving clip's motion (or a motion template's); write `output`
    (mp4 with the clip's audio, silent from a template, its metadata naming the seed, plus
    `extra_tags`). With `track_cache` a clip tracked before with the same tracking settings is not
    tracked again."""
    started = time.monotonic()
    settings = settings.with_seed()
    check_destination(output, force, [reference.path, driving])

    # 1 and 2. Track the driving clip (decoded once) or load its template, the output's timing, the driving signals.
    drive = prepare_driving(driving, reference.face, settings, models, progress=progress, track_cache=track_cache)
    signals, fps = drive.signals, drive.timing.rate

    # 3 and 4. Prompt, reference cache and the two-stage sampler.
    sampler = _sampler(models)
    latents = sampler.sample(
        _sampler_inputs(reference.face, signals, settings, models),
        _sampler_settings(settings),
        torch.Generator().manual_seed(settings.seed),
        progress,
    )

    # 5. Decode straight into the encoder, with the driving clip's audio.
    frames = (frame for batch in sampler.decode(latents, progress=progress) for frame in batch)
    if settings.paste_back:
        frames = PasteBack.from_reference(reference.picture, reference.face, travel=head_travel(signals))(frames)
    metadata = {"comment": f"hellomeme {__version__} seed={settings.seed}", SEED_TAG: str(settings.seed), **(extra_tags or {})}
    write_video(
        frames, output, fps, audio_from=drive.audio, metadata=metadata, force=force, protect=[reference.path, driving],
        progress=progress, total=len(signals),
    )
    return AnimateResult(
        output, len(signals), float(fps), settings.seed, drive.faceless_frames, time.monotonic() - started,
        drive.timing.repeated, drive.timing.dropped,
    )


def render_image(
    reference: Reference,
    driving_image: Path,
    output: Path,
    settings: AnimateSettings,
    models: HelloMemeModels,
    *,
    force: bool = False,
    progress: ProgressCallback = no_progress,
) -> int:
    """One picture: the reference with the head pose and expression of `driving_image` (official
    image pipeline: all steps with the 2D denoiser); returns the seed used."""
    settings = settings.with_seed()
    check_destination(output, force, [reference.path, driving_image])
    signals = prepare_driving_image(driving_image, reference.face, settings, models, progress=progress)
    sampler = _sampler(models)
    latents = sampler.sample_image(
        _sampler_inputs(reference.face, signals, settings, models),
        _sampler_settings(settings),
        torch.Generator().manual_seed(settings.seed),
        progress,
    )
    frame = next(sampler.decode(latents))[0]
    if settings.paste_back:
        frame = PasteBack.from_reference(reference.picture, reference.face).paste(frame)
    write_image(frame, output, force=force, protect=[reference.path, driving_image])
    return settings.seed


def _sampler(models: HelloMemeModels) -> VideoSampler:
    return VideoSampler(
        models.reference_net, models.denoiser_2d, models.denoiser_motion, models.control_net, models.vae_encoder, models.vae_decoder
    )


def _sampler_settings(settings: AnimateSettings) -> SamplerSettings:
    return SamplerSettings(steps=settings.steps, guidance=settings.guidance, window=settings.window, overlap=settings.overlap)


def _sampler_inputs(
    reference: ReferenceFace, signals: DrivingSignals, settings: AnimateSettings, models: HelloMemeModels
) -> SamplerInputs:
    prompt = models.encode_prompt(settings.prompt, settings.negative_prompt)
    ref_image = torch.from_numpy(reference.image).permute(2, 0, 1)[None].float() / 127.5 - 1.0

    def control(start: int, stop: int) -> DrivingFrames:
        inputs = signals.control_inputs(start, stop)
        inputs.pop("neg_pd_fpg", None)
        return DrivingFrames(**inputs)

    return SamplerInputs(
        ref_image=ref_image,
        text_embeds=prompt.positive,
        negative_text_embeds=prompt.negative,
        control=control,
        num_frames=len(signals),
        neg_pd_fpg=signals.neg_pd_fpg,
        reference_text_embeds=prompt.reference,
        reference_negative_text_embeds=prompt.reference_negative,
    )


def default_output(reference: Path, driving: Path, suffix: str = ".mp4", folder: Path | None = None) -> Path:
    """`<reference>_<driving>.mp4` in the current folder (or `folder`)."""
    return (folder or Path.cwd()) / f"{reference.stem}_{driving.stem}{suffix}"
