"""The animate pipeline: reference and driving clip in, mp4 out, as numbered steps.

1. read the reference picture; track the driving clip (one decode) or load its motion template
2. the output's timing and the driving signals: crops, head pose, expression, face-part embeddings;
   the motion controls (steering.py) on them
3. the reference net's cache and the prompt (once per clip)
4. the version's sampler (v1/v2: two stages; v3+: coarse to fine over 12-frame windows)
5. decode and write the clip with the driving audio, frames streamed to the writer (through
   the upscaler with --upscale 2, then the paste-back with --paste-back, then the captions): an mp4
   as they come; a GIF, WebP or WebM, a loop or a size target from the frames kept (media/meme.py)
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from fractions import Fraction
from typing import Any, Protocol
from pathlib import Path

import numpy as np
import torch

from hellomeme_cli.version import __version__
from hellomeme_cli.model_options import check_options
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.preflight import check_paths, plan_output
from hellomeme_cli.face.pasteback import PasteBack, head_travel
from hellomeme_cli.progress import ProgressCallback, no_progress
from hellomeme_cli.samplers.common import DrivingFrames, SamplerInputs, SamplerSettings, StepCallback
from hellomeme_cli.face.driving import (
    Driving, DrivingInput, FaceEncoders, MotionTemplate, check_driving, check_driving_image, expected_frames, prepare_driving, prepare_driving_image,
)
from hellomeme_cli.settings import AnimateSettings
from hellomeme_cli.face.signals import DrivingSignals, ReferenceFace, prepare_reference
from hellomeme_cli.face.steering import needs_reference_signals, steer
from hellomeme_cli.face.tracking import MODEL_FILE, track_image
from hellomeme_cli.media.upscale import components as upscale_components
from hellomeme_cli.media.captions import Captions
from hellomeme_cli.media.files import check_destination
from hellomeme_cli.media.formats import OutputPlan
from hellomeme_cli.media.meme import Written, write_clip
from hellomeme_cli.media.video import VideoInfo, read_image, write_image
from hellomeme_cli.versions import Version
from hellomeme_cli.weights.cache import WeightCache

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")
SEED_TAG = "hellomeme_seed"  # the output's metadata key holding the seed it was made with
RUN_TAG = "hellomeme_run"  # ... and what `hellomeme eval` needs of the run: motion controls, version, window plan (JSON)


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
    format: str = "mp4"  # mp4, gif, webp or webm
    kilobytes: float = 0.0
    audio: str = ""  # "kept", "none" (the driving input has none) or "left out (why)"
    description: str = ""  # what was written, as the command line says it: format, frames, rate, size, audio, limits

    @classmethod
    def of(cls, written: Written, seed: int, faceless: int, seconds: float, repeated: int, dropped: int, notes: tuple[str, ...]) -> "AnimateResult":
        description = ", ".join([written.describe(), *notes])
        return cls(
            written.path, written.frames, float(written.rate), seed, faceless, seconds, repeated, dropped,
            written.format, written.kilobytes, written.audio, description,
        )


class LoadedModels(FaceEncoders, Protocol):
    """What a run needs of the loaded models (engine.HelloMemePipeline, whose `__call__` runs through
    this module: described here rather than imported)."""

    version: Version

    def encode_prompt(self, prompt: str = "", negative_prompt: str = "", mode: str = "video") -> Any: ...

    def sampler(self, scheduler: str | None = None) -> Any: ...

    def upscaler(self) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Reference:
    """The reference picture, read and its face found, before any model is loaded (so a picture
    without a face fails in a second, and a batch with one reference does this once)."""

    path: Path | None  # None: a picture given as pixels
    face: ReferenceFace
    picture: np.ndarray  # the whole picture, for --paste-back


def run_components(settings: AnimateSettings, mode: str) -> list[str]:
    """Every weight component a run with these settings needs: the version's for the control and
    mode (the face model included), and the upscaler's with --upscale 2."""
    options = settings.models
    return [*options.spec.components(options.control, mode), *upscale_components(settings.upscale)]


