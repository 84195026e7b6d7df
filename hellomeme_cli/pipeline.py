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
import time
from collections.abc import Iterable, Iterator, Mapping
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .engine import HelloMemePipeline, check_options
from .errors import HellomemeError
from .pasteback import PasteBack, head_travel
from .progress import ProgressCallback, no_progress
from .sampler import DrivingFrames, SamplerInputs, SamplerSettings, VideoSampler
from .settings import AnimateSettings
from .signals import DrivingSignals, ReferenceFace, build_driving_signals, prepare_reference
from .tracking import MODEL_FILE, FaceTrack, Smoothing, track_image, track_video
from .versions import get_version
from .weights import WeightCache
from .video import check_destination, probe_video, read_frames, read_image, write_image, write_video

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")
SEED_TAG = "hellomeme_seed"  # the output's metadata key holding the seed it was made with


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


def prepare_run(
    reference: Path, driving: Path, output: Path, settings: AnimateSettings, *, mode: str, force: bool = False, cache: WeightCache | None = None
) -> tuple[Reference, AnimateSettings]:
    """Everything about a run that can fail fast, checked before any model loads: the version can
    do `mode`, the output path, the model options, the weights, the driving input and the
    reference's face. Returns the reference and the settings with their seed chosen."""
    settings = settings.with_seed()
    options = settings.models
    get_version(options.version, mode)
    check_destination(output, force, [reference, driving])
    check_options(options)
    read_image(reference)  # an unreadable picture is said before missing weights
    (probe_video if mode == "video" else read_image)(driving)
    cache = cache or WeightCache()
    face_model = cache.require(options.spec.components(options.control, mode))["face_landmarker"] / MODEL_FILE
    return load_reference(reference, settings, face_model), settings


def load_reference(path: Path, settings: AnimateSettings, face_model: Path) -> Reference:
    """The picture read, its face found and cropped; with --paste-back, checked that it can be blended back."""
    image = read_image(path)
    track = track_image(image, name=str(path), model_path=face_model)
    reference = Reference(path, prepare_reference(image, track, settings.size, settings.crop), image)
    if settings.paste_back:
        try:
            PasteBack.from_reference(image, reference.face)
        except HellomemeError as error:
            raise HellomemeError(f"{path}: {error}") from None
    return reference


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
    names = ("steps", "guidance", "window", "overlap", "stage1_steps")
    return SamplerSettings(**{name: settings.resolved(name) for name in names})


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
