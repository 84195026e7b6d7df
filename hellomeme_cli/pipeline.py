"""The animate pipeline: reference and driving clip in, mp4 out, as numbered steps.

1. read and track the driving clip, and the reference picture
2. driving signals: crops, head pose, expression, face-part embeddings
3. the reference net's cache and the prompt (once per clip)
4. the two-stage sampler (stage 1 per frame, stage 2 over overlapping windows)
5. decode and write the mp4 with the driving audio, frames streamed to the encoder
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .engine import HelloMemePipeline, ModelOptions
from .errors import HellomemeError
from .pasteback import PasteBack, head_travel
from .progress import ProgressCallback, no_progress
from .sampler import DrivingFrames, SamplerInputs, SamplerSettings, VideoSampler
from .signals import DrivingSignals, ReferenceFace, build_driving_signals, prepare_reference
from .tracking import FaceTrack, Smoothing, track_image, track_video
from .video import check_destination, probe_video, read_frames, read_image, write_image, write_video

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
    models: HelloMemePipeline,
    *,
    force: bool = False,
    progress: ProgressCallback = no_progress,
    extra_tags: Mapping[str, str] | None = None,
) -> AnimateResult:
    """Give the reference portrait the driving clip's motion; write `output` (mp4 with the clip's audio,
    its metadata naming the seed, plus `extra_tags`)."""
    started = time.monotonic()
    settings = settings.with_seed()
    check_destination(output, force, [reference.path, driving])

    # 1. Read and track the driving clip (the reference picture was read by `load_reference`).
    info = probe_video(driving)
    track = track_video(
        driving,
        face_index=settings.face_index,
        smoothing=Smoothing() if settings.smoothing else None,
        max_frames=settings.max_frames,
        model_path=models.face_model,
        progress=progress,
    )
    fps, shown = output_timing(len(track), info.rate, settings)
    track = select_frames(track, shown, float(fps))

    # 2. Driving signals: head pose, expression, face-part embeddings (frames read a second time, streamed).
    shown_frames = frames_at(read_frames(driving, settings.max_frames), shown)
    signals = _driving_signals(track, shown_frames, reference, settings, models, progress)

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
        frames, output, fps, audio_from=driving, metadata=metadata, force=force, protect=[reference.path, driving],
        progress=progress, total=len(signals),
    )
    return AnimateResult(output, len(signals), float(fps), settings.seed, track.filled_count, time.monotonic() - started)


def render_image(
    reference: Reference,
    driving_image: Path,
    output: Path,
    settings: AnimateSettings,
    models: HelloMemePipeline,
    *,
    force: bool = False,
    progress: ProgressCallback = no_progress,
) -> int:
    """One picture: the reference with the head pose and expression of `driving_image` (official
    image pipeline: all steps with the 2D denoiser); returns the seed used."""
    settings = settings.with_seed()
    check_destination(output, force, [reference.path, driving_image])
    image = read_image(driving_image)
    track = track_image(image, face_index=settings.face_index, name=str(driving_image), model_path=models.face_model)
    signals = _driving_signals(track, [image], reference, settings, models, progress)
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


def _driving_signals(
    track: FaceTrack,
    frames: Iterable[np.ndarray],
    reference: Reference,
    settings: AnimateSettings,
    models: HelloMemePipeline,
    progress: ProgressCallback,
) -> DrivingSignals:
    return build_driving_signals(
        track,
        frames,
        reference.face,
        image_encoder=models.image_encoder,
        fan_encoder=models.fan_encoder,
        device=models.device,
        dtype=models.dtype,
        crop=settings.crop,
        trans_ratio=settings.trans_ratio,
        progress=progress,
    )


def _sampler(models: HelloMemePipeline) -> VideoSampler:
    return models.sampler()


def _sampler_settings(settings: AnimateSettings) -> SamplerSettings:
    return SamplerSettings(steps=settings.steps, guidance=settings.guidance, window=settings.window, overlap=settings.overlap)


def _sampler_inputs(
    reference: ReferenceFace, signals: DrivingSignals, settings: AnimateSettings, models: HelloMemePipeline
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


def output_timing(frame_count: int, rate: Fraction, settings: AnimateSettings) -> tuple[Fraction, np.ndarray]:
    """The output's exact frame rate, and which of the clip's `frame_count` frames shows at each of
    its frames (all of them, unless `settings.fps` asks for another rate)."""
    if settings.fps is None or math.isclose(settings.fps, float(rate), rel_tol=1e-6):
        return rate, np.arange(frame_count)
    fps = Fraction(settings.fps).limit_denominator(1001)
    return fps, resample_indices(frame_count, float(rate), float(fps))


def select_frames(track: FaceTrack, indices: np.ndarray, fps: float) -> FaceTrack:
    """The track's rows at `indices` (repeats allowed), at a new frame rate."""
    return dataclasses.replace(
        track,
        landmarks=track.landmarks[indices],
        blendshapes=track.blendshapes[indices],
        matrices=track.matrices[indices],
        filled=track.filled[indices],
        fps=fps,
    )


def frames_at(frames: Iterable[np.ndarray], indices: np.ndarray) -> Iterator[np.ndarray]:
    """The frames at non-decreasing `indices` of a stream, each as often as it is named."""
    wanted = iter(indices.tolist())
    target = next(wanted, None)
    for index, frame in enumerate(frames):
        while target == index:
            yield frame
            target = next(wanted, None)
        if target is None:
            return


def default_output(reference: Path, driving: Path, suffix: str = ".mp4", folder: Path | None = None) -> Path:
    """`<reference>_<driving>.mp4` in the current folder (or `folder`)."""
    return (folder or Path.cwd()) / f"{reference.stem}_{driving.stem}{suffix}"


def resample_indices(frame_count: int, source_fps: float, target_fps: float) -> np.ndarray:
    """Which source frame shows at each output frame when the rate changes: the one on screen at
    that instant (as ffmpeg's fps filter picks), keeping the clip's duration."""
    if frame_count < 1:
        return np.zeros(0, dtype=np.int64)
    duration = frame_count / source_fps
    count = max(1, round(duration * target_fps))
    times = np.arange(count) / target_fps
    return np.minimum(np.floor(times * source_fps + 1e-6).astype(np.int64), frame_count - 1)