@dataclasses.dataclass(frozen=True)
class PreparedRun:
    """One run that passed every check that needs no model (`prepare_run`), its seed chosen:
    `execute` it on loaded models."""

    mode: str  # "video" (`animate`) or "image" (`render_image`)
    reference: Reference
    driving: Path
    output: Path
    settings: AnimateSettings
    force: bool = False
    probed: VideoInfo | None = None  # the driving clip's, from the check: not probed again

    def execute(self, models: LoadedModels, progress: ProgressCallback = no_progress) -> AnimateResult | int:
        """The video's `AnimateResult`, or the picture's seed."""
        if self.mode == "image":
            return render_image(self.reference, self.driving, self.output, self.settings, models, force=self.force, progress=progress)
        return animate(
            self.reference, self.driving, self.output, self.settings, models, force=self.force, progress=progress, probed=self.probed
        )


def prepare_run(
    reference: Path, driving: Path, output: Path, settings: AnimateSettings, *, mode: str, force: bool = False, cache: WeightCache | None = None
) -> PreparedRun:
    """Everything about a run that can fail fast, checked before any model loads: the version can
    do `mode`, the paths, the model options, the weights, the driving input and the reference's face."""
    settings = settings.with_seed()
    options = settings.models
    check_paths(reference, driving, output, options.version, mode=mode, force=force)
    plan = plan_output(output, settings) if mode == "video" else None
    check_options(options)
    read_image(reference)  # an unreadable picture is said before missing weights
    probed = check_driving(driving) if mode == "video" else check_driving_image(driving)
    if plan is not None:
        check_loop(driving, settings, plan)
    else:
        check_picture_output(output)
    cache = cache or WeightCache()
    needed = run_components(settings, mode)
    face_model = cache.require(needed)["face_landmarker"] / MODEL_FILE
    return PreparedRun(mode, load_reference(reference, settings, face_model), Path(driving), Path(output), settings, force, probed)


def check_loop(driving: Path, settings: AnimateSettings, plan: OutputPlan) -> None:
    """A crossfade longer than half the clip (as the settings and the plan's limits make it) is said
    before any model loads."""
    if plan.loop.kind == "crossfade":
        made = expected_frames(driving, settings, max_rate=plan.max_rate, max_seconds=plan.max_seconds)
        if made is not None and made < 2 * plan.loop.frames:
            raise HellomemeError(f"{driving}: --loop {plan.loop} needs at least {2 * plan.loop.frames} frames, this run makes {made}")


def check_picture_output(output: Path) -> None:
    """The picture's suffix is one OpenCV writes (.png, .jpg, .webp, .gif, ...)."""
    import cv2

    if not cv2.haveImageWriter(str(output)):
        raise HellomemeError(f"{output}: cannot write a picture with extension {Path(output).suffix or '(none)'} (use .png, .jpg, .webp, ...)")


def load_reference(source: Path | np.ndarray, settings: AnimateSettings, face_model: Path) -> Reference:
    """The picture (a file, or RGB uint8 pixels) read, its face found and cropped; with --paste-back,
    checked that it can be blended back."""
    path, image = (None, source) if isinstance(source, np.ndarray) else (Path(source), read_image(Path(source)))
    name = str(path or "the reference picture")
    track = track_image(image, name=name, model_path=face_model)
    reference = Reference(path, prepare_reference(image, track, settings.size, settings.crop), image)
    if settings.paste_back:
        try:
            PasteBack.from_reference(image, reference.face)
        except HellomemeError as error:
            raise HellomemeError(f"{name}: {error}") from None
    return reference


def animate(
    reference: Reference,
    driving: Path | MotionTemplate,
    output: Path,
    settings: AnimateSettings,
    models: LoadedModels,
    *,
    force: bool = False,
    progress: ProgressCallback = no_progress,
    extra_tags: Mapping[str, str] | None = None,
    track_cache: Path | None = None,
    probed: VideoInfo | None = None,
    on_step: StepCallback | None = None,
    each_frame: Callable[[np.ndarray], None] | None = None,
) -> AnimateResult:
    """Give the reference portrait the driving clip's motion (or a motion template's: a file, or one
    tracked already, which the run closes); write `output` in the format its suffix names (an mp4 or
    WebM with the clip's audio, or the template's; a GIF or WebP; a sticker; looped, captioned,
    fitted to --max-kb as the settings say), its metadata naming the seed, plus `extra_tags`. With
    `track_cache` a clip tracked before with the same tracking settings is not tracked again; with
    `probed` (its `VideoInfo`) the clip is not probed again: it is read once, to track it, and that
    read keeps its audio for the output. `on_step` sees every denoising step (`generate`),
    `each_frame` every frame written."""
    started = time.monotonic()
    settings = settings.with_seed()
    plan = plan_output(output, settings)
    inputs = [path for path in (reference.path, driving) if isinstance(path, Path)]
    check_destination(output, force, inputs)
    with tempfile.TemporaryDirectory(prefix="hellomeme-") as scratch:
        # 1-4. The driving signals (within the format's and the sticker's limits), the sampler's latents;
        # 5. frames decoded as the writer takes them.
        source = DrivingInput(driving, probed, track_cache, Path(scratch) / "audio.wav")
        video = generate(
            reference, source, settings, models, progress=progress, on_step=on_step, max_rate=plan.max_rate, max_seconds=plan.max_seconds
        )
        metadata = {
            "comment": f"hellomeme {__version__} seed={settings.seed}", SEED_TAG: str(settings.seed),
            RUN_TAG: run_tag(settings, video.windows), **(extra_tags or {}),
        }
        frames = video.frames if each_frame is None else _seen(video.frames, each_frame)
        written = write_clip(
            frames, output, video.drive.timing.rate, plan, captions=captions_of(settings), audio=video.drive.audio,
            metadata=metadata, force=force, protect=inputs, progress=progress, total=video.frame_count,
        )
    timing = video.drive.timing
    return AnimateResult.of(
        written, settings.seed, video.drive.faceless_frames, time.monotonic() - started, timing.repeated, timing.dropped, _limit_notes(timing, plan),
    )


