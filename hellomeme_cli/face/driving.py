"""The driving input: a clip (decoded once) or a motion template (`hellomeme track`'s .npz, not
decoded at all) turned into what the sampler's signals need, and the output's timing.

A clip is probed (demux only), then decoded once: each frame is tracked and, while it is in
memory, the square around the face the crops are cut from (`signals.FacePatches`) is spooled to
an unnamed temporary file, so memory stays flat in the clip's length. The signals are built after
tracking, when the clip's crop square is known, from those patches and the smoothed track.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.progress import ProgressCallback, no_progress
from hellomeme_cli.face.signals import PATCH_SIZE, DrivingSignals, FacePatches, ReferenceFace, build_driving_signals, cut_patch, face_patch_box, head_pose
from hellomeme_cli.face.tracking import BLENDSHAPE_NAMES, FaceTrack, Smoothing, track_image, track_video
from hellomeme_cli.media.files import atomic_output, check_destination
from hellomeme_cli.media.video import AudioTrack, VideoInfo, audio_track, probe_video, read_image
from hellomeme_cli.weights.cache import sha256_of

from hellomeme_cli.settings import AnimateSettings

TEMPLATE_SUFFIX = ".npz"
TEMPLATE_KIND = "hellomeme motion template"
TEMPLATE_FORMAT = 2  # 1: the track alone (no patches, no timing), which cannot drive a clip
TEMPLATE_FIELDS = (
    "kind", "format", "landmarks", "blendshapes", "matrices", "filled", "fps", "size",
    "patches", "patch_boxes", "timestamps", "duration", "rate", "variable_rate", "source", "source_sha256",
)  # fmt: skip
# A time this close after a frame's timestamp already shows that frame (float rounding of k / rate).
TIME_EPSILON = 1e-6


class FaceEncoders(Protocol):
    """What driving input needs of a loaded pipeline (engine.HelloMemePipeline): the face model and the signal encoders."""

    face_model: Path
    image_encoder: object
    fan_encoder: object
    device: object
    dtype: object


@dataclasses.dataclass
class MotionTemplate:
    """A driving clip reduced to what the signals need, frame i in row i of every array.

    track: the subject's FaceTrack in source pixels (smoothed as it was tracked)
    patches: the square around the face of every frame (`signals.FacePatches`)
    timestamps: (n,) seconds from the first frame; duration: to the end of the last frame
    rate: the constant rate the output is written at by default; variable_rate: frames unevenly spaced
    source, source_sha256: the clip it was made from ("" where not hashed); audio: what the output
    muxes, the source's audio (None: silent, as from a template loaded from .npz)
    """

    track: FaceTrack
    patches: FacePatches
    timestamps: np.ndarray
    duration: float
    rate: Fraction
    variable_rate: bool
    source: Path
    source_sha256: str = ""
    audio: AudioTrack | None = None
    _spool: BinaryIO | None = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.track)

    def close(self) -> None:
        """Free the spooled patches (an unnamed temporary file: nothing is left on disk either way)."""
        if self._spool is not None:
            self.patches = dataclasses.replace(self.patches, pixels=np.zeros((0, PATCH_SIZE, PATCH_SIZE, 3), np.uint8))
            self._spool.close()
            self._spool = None

    def borrowed(self) -> MotionTemplate:
        """The same template for one run, which closes it, while this one keeps its patches (a
        template that drives many runs, as a ComfyUI node's output does)."""
        return dataclasses.replace(self, _spool=None)

    def __enter__(self) -> MotionTemplate:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def head(self, frames: int | None) -> MotionTemplate:
        """The first `frames` frames (all when None); the duration ends where frame `frames` starts."""
        if frames is None or frames >= len(self):
            return self
        indices = np.arange(frames)
        return dataclasses.replace(
            self,
            track=select_frames(self.track, indices, self.track.fps),
            patches=self.patches.select(indices),
            timestamps=self.timestamps[:frames],
            duration=float(self.timestamps[frames]),
        )


def track_clip(
    clip: Path | VideoInfo | Sequence[np.ndarray], *, fps: float | None = None, max_frames: int | None = None, **tracking
) -> MotionTemplate:
    """Probe the clip (demux only; not again when given its `VideoInfo`) and decode it once: track the
    face and keep the patches around it; with `audio_to` the decode also writes the audio there, and
    the template's audio is that file (else the clip's own). Frames given directly (RGB uint8, `fps`
    apart) are tracked as they are, and give a silent template. `tracking`: `track_video`'s options
    (face_index, smoothing, model_path, progress, audio_to). Close the result (or use it in `with`)
    to free the spooled patches."""
    audio_to = tracking.get("audio_to")
    if isinstance(clip, (str, Path, VideoInfo)):
        info = clip if isinstance(clip, VideoInfo) else probe_video(Path(clip))
        source, rate, path = info, info.rate, info.path
    elif not fps or fps <= 0:
        raise HellomemeError(f"driving frames given directly need their frame rate (got fps={fps})")
    else:
        info, source, rate, path = None, clip, Fraction(fps).limit_denominator(1001), Path("driving frames")
    spool = tempfile.TemporaryFile(prefix="hellomeme-patches-")
    boxes = []

    def keep(frame: np.ndarray, landmarks: np.ndarray | None) -> None:
        box = face_patch_box(landmarks, (frame.shape[1], frame.shape[0]))
        spool.write(cut_patch(frame, box).tobytes())
        boxes.append(box)

    try:
        track = track_video(source, fps=float(rate), max_frames=max_frames, each_frame=keep, **tracking)
        spool.flush()
        pixels = np.memmap(spool, dtype=np.uint8, mode="r", shape=(len(track), PATCH_SIZE, PATCH_SIZE, 3))
    except BaseException:
        spool.close()
        raise
    count = len(track)
    if info is not None and info.timestamps is not None and count == min(info.frame_count, max_frames or info.frame_count):
        timestamps = info.timestamps[:count]
        duration = info.duration if count == info.frame_count else float(info.timestamps[count])
        variable = info.variable_rate
    else:  # frames given, no timestamps, or the decode disagrees with the container: the frames at the rate
        timestamps, duration, variable = np.arange(count) / float(rate), count / float(rate), False
    audio = None
    if info is not None:
        audio = AudioTrack(Path(audio_to)) if audio_to is not None and info.has_audio else audio_track(info)
    return MotionTemplate(track, FacePatches(pixels, np.stack(boxes)), timestamps, duration, rate, variable, path, audio=audio, _spool=spool)


# -- motion templates (.npz) ---------------------------------------------------------


def is_template(path: Path) -> bool:
    return Path(path).suffix.lower() == TEMPLATE_SUFFIX


def save_template(template: MotionTemplate, path: Path, *, force: bool = False, protect: Iterable[Path] = ()) -> Path:
    """Write the template as .npz (atomically): the track, its head pose in the official convention,
    the patches and the timing, with the source's path and sha256 (none for frames given in memory)
    and the format version."""
    path = Path(path)
    check_destination(path, force, protect)
    track = template.track
    angles, translations = head_pose(track)
    # Frames tracked from memory (`track_clip` given frames) have no file to hash.
    sha256 = template.source_sha256 or (sha256_of(template.source) if Path(template.source).is_file() else "")
    with atomic_output(path) as temporary, temporary.open("xb") as file:  # a file object: np.savez would add ".npz" to a name
        np.savez_compressed(
            file,
            kind=TEMPLATE_KIND,
            format=TEMPLATE_FORMAT,
            landmarks=track.landmarks,
            blendshapes=track.blendshapes,
            blendshape_names=np.array(BLENDSHAPE_NAMES),
            matrices=track.matrices,
            pose_angles=angles.astype(np.float32),
            pose_translations=translations.astype(np.float32),
            filled=track.filled,
            fps=track.fps,
            size=np.array(track.size),
            patches=template.patches.pixels if template.patches.order is None else template.patches.pixels[template.patches.order],
            patch_boxes=template.patches.boxes if template.patches.order is None else template.patches.boxes[template.patches.order],
            timestamps=template.timestamps,
            duration=template.duration,
            rate=np.array([template.rate.numerator, template.rate.denominator]),
            variable_rate=template.variable_rate,
            source=str(Path(template.source).absolute()),
            source_sha256=sha256,
        )
    return path


def load_template(path: Path) -> MotionTemplate:
    """A template `save_template` wrote. The patches are copied to an unnamed temporary file in
    pieces and memory-mapped, so loading keeps memory flat too; close the result to free them."""
    path = Path(path)
    arrays = _template_arrays(path)
    spool = tempfile.TemporaryFile(prefix="hellomeme-patches-")
    try:
        with zipfile.ZipFile(path) as archive, archive.open("patches.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(member)
            if fortran or dtype != np.uint8 or len(shape) != 4 or shape[1:] != (PATCH_SIZE, PATCH_SIZE, 3) or shape[0] != len(arrays["filled"]):
                raise HellomemeError(f"{path}: not a motion template this hellomeme can read (patches are {dtype} {shape})")
            while chunk := member.read(1 << 24):
                spool.write(chunk)
        spool.flush()
        pixels = np.memmap(spool, dtype=np.uint8, mode="r", shape=shape)
    except BaseException:
        spool.close()
        raise
    track = FaceTrack(
        landmarks=arrays["landmarks"],
        blendshapes=arrays["blendshapes"],
        matrices=arrays["matrices"],
        filled=arrays["filled"],
        fps=float(arrays["fps"]),
        size=tuple(int(v) for v in arrays["size"]),
    )
    numerator, denominator = (int(v) for v in arrays["rate"])
    return MotionTemplate(
        track, FacePatches(pixels, arrays["patch_boxes"]), arrays["timestamps"], float(arrays["duration"]),
        Fraction(numerator, denominator), bool(arrays["variable_rate"]), Path(str(arrays["source"])),
        str(arrays["source_sha256"]), audio=None, _spool=spool,
    )


def load_track(path: Path) -> FaceTrack:
    """Only the track of a template (the patches are not read)."""
    with contextlib.closing(load_template(path)) as template:
        return template.track


def _template_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every field but the patches, checked: a bad, old or foreign .npz is a one-line error."""
    if not path.is_file():
        raise HellomemeError(f"{path}: {'is a folder, not a file' if path.is_dir() else 'no such file'}")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            kind = str(data["kind"]) if "kind" in names else ""
            version = int(data["format"]) if "format" in names else None
            if kind != TEMPLATE_KIND:
                old = version == 1 and "landmarks" in names
                raise HellomemeError(
                    f"{path}: a face track from an older hellomeme (format 1, no patches): run `hellomeme track` on the clip again"
                    if old
                    else f"{path}: not a hellomeme motion template (make one with `hellomeme track CLIP`)"
                )
            if version != TEMPLATE_FORMAT:
                raise HellomemeError(f"{path}: motion template format {version}, this hellomeme reads format {TEMPLATE_FORMAT}: run `hellomeme track` again")
            missing = [name for name in TEMPLATE_FIELDS if name not in names]
            if missing:
                raise HellomemeError(f"{path}: damaged motion template (no {', '.join(missing)})")
            arrays = {name: data[name] for name in TEMPLATE_FIELDS if name != "patches"}
    except HellomemeError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, KeyError, EOFError) as error:
        raise HellomemeError(f"{path}: not a motion template numpy can read ({error})") from None
    count = len(arrays["filled"])
    shapes_ok = (
        count > 0
        and arrays["landmarks"].shape[0] == arrays["blendshapes"].shape[0] == arrays["matrices"].shape[0] == count
        and arrays["patch_boxes"].shape == (count, 3)
        and arrays["timestamps"].shape == (count,)
        and arrays["rate"].shape == (2,)
        and arrays["rate"].min() > 0
    )
    if not shapes_ok:
        raise HellomemeError(f"{path}: damaged motion template (its arrays do not have one row per frame)")
    return arrays


# -- what the pipeline calls ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutputTiming:
    """The output's constant rate, the source frame each output frame shows, and what a rate change did."""

    rate: Fraction
    shown: np.ndarray
    repeated: int  # output frames showing the same source frame as the one before
    dropped: int  # source frames no output frame shows
    cut_seconds: float = 0.0  # the clip's length past a length limit (a sticker's), not made
    capped: Fraction | None = None  # the rate asked for (the clip's or --fps), above the limit it was brought to


@dataclasses.dataclass
class Driving:
    """What a run takes from DRIVE: the signals for each output frame, their timing, the audio."""

    signals: DrivingSignals
    timing: OutputTiming
    faceless_frames: int  # output frames whose driving frame had no face (filled from neighbours)
    audio: AudioTrack | None  # what the output's sound is; None: silent (a template)


@dataclasses.dataclass(frozen=True)
class DrivingInput:
    """Where a run's motion comes from, and what is known of it already.

    source: a clip or a template file (.npz), or a template tracked already
    probed: the clip's `VideoInfo` from the check before the run (`check_driving`): not probed again
    track_cache: a folder of clips tracked before with the same tracking settings (batch)
    audio_to: where the decode that tracks the clip writes its audio, so the mux need not read the clip
    """

    source: Path | MotionTemplate
    probed: VideoInfo | None = None
    track_cache: Path | None = None
    audio_to: Path | None = None


def tracking_options(settings: AnimateSettings, face_model: Path | None, progress: ProgressCallback) -> dict:
    """`track_clip`'s options for a run with these settings."""
    smoothing = Smoothing(pose=settings.smooth_pose, expression=settings.smooth_expression) if settings.smoothing else None
    return {"face_index": settings.face_index, "smoothing": smoothing, "max_frames": settings.max_frames, "model_path": face_model, "progress": progress}


def open_driving(driving: DrivingInput, settings: AnimateSettings, face_model: Path | None, progress: ProgressCallback = no_progress) -> MotionTemplate:
    """The driving input as a motion template, at most `settings.max_frames` frames: loaded from a
    .npz (no decode; the tracking options it was made with hold), taken from the track cache, or
    tracked now (one decode; then kept in the track cache when there is one)."""
    if isinstance(driving.source, MotionTemplate):
        return driving.source.head(settings.max_frames)
    drive = Path(driving.source)
    if is_template(drive):
        return load_template(drive).head(settings.max_frames)
    info = driving.probed or probe_video(drive)  # a clip that is not one fails here, as it would when tracked

    def tracked() -> MotionTemplate:
        return track_clip(info, audio_to=driving.audio_to, **tracking_options(settings, face_model, progress))

    if driving.track_cache is None:
        return tracked()
    sha256 = sha256_of(drive)
    cached = Path(driving.track_cache) / f"{drive.stem}.{_cache_key(sha256, settings)}{TEMPLATE_SUFFIX}"
    if cached.is_file():
        with contextlib.suppress(HellomemeError):  # a damaged cache entry is made again
            template = load_template(cached)
            if template.source_sha256 == sha256:
                template.source, template.audio = drive, audio_track(info)
                return template
            template.close()
    template = tracked()
    template.source_sha256 = sha256
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_template(template, cached, force=True, protect=[drive])
    return template


def prepare_driving(
    driving: DrivingInput, reference: ReferenceFace, settings: AnimateSettings, models: FaceEncoders, progress: ProgressCallback = no_progress,
    *, max_rate: Fraction | None = None, max_seconds: float | None = None,
) -> Driving:
    """Steps 1-2 of `animate`: the driving input tracked (or its template loaded), the output's
    timing (at most `max_rate`, the first `max_seconds`: an output format's or sticker's limits),
    and the driving signals of every output frame."""
    with open_driving(driving, settings, models.face_model, progress) as template:
        timing = output_timing(template, settings.fps, max_rate=max_rate, max_seconds=max_seconds)
        track = select_frames(template.track, timing.shown, float(timing.rate))
        signals = _signals(track, template.patches.select(timing.shown), reference, settings, models, progress)
        return Driving(signals, timing, track.filled_count, template.audio)


def prepare_driving_image(
    drive: Path | np.ndarray, reference: ReferenceFace, settings: AnimateSettings, models: FaceEncoders, *, progress: ProgressCallback = no_progress
) -> DrivingSignals:
    """The signals of one driving picture (a file, or RGB uint8 pixels), or of a template's first
    frame with a detected face (its first frame if none was detected)."""
    if isinstance(drive, np.ndarray) or not is_template(Path(drive)):
        image, name = (drive, "the driving picture") if isinstance(drive, np.ndarray) else (read_image(Path(drive)), str(drive))
        track = track_image(image, face_index=settings.face_index, name=name, model_path=models.face_model)
        return _signals(track, [image], reference, settings, models, progress)
    with load_template(drive) as template:
        index = image_frame(template.track)
        track = select_frames(template.track, np.array([index]), template.track.fps)
        return _signals(track, template.patches.select(np.array([index])), reference, settings, models, progress)


def image_frame(track: FaceTrack) -> int:
    """The frame of a template `image` uses: the first with a detected face."""
    detected = np.flatnonzero(~track.filled)
    return int(detected[0]) if len(detected) else 0


def check_driving(drive: Path) -> VideoInfo | None:
    """Fail fast (before models load) on a DRIVE that is neither a readable clip nor a template;
    a clip's probe is returned, for the run to use rather than probe it again."""
    if is_template(drive):
        _template_arrays(Path(drive))
        return None
    return probe_video(drive)


def check_driving_image(drive: Path) -> None:
    """Fail fast on a DRIVE_IMAGE that is neither a picture nor a template."""
    if is_template(drive):
        _template_arrays(Path(drive))
    else:
        read_image(drive)


def expected_frames(drive: Path, settings: AnimateSettings, *, max_rate: Fraction | None = None, max_seconds: float | None = None) -> int | None:
    """How many frames a run of `settings` makes from DRIVE (None when DRIVE cannot be read),
    without tracking or decoding; `max_rate`, `max_seconds` as `prepare_driving` takes them."""
    try:
        if is_template(drive):
            arrays = _template_arrays(Path(drive))
            timestamps, duration = arrays["timestamps"], float(arrays["duration"])
            rate, variable = Fraction(*(int(v) for v in arrays["rate"])), bool(arrays["variable_rate"])
        else:
            info = probe_video(drive)
            rate, variable, duration = info.rate, info.variable_rate, info.duration
            timestamps = info.timestamps if info.timestamps is not None else np.arange(info.frame_count) / float(info.rate)
    except HellomemeError:
        return None
    count = min(len(timestamps), settings.max_frames or len(timestamps))
    if count < len(timestamps):
        duration = float(timestamps[count])
    return len(_timing(timestamps[:count], duration, rate, variable, settings.fps, max_rate, max_seconds).shown)


def _signals(
    track: FaceTrack, frames: object, reference: ReferenceFace, settings: AnimateSettings, models: FaceEncoders, progress: ProgressCallback
) -> DrivingSignals:
    return build_driving_signals(
        track,
        frames,
        reference,
        image_encoder=models.image_encoder,
        fan_encoder=models.fan_encoder,
        device=models.device,
        dtype=models.dtype,
        crop=settings.crop,
        trans_ratio=settings.trans_ratio,
        progress=progress,
    )


def _cache_key(sha256: str, settings: AnimateSettings) -> str:
    """What a cached template depends on: the clip's content and the tracking settings."""
    key = {
        "sha256": sha256, "face_index": settings.face_index, "max_frames": settings.max_frames,
        "smoothing": [settings.smooth_pose, settings.smooth_expression] if settings.smoothing else False,
    }
    text = json.dumps({**key, "format": TEMPLATE_FORMAT}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- timing -----------------------------------------------------------------------------


def output_timing(
    template: MotionTemplate, fps: float | None = None, *, max_rate: Fraction | None = None, max_seconds: float | None = None
) -> OutputTiming:
    """The output's rate (`fps`, else the clip's: its own for a constant-rate clip, for a variable
    one the lowest standard rate that shows every frame; at most `max_rate`) and the source frame on
    screen at each output frame's time; the output lasts as long as the clip, or its first `max_seconds`."""
    return _timing(template.timestamps, template.duration, template.rate, template.variable_rate, fps, max_rate, max_seconds)


def _timing(
    timestamps: np.ndarray, duration: float, rate: Fraction, variable: bool, fps: float | None,
    max_rate: Fraction | None = None, max_seconds: float | None = None,
) -> OutputTiming:
    asked = Fraction(fps).limit_denominator(1001) if fps is not None else rate
    if max_rate is not None and asked > max_rate:
        capped = _timing(timestamps, duration, rate, variable, float(max_rate), None, max_seconds)
        return dataclasses.replace(capped, capped=asked)
    if max_seconds is not None and duration > max_seconds + TIME_EPSILON:
        timing = _timing(timestamps, duration, rate, variable, fps)
        keep = max(1, math.floor(max_seconds * timing.rate + TIME_EPSILON))
        return dataclasses.replace(timing, shown=timing.shown[:keep], cut_seconds=duration - float(keep / timing.rate))
    count = len(timestamps)
    if not variable and (fps is None or math.isclose(fps, float(rate), rel_tol=1e-6)):
        return OutputTiming(rate, np.arange(count), 0, 0)
    target = rate if fps is None else Fraction(fps).limit_denominator(1001)
    times = np.arange(max(1, round(duration * float(target)))) / float(target)
    shown = np.clip(np.searchsorted(timestamps, times + TIME_EPSILON, side="right") - 1, 0, count - 1)
    distinct = len(np.unique(shown))
    return OutputTiming(target, shown, len(shown) - distinct, count - distinct)


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
