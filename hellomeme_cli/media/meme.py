"""Meme-ready clips: GIF, animated WebP, VP9 WebM, stickers, size targets, captions and loops.

All through the ffmpeg binary media/video.py uses, written atomically. A plain mp4 is streamed to
the encoder as the frames come (`video.write_video`); anything else keeps the frames once, raw, in
a temporary folder: the loop is made there (pingpong reads them backwards, crossfade blends the
last frames into the first), and every try of a size target (`--max-kb`, a sticker's limit)
encodes those frames again instead of making the clip again.

- GIF: two passes, a palette made for the clip (palettegen), then the frames mapped to it with an
  ordered (Bayer) dither: its pattern stays put from frame to frame, so a still face does not
  shimmer as with error diffusion, and only the changed rectangle of each frame is stored;
  looping forever; delays are whole hundredths of a second (ffmpeg spreads them, 3 and 4 for 30 fps).
- WebP: libwebp_anim, lossy at --quality, looping forever; delays in milliseconds.
- WebM: VP9 at a constant quality (CRF from --quality) with the audio as Opus.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.media.captions import Captions
from hellomeme_cli.media.files import atomic_output, check_destination
from hellomeme_cli.media.formats import OutputPlan, vp9_crf, with_tags
from hellomeme_cli.media.video import AUDIO_BITRATE, TO_BT709_YUV420P, VIDEO_CRF, AudioTrack, _exact_rate, _last_line, ffmpeg_exe, write_video
from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress

GIF_COLOURS = (256, 128, 64, 32, 16)
GIF_DITHER = "bayer:bayer_scale=3"
WEBP_STEPS = 6  # --quality down to 5 in this many tries
VP9_CRF_STEP = 6  # about half the bitrate per step
OPUS_BITRATES = ("96k", "64k", "48k", "32k", "24k", "16k")
MP4_CRFS = (VIDEO_CRF, 23, 28, 33, 38, 43)
AAC_BITRATES = (AUDIO_BITRATE, "128k", "96k", "64k", "48k", "32k")
# After the quality: smaller frames, then fewer (every 2nd); a sticker's side is fixed, so only fewer.
SHRINKS = ((1.0, 1), (0.75, 1), (0.5, 1), (0.5, 2))
STICKER_SHRINKS = ((1.0, 1), (1.0, 2), (1.0, 3))
FRAMES_TAG = "hellomeme_frames"  # the frames written, where a size target kept fewer than were made


@dataclasses.dataclass(frozen=True)
class Written:
    """What was written: format, frames, the rate they play at, size, and what became of the audio."""

    path: Path
    format: str
    label: str
    frames: int
    rate: Fraction
    width: int
    height: int
    kilobytes: float
    audio: str  # "kept", "none" (the clip had none) or "left out (why)"
    notes: tuple[str, ...] = ()
    tick: Fraction | None = None

    def rate_text(self) -> str:
        """The rate, and the delays it is stored as where the format counts in ticks (GIF: 1/100 s)."""
        text = f"{float(self.rate):.4g} fps"
        if self.tick is None:
            return text
        ticks = 1 / (self.rate * self.tick)
        unit = "hundredths" if self.tick == Fraction(1, 100) else "ms"
        if ticks.denominator == 1:
            return f"{text} (delays of {ticks} {unit})"
        return f"{text} (delays of {math.floor(ticks)} and {math.ceil(ticks)} {unit}, {float(self.rate):.4g} fps on average)"

    def describe(self) -> str:
        audio = {"kept": "with the audio", "none": "no audio (the driving input has none)"}.get(self.audio, f"audio {self.audio}")
        parts = [self.label, f"{self.frames} frames at {self.rate_text()}", f"{self.width}x{self.height}", f"{self.kilobytes:.0f} KB", audio]
        return ", ".join([*parts, *self.notes])


@dataclasses.dataclass(frozen=True)
class _Spool:
    path: Path
    count: int
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class _Try:
    level: int  # the quality step (0: the best)
    scale: float
    step: int  # every step-th frame
    path: Path
    size: int
    what: str

    @property
    def kilobytes(self) -> float:
        return self.size / 1024


def write_clip(
    frames: Iterable[np.ndarray],
    path: Path,
    rate: Fraction | float,
    plan: OutputPlan,
    *,
    captions: Captions | None = None,
    audio: AudioTrack | None = None,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
    protect: Iterable[Path] = (),
    progress: ProgressCallback = no_progress,
    total: int | None = None,
) -> Written:
    """Write RGB uint8 frames at `rate` as `plan` says: the sticker's size, the captions laid over
    every frame at that size, the loop, the format, fitted to the size target. Returns what was written."""
    path = Path(path)
    protect = [*protect, *([audio.path] if audio else [])]
    check_destination(path, force, protect)
    rate = _exact_rate(rate)
    shape: list[tuple[int, ...]] = []
    frames = _prepared(iter(frames), plan, captions or Captions(), shape)
    kept = audio if plan.sound else None
    status = _audio_status(audio, plan)
    if plan.streamed:
        counted = _counting(frames)
        write_video(counted, path, rate, audio_from=kept, metadata=metadata, force=force, protect=protect, progress=progress, total=total)
        height, width = shape[0][:2]
        return Written(path, "mp4", plan.format.label, counted.count, rate, _even(width), _even(height), path.stat().st_size / 1024, status)
    with tempfile.TemporaryDirectory(prefix="hellomeme-frames-") as folder:
        spool = _spool(frames, Path(folder) / "frames.rgb", path, progress, total)
        made = spool.count
        spool = _looped(spool, plan)
        encoder = _Encoder(spool, rate, plan, kept, made, Path(folder), metadata or {})
        chosen, tries = _fit(encoder, plan, path, progress)
        data = chosen.path.read_bytes()
        if plan.format.name in ("gif", "webp"):  # ffmpeg writes no metadata into these
            data = with_tags(data, plan.format.name, encoder.tags(chosen.step))
        with atomic_output(path) as temporary:
            temporary.write_bytes(data)
    width, height = encoder.size(chosen.scale)
    if plan.sticker and plan.sticker.square:
        width = height = plan.sticker.side
    notes = []
    if plan.loop.kind != "off":
        notes.append(f"looped {plan.loop} ({made} frames made)")
    if plan.max_kb is not None:
        notes.append(f"within {plan.max_kb} KB" if tries == 1 else f"fitted in {plan.max_kb} KB after {tries} tries: {chosen.what}")
    return Written(
        path, plan.format.name, plan.format.label, encoder.frames(chosen.step), rate / chosen.step, width, height,
        len(data) / 1024, status, tuple(notes), plan.format.tick,
    )


def _audio_status(audio: AudioTrack | None, plan: OutputPlan) -> str:
    if audio is None:
        return "none"
    if not plan.format.sound:
        return f"left out ({plan.format.label} has no sound)"
    if plan.sticker is not None:
        return f"left out ({plan.sticker.name} stickers have none)"
    if plan.loop.kind == "pingpong":
        return "left out (a pingpong loop plays the clip backwards)"
    return "kept"


class _counting:
    """An iterator that counts what it gave."""

    def __init__(self, frames: Iterator[np.ndarray]):
        self.frames, self.count = frames, 0

    def __iter__(self) -> Iterator[np.ndarray]:
        for frame in self.frames:
            self.count += 1
            yield frame


def _prepared(frames: Iterator[np.ndarray], plan: OutputPlan, captions: Captions, shape: list) -> Iterator[np.ndarray]:
    """The frames at the sticker's size, with the captions drawn at that size; `shape` gets the first's."""
    for frame in frames:
        if plan.sticker is not None:
            frame = _longer_side(frame, plan.sticker.side)
        if captions:
            frame = captions.apply(frame)
        if not shape:
            shape.append(frame.shape)
        yield frame


def _longer_side(frame: np.ndarray, side: int) -> np.ndarray:
    """`frame` scaled so its longer side is `side` pixels (area averaging down, Lanczos up)."""
    height, width = frame.shape[:2]
    if max(height, width) == side:
        return frame
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LANCZOS4)


def _spool(frames: Iterator[np.ndarray], spool: Path, path: Path, progress: ProgressCallback, total: int | None) -> _Spool:
    """Every frame, raw RGB, into `spool`."""
    count, shape = 0, None
    with open(spool, "wb") as file:
        for frame in frames:
            if shape is None:
                shape = frame.shape
            if frame.dtype != np.uint8 or frame.shape != shape or frame.ndim != 3 or frame.shape[2] != 3:
                raise HellomemeError(f"{path}: frame {count} is {frame.dtype} {frame.shape}, not RGB uint8 {shape}")
            file.write(np.ascontiguousarray(frame).data)
            count += 1
            progress(ProgressEvent("writing", count, total, unit="frames"))
    if not count:
        raise HellomemeError(f"{path}: no frames to write")
    return _Spool(spool, count, shape[1], shape[0])


def _looped(spool: _Spool, plan: OutputPlan) -> _Spool:
    """The spooled frames as the loop plays them, in place."""
    loop, count = plan.loop, spool.count
    frame_bytes = spool.width * spool.height * 3
    if loop.kind == "pingpong" and count > 2:
        frames = np.memmap(spool.path, np.uint8, "r", shape=(count, spool.height, spool.width, 3))
        with open(spool.path, "ab") as file:
            for index in range(count - 2, 0, -1):  # back to the second frame: neither turning frame twice
                file.write(frames[index].tobytes())
        del frames
        return dataclasses.replace(spool, count=loop.count(count))
    if loop.kind == "crossfade":
        fade = loop.frames
        if count < 2 * fade:
            raise HellomemeError(f"--loop {loop} needs at least {2 * fade} frames, the clip has {count}")
        frames = np.memmap(spool.path, np.uint8, "r+", shape=(count, spool.height, spool.width, 3))
        # A weighted sum of two frames: ffmpeg's xfade would need the clip split into two inputs and read twice.
        for index in range(fade):
            weight = (index + 1) / (fade + 1)  # of the first frames: the loop starts where the end left off
            frames[index] = np.rint(frames[count - fade + index] * (1 - weight) + frames[index] * weight).astype(np.uint8)
        frames.flush()
        del frames
        with open(spool.path, "r+b") as file:
            file.truncate((count - fade) * frame_bytes)
        return dataclasses.replace(spool, count=count - fade)
    return spool


class _Encoder:
    """Encodes the spooled frames in the plan's format, at a quality level, scale and frame step."""

    def __init__(
        self, spool: _Spool, rate: Fraction, plan: OutputPlan, audio: AudioTrack | None, made: int, folder: Path, metadata: Mapping[str, str]
    ):
        self.spool, self.rate, self.plan, self.audio, self.made, self.folder = spool, rate, plan, audio, made, folder
        self.metadata = dict(metadata)
        self.levels = len(self._levels())
        self.number = 0

    def tags(self, step: int) -> dict[str, str]:
        """The metadata, and the frames written where a frame step kept fewer than the loop has."""
        return {**self.metadata, **({FRAMES_TAG: str(self.frames(step))} if step > 1 else {})}

    def frames(self, step: int) -> int:
        return -(-self.spool.count // step)

    def size(self, scale: float) -> tuple[int, int]:
        width, height = self.spool.width, self.spool.height
        if scale == 1.0 and self.plan.format.name not in ("mp4", "webm"):
            return width, height
        return _even(round(width * scale)), _even(round(height * scale))  # yuv420p needs even sides

    def _levels(self) -> list:
        name, quality = self.plan.format.name, self.plan.quality
        if name == "gif":
            return list(GIF_COLOURS)
        if name == "webp":
            return [round(quality - step * (quality - 5) / (WEBP_STEPS - 1)) for step in range(WEBP_STEPS)]
        if name == "webm":
            return [min(63, vp9_crf(quality) + VP9_CRF_STEP * step) for step in range(len(OPUS_BITRATES))]
        return list(MP4_CRFS)

    def describe(self, level: int, scale: float, step: int) -> str:
        value = self._levels()[level]
        name = self.plan.format.name
        what = {"gif": f"{value} colours", "webp": f"quality {value}", "webm": f"VP9 CRF {value}", "mp4": f"x264 CRF {value}"}[name]
        width, height = self.size(scale)
        return f"{what}, {width}x{height}, {float(self.rate / step):.4g} fps"

    def encode(self, level: int, scale: float, step: int) -> _Try:
        self.number += 1
        out = self.folder / f"try{self.number}{self.plan.format.suffixes[0]}"
        value = self._levels()[level]
        name = self.plan.format.name
        video = self._video_filters(scale, step)
        command = self._inputs()
        if name == "gif":
            palette = self.folder / "palette.png"
            _run([*command, "-vf", f"{video},palettegen=max_colors={value}:reserve_transparent=0", "-frames:v", "1", "-update", "1", str(palette)], out)
            command += ["-i", str(palette)]
            graph = f"[0:v]{video}[v];[v][1:v]paletteuse=dither={GIF_DITHER}:diff_mode=rectangle[out]"
            _run([*command, "-filter_complex", graph, "-map", "[out]", "-loop", "0", "-f", "gif", str(out)], out)
        else:
            graph, maps = f"[0:v]{video}[out]", ["-map", "[out]"]
            if self.audio is not None:
                graph += f";{self._audio_graph()}"
                maps += ["-map", "[sound]"]
            codec = {
                "webp": ["-c:v", "libwebp_anim", "-lossless", "0", "-quality", str(value), "-loop", "0", "-f", "webp"],
                "webm": ["-c:v", "libvpx-vp9", "-crf", str(value), "-b:v", "0", "-deadline", "good", "-cpu-used", "4", "-row-mt", "1", "-f", "webm"],
                "mp4": ["-c:v", "libx264", "-crf", str(value), "-preset", "medium", "-movflags", "+faststart+use_metadata_tags", "-f", "mp4"],
            }[name]
            if self.audio is not None:
                codec = [*(["-c:a", "libopus", "-b:a", OPUS_BITRATES[level]] if name == "webm" else ["-c:a", "aac", "-b:a", AAC_BITRATES[level]]), *codec]
            for key, value in self.tags(step).items():
                codec = ["-metadata", f"{key}={value}", *codec]
            _run([*command, "-filter_complex", graph, *maps, "-fps_mode", "passthrough", *codec, str(out)], out)
        return _Try(level, scale, step, out, out.stat().st_size, self.describe(level, scale, step))

    def _inputs(self) -> list[str]:
        spool = self.spool
        command = [ffmpeg_exe(), "-y", "-nostdin", "-v", "error"]
        command += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{spool.width}x{spool.height}", "-framerate", str(self.rate), "-i", str(spool.path)]
        if self.audio is not None:
            command += ["-itsoffset", f"{self.audio.shift:.6f}", "-t", f"{max(self._made_seconds() - self.audio.shift, 0) + 1:.6f}", "-i", str(self.audio.path)]
        return command

    def _made_seconds(self) -> float:
        return float(self.made / self.rate)

    def _video_filters(self, scale: float, step: int) -> str:
        filters = []
        if step > 1:
            filters.append(f"framestep={step}")
        width, height = self.size(scale)
        if (width, height) != (self.spool.width, self.spool.height):
            filters.append(f"scale={width}:{height}:flags=lanczos")
        name = self.plan.format.name
        sticker = self.plan.sticker
        if sticker is not None and sticker.square:  # transparent around a picture that is not square
            filters.append(f"format=rgba,pad={sticker.side}:{sticker.side}:(ow-iw)/2:(oh-ih)/2:color=black@0")
            filters.append("format=yuva420p")
        elif name in ("mp4", "webm"):
            filters.append(TO_BT709_YUV420P)
        return ",".join(filters) or "null"

    def _audio_graph(self) -> str:
        """The audio placed against the first frame, cut or padded to the frames made, crossfaded as the frames are."""
        seconds = self._made_seconds()
        graph = f"[1:a]aresample=async=1:first_pts=0,apad=whole_dur={seconds:.6f},atrim=end={seconds:.6f}"
        if self.plan.loop.kind != "crossfade":
            return graph + "[sound]"
        fade = float(self.plan.loop.frames / self.rate)
        graph += f",asplit=2[whole][start];[whole]atrim=start={seconds - fade:.6f},asetpts=PTS-STARTPTS[end]"
        graph += f";[start]atrim=end={seconds - fade:.6f},asetpts=PTS-STARTPTS[rest];[end][rest]acrossfade=d={fade:.6f}[sound]"
        return graph


def _fit(encoder: _Encoder, plan: OutputPlan, path: Path, progress: ProgressCallback) -> tuple[_Try, int]:
    """The best try that fits `plan.max_kb`: the best quality at full size first; else, at each
    shrink in turn, the lowest quality, and if that fits the best quality that does (halving the
    levels between). An impossible target is one line with the smallest size reached."""
    if plan.max_kb is None:
        return encoder.encode(0, 1.0, 1), 1
    limit = plan.max_kb * 1024
    tries: list[_Try] = []
    task = f"fitting in {plan.max_kb} KB"

    def attempt(level: int, scale: float, step: int) -> _Try:
        made = encoder.encode(level, scale, step)
        tries.append(made)
        verdict = "fits" if made.size <= limit else "too big"
        progress(ProgressEvent(task, len(tries), None, unit="tries", detail=f"{made.what}: {made.kilobytes:.0f} KB, {verdict}"))
        return made

    shrinks = STICKER_SHRINKS if plan.sticker is not None else SHRINKS
    first = attempt(0, *shrinks[0])
    if first.size <= limit:
        return first, 1
    last = encoder.levels - 1
    for number, (scale, step) in enumerate(shrinks):
        lowest = attempt(last, scale, step)
        if lowest.size > limit:
            continue
        best, low, high = lowest, (1 if number == 0 else 0), last
        while low < high:
            middle = (low + high) // 2
            made = attempt(middle, scale, step)
            if made.size <= limit:
                best, high = made, middle
            else:
                low = middle + 1
        return best, len(tries)
    smallest = min(tries, key=lambda made: made.size)
    raise HellomemeError(
        f"{path}: cannot fit in {plan.max_kb} KB: the smallest of {len(tries)} tries was {smallest.kilobytes:.0f} KB "
        f"({smallest.what}); allow more KB or make fewer frames (--max-frames)"
    )


def _run(command: list[str], output: Path) -> None:
    result = subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL, text=True, errors="replace")
    if result.returncode != 0:
        if "No space left on device" in result.stderr:
            raise HellomemeError(f"{output}: disk full (no space left on device)")
        raise HellomemeError(f"{output.name}: ffmpeg failed ({_last_line(result.stderr) or 'no message'})")


def _even(n: int) -> int:
    return n + n % 2