def captions_of(settings: AnimateSettings) -> Captions:
    return Captions(settings.caption, settings.caption_bottom, settings.caption_font)


def _limit_notes(timing, plan: OutputPlan) -> tuple[str, ...]:
    """What the format's or the sticker's limits did to the clip, said rather than done silently."""
    why = f"{plan.sticker.name} stickers" if plan.sticker else plan.format.label
    notes = []
    if timing.capped is not None:
        notes.append(f"made at {float(timing.rate):.4g} fps rather than {float(timing.capped):.4g} ({why}: at most {float(plan.max_rate):.4g} fps)")
    if timing.cut_seconds > 0:
        notes.append(f"cut to its first {plan.max_seconds:g} s, {timing.cut_seconds:.2f} s left out ({why}: at most {plan.max_seconds:g} s)")
    return tuple(notes)


def _seen(frames: Iterator[np.ndarray], each_frame: Callable[[np.ndarray], None]) -> Iterator[np.ndarray]:
    for frame in frames:
        each_frame(frame)
        yield frame


def render_image(
    reference: Reference, driving_image: Path, output: Path, settings: AnimateSettings, models: LoadedModels, *,
    force: bool = False, progress: ProgressCallback = no_progress,
) -> int:
    """One picture: the reference with the head pose and expression of `driving_image` (official
    image pipeline: all steps with the 2D denoiser); returns the seed used."""
    settings = settings.with_seed()
    check_destination(output, force, [reference.path, driving_image])
    picture = generate(reference, driving_image, settings, models, progress=progress)
    tags = {"Comment": f"hellomeme {__version__} seed={settings.seed}", SEED_TAG: str(settings.seed)}
    captions = captions_of(settings)
    frame = next(picture.frames)
    write_image(captions.apply(frame) if captions else frame, output, force=force, protect=[reference.path, driving_image], tags=tags)
    return settings.seed


@dataclasses.dataclass
class Generated:
    """A clip or a picture made but not written: its latents and its frames, decoded (then upscaled
    and pasted back, as the settings say) only as they are taken, so a writer holds one batch at a time."""

    latents: torch.Tensor  # (1, 4, F, h, w), divided by the VAE's scaling factor
    frames: Iterator[np.ndarray]  # (H, W, 3) uint8 RGB, one per output frame
    frame_count: int
    drive: Driving | None  # a clip's signals, the output's timing and its audio; None for a picture
    windows: tuple[tuple[int, int], ...] = ()  # the sampler's motion windows over the frames (none for a picture)


def generate(
    reference: Reference,
    driving: DrivingInput | Path | np.ndarray,
    settings: AnimateSettings,
    models: LoadedModels,
    *,
    progress: ProgressCallback = no_progress,
    generator: torch.Generator | None = None,
    on_step: StepCallback | None = None,
    max_rate: Fraction | None = None,
    max_seconds: float | None = None,
) -> Generated:
    """Steps 1-5 of `animate` (a `DrivingInput`: a clip or a template) or of `render_image` (a
    picture, as a file or pixels, or a template's first frame with a face), but not writing. The
    noise comes from `generator` (a CPU one), else from a new one seeded with `settings.seed`;
    `on_step` sees the latents after every denoising step (`samplers.common.StepCallback`); a clip's
    output is at most `max_rate` and `max_seconds` long (an output format's or sticker's limits)."""
    is_clip = isinstance(driving, DrivingInput)
    sampler = models.sampler(settings.resolved("scheduler"))  # first: a scheduler name diffusers lacks is said before tracking
    # 1 and 2. The driving clip tracked (decoded once) or its template loaded, the output's timing and
    # the driving signals; or the picture's; the reference's own where the version or the motion controls take them.
    drive = prepare_driving(driving, reference.face, settings, models, progress, max_rate=max_rate, max_seconds=max_seconds) if is_clip else None
    signals = drive.signals if is_clip else prepare_driving_image(driving, reference.face, settings, models, progress=progress)
    own = None
    if needs_reference_signals(settings.pose, settings.motion) or (not is_clip and models.version.reference_control):
        own = _own_signals(reference, settings, models)  # v5c's reference net takes them too
    signals = _steered(signals, own, settings)

    # 3 and 4. Prompt, reference cache and the version's sampler.
    sample = sampler.sample if is_clip else sampler.sample_image
    sampler_settings = _sampler_settings(settings)
    latents = sample(
        _sampler_inputs(reference.face, signals, settings, models, mode="video" if is_clip else "image", own=own if models.version.reference_control else None),
        sampler_settings,
        generator or torch.Generator().manual_seed(settings.seed),
        progress,
        on_step=on_step,
    )

    # 5. Frames decoded batch by batch, through the upscaler and the paste-back.
    frames = (frame for batch in sampler.decode(latents, progress=progress if is_clip else no_progress) for frame in batch)
    if settings.upscale != 1:
        frames = models.upscaler()(frames)
    if settings.paste_back:
        paste = PasteBack.from_reference(reference.picture, reference.face, travel=head_travel(signals), frame_scale=settings.upscale)
        frames = paste(frames)
    windows = sampler.windows(len(signals), sampler_settings) if is_clip else ()
    return Generated(latents, frames, len(signals), drive, windows)


def run_tag(settings: AnimateSettings, windows: tuple[tuple[int, int], ...]) -> str:
    """The `RUN_TAG` value of a video made with `settings` in `windows`."""
    values = {name: getattr(settings, name) for name in ("pose", "motion", "expression_scale", "trans_ratio", "loop")}
    return json.dumps({**values, "version": settings.models.version, "windows": [list(window) for window in windows]}, separators=(",", ":"))


def _own_signals(reference: Reference, settings: AnimateSettings, models: LoadedModels) -> DrivingSignals:
    """The reference picture's own head pose and expression, as a one-frame driving signal."""
    return prepare_driving_image(reference.picture, reference.face, dataclasses.replace(settings, face_index=0), models)


def _steered(signals: DrivingSignals, own: DrivingSignals | None, settings: AnimateSettings) -> DrivingSignals:
    return steer(signals, own, settings.pose, settings.motion, settings.expression_scale)


def _sampler_settings(settings: AnimateSettings) -> SamplerSettings:
    names = ("steps", "guidance", "window", "overlap", "stage1_steps")
    return SamplerSettings(**{name: settings.resolved(name) for name in names})


def _sampler_inputs(
    reference: ReferenceFace,
    signals: DrivingSignals,
    settings: AnimateSettings,
    models: LoadedModels,
    *,
    mode: str = "video",
    own: DrivingSignals | None = None,
) -> SamplerInputs:
    """`own`: the reference picture's own signals, for a version whose reference net takes them."""
    prompt = models.encode_prompt(settings.prompt, settings.negative_prompt, mode)
    ref_image = torch.from_numpy(reference.image).permute(2, 0, 1)[None].float() / 127.5 - 1.0

    def frames(source: DrivingSignals, start: int, stop: int) -> DrivingFrames:
        inputs = source.control_inputs(start, stop)
        inputs.pop("neg_pd_fpg", None)
        return DrivingFrames(**inputs)

    return SamplerInputs(
        ref_image=ref_image,
        text_embeds=prompt.positive,
        negative_text_embeds=prompt.negative,
        control=lambda start, stop: frames(signals, start, stop),
        num_frames=len(signals),
        neg_pd_fpg=signals.neg_pd_fpg,
        reference_text_embeds=prompt.reference,
        reference_negative_text_embeds=prompt.reference_negative,
        reference_control=frames(own, 0, 1) if own is not None else None,
    )
