"""Video and image io through the ffmpeg binary that imageio-ffmpeg ships: exact frame counts, atomic writes.

Probing only demuxes: one ffmpeg run copies the video packets to `framecrc`, which lists every
packet's timestamps, so the frame count, the exact rate and each frame's time are known without
decoding a frame. Reading decodes with `-fps_mode passthrough`, so every coded frame comes out once
(none dropped or duplicated to fit a nominal rate), with the container's rotation applied; a clip
that is damaged fails while it is decoded. Writing streams RGB frames
into ffmpeg's stdin and encodes H.264 (yuv420p, BT.709) at the exact rational rate, one output frame
per input frame, optionally muxing another file's audio trimmed or padded to the video's length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.media.formats import tags_in
from hellomeme_cli.media.files import atomic_output, check_destination, require_file, write_atomically
from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress

# Visually near-lossless for x264; generated frames are worth keeping at this quality.
VIDEO_CRF = 18
AUDIO_BITRATE = "192k"
# Convert and tag explicitly, so players do not guess between BT.601 and BT.709 from the frame size.
TO_BT709_YUV420P = (
    "scale=out_color_matrix=bt709:out_range=tv,format=yuv420p,"
    "setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv"
)
VIDEO_SUFFIXES = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov"}
# Formats ffmpeg opens still images with: a .jpg handed in as a clip is a mistake worth naming.
IMAGE_FORMATS = re.compile(r"^(image2|\w+_pipe)$")
# Rates that ffmpeg prints rounded; fractions with a denominator up to this are kept exactly.
MAX_RATE_DENOMINATOR = 100_000
# The constant rates a variable-rate clip is written at: the lowest that shows every frame, at most the last.
STANDARD_RATES = tuple(
    Fraction(rate) for rate in ("10", "12", "15", "24000/1001", "24", "25", "30000/1001", "30", "48", "50", "60000/1001", "60")
)
# Frame intervals may differ by this many timestamp ticks (and this fraction) and the rate is still constant:
# containers with a millisecond time base round 1/30 s to 33 or 34 ms.
CONSTANT_RATE_TICKS = 1
CONSTANT_RATE_TOLERANCE = 0.002
_NO_TIMESTAMP = -(2**63)  # AV_NOPTS_VALUE, as framecrc prints a missing timestamp
_DISCARD_FLAG = 0x4  # AV_PKT_FLAG_DISCARD: a packet an edit list cuts (decoded as a reference, never shown)


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a clip holds. width/height are as displayed (after rotation).

    rotation: degrees counter-clockwise the stored frames are turned for display (ffmpeg's display matrix).
    rate: the exact frame rate (fps is its float value); for a variable-rate clip the constant rate
    it is written at, the lowest standard one that shows every frame (`STANDARD_RATES`).
    timestamps: (frame_count,) float64 seconds from the first frame to each frame, in display order;
    None where the container has no usable timestamps (then frames are taken as `rate` apart and
    `frame_count` is the number of packets: the decode counts the frames).
    duration: from the first frame to the end of the last (frame_count / fps at a constant rate).
    variable_rate: the frames are not evenly spaced. tags: the container's metadata.
    video_start, audio_start: seconds from the file's start to its first frame and to its audio's
    first sample (0 without audio), which place the audio against the frames.
    """

    path: Path
    width: int
    height: int
    fps: float
    frame_count: int
    duration: float
    rotation: int
    has_audio: bool
    rate: Fraction = Fraction(0)
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    timestamps: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    variable_rate: bool = False
    video_start: float = 0.0
    audio_start: float = 0.0


@dataclasses.dataclass(frozen=True)
class AudioTrack:
    """The first audio stream of `path`, muxed `shift` seconds later than it lies in `path` (ffmpeg's
    `-itsoffset`; ffmpeg counts a file's time from its first packet): where its sound belongs
    against the first frame of the video it goes with."""

    path: Path
    shift: float = 0.0


def audio_track(info: VideoInfo) -> AudioTrack | None:
    """The clip's audio as it sounds against the clip's first frame; None without audio."""
    return AudioTrack(info.path, -info.video_start) if info.has_audio else None


@dataclasses.dataclass(frozen=True)
class _Header:
    """What ffmpeg prints about a file when it opens it (nothing decoded): streams, size, rate, rotation, tags."""

    container: str
    has_video: bool
    has_audio: bool
    rate: Fraction | None
    size: tuple[int, int] | None
    rotation: int
    tags: dict[str, str]
    start: float = 0.0  # the file's start time
    audio_start: float | None = None  # the first audio stream's, None without audio
    audio_rate: int | None = None  # ... its sample rate
    audio_channels: int = 0  # ... its channels as decoded (1: mono, 2: stereo or more mixed down)


def ffmpeg_exe() -> str:
    """imageio-ffmpeg's binary (a dependency), else the system's: a machine given only the Python
    packages (a borrowed GPU's, benchmarks/gpu_check.sh) can still read and write clips."""
    try:
        import imageio_ffmpeg
    except ImportError:
        found = shutil.which("ffmpeg")
        if not found:
            raise HellomemeError("no ffmpeg: install imageio-ffmpeg (pip install imageio-ffmpeg) or put ffmpeg on PATH") from None
        return found
    return imageio_ffmpeg.get_ffmpeg_exe()


def probe_video(path: Path) -> VideoInfo:
    """Size, exact rate, frame count and each frame's time, rotation and audio of a clip, from one
    ffmpeg run that demuxes the video packets without decoding them."""
    path = Path(path)
    require_file(path)
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "level+info", "-i", str(path)]
    command += ["-map", "0:V:0?", "-c", "copy", "-f", "framecrc", "-"]
    result = subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL, text=True, errors="replace")
    header = _video_header(path, _parse_header(path, result.stderr))
    if errors := _error_lines(result.stderr):
        raise HellomemeError(f"{path}: corrupt or truncated video (ffmpeg: {_last_line(errors)})")
    packets = _packets(result.stdout)
    if not packets.count:
        raise HellomemeError(f"{path}: the video has no frames")
    rate, timestamps, duration, variable = _timing(packets, header.rate)
    if not rate:
        raise HellomemeError(f"{path}: the video does not say its frame rate")
    first_frame = float(packets.pts[0] * packets.time_base) if packets.pts is not None else 0.0
    return VideoInfo(
        path=path,
        width=header.size[0],
        height=header.size[1],
        fps=float(rate),
        frame_count=packets.count,
        duration=duration,
        rotation=header.rotation,
        has_audio=header.has_audio,
        rate=rate,
        tags={**header.tags, **tags_in(path, header.tags)} if header.container in ("gif", "webp_anim") else header.tags,
        timestamps=timestamps,
        variable_rate=variable,
        video_start=first_frame,
        audio_start=0.0 if header.audio_start is None else header.audio_start - header.start,
    )


def read_frames(path: Path | VideoInfo, max_frames: int | None = None, *, audio_to: Path | None = None) -> Iterator[np.ndarray]:
    """The clip's frames as RGB uint8 (H, W, 3), decoded one at a time, rotation applied, none dropped.

    Given a `VideoInfo` (from `probe_video`) the clip is decoded without opening it again. The file
    is checked before this returns; decoding errors (a damaged or cut file) surface while iterating,
    after the last good frame. With `audio_to` (and a `VideoInfo` that has audio) the same run writes
    the clip's audio into that file, decoded (WAV, 32-bit float) and starting at the first frame, so
    muxing it later (`AudioTrack(audio_to)`) need not open the clip again.
    """
    if isinstance(path, VideoInfo):
        audio = None
        if audio_to is not None and path.has_audio:
            shown = path.frame_count if max_frames is None else min(max_frames, path.frame_count)
            # Audio past the frames kept cannot sound; a second more covers the last frame's length.
            until = None if shown == path.frame_count or path.timestamps is None else float(path.timestamps[shown]) + 1
            audio = (Path(audio_to), path.video_start, until)
        return _decode(path.path, path.width, path.height, max_frames, audio)
    path = Path(path)
    width, height = _video_header(path, _header(path)).size
    return _decode(path, width, height, max_frames, None)


def read_image(path: Path) -> np.ndarray:
    """An image as RGB uint8 (H, W, 3): EXIF orientation applied, transparency composited onto white."""
    path = Path(path)
    require_file(path)
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as error:
        raise HellomemeError(f"{path}: cannot read ({error.strerror})") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR_RGB) if data.size else None
    if image is None:
        raise HellomemeError(f"{path}: not an image, or a corrupt one")
    unchanged = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if unchanged.ndim == 3 and unchanged.shape[2] == 4:
        image = _composite_on_white(unchanged)
    return image


def write_video(
    frames: Iterable[np.ndarray],
    path: Path,
    fps: float | Fraction,
    *,
    audio_from: Path | VideoInfo | AudioTrack | None = None,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
    protect: Iterable[Path] = (),
    progress: ProgressCallback = no_progress,
    total: int | None = None,
) -> Path:
    """Encode RGB uint8 frames to an H.264 mp4 at `fps`, one output frame per frame given; returns `path`.

    The audio of `audio_from` (if it has any) is muxed as AAC, cut or padded with silence to the video's
    length: a probed clip's (`VideoInfo`) placed against its first frame as it sounds in the clip, an
    `AudioTrack` as it says, a plain file's as it lies in the file. Odd widths/heights are padded to even (yuv420p needs it) by repeating the last column/row.
    The file appears only when ffmpeg succeeded: it is written to a temporary file beside `path` first.
    """
    path = Path(path)
    muxer = VIDEO_SUFFIXES.get(path.suffix.lower())
    if muxer is None:
        raise HellomemeError(f"{path}: videos are written as {', '.join(VIDEO_SUFFIXES)}, not {path.suffix or 'no extension'}")
    sources = [audio_from.path] if isinstance(audio_from, (VideoInfo, AudioTrack)) else [audio_from] if audio_from is not None else []
    check_destination(path, force, [*protect, *sources])
    audio = _audio(audio_from)
    rate = _exact_rate(fps)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise HellomemeError(f"{path}: no frames to write")
    _check_frame(path, 0, first, first.shape)
    height, width = _even(first.shape[0]), _even(first.shape[1])

    command = [ffmpeg_exe(), "-y", "-nostdin", "-v", "error"]
    command += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(rate), "-i", "pipe:0"]
    if audio is not None:
        command += ["-itsoffset", f"{audio.shift:.6f}"]
        if total is not None:  # read no more of it than can sound
            command += ["-t", f"{max(float(total / rate) - audio.shift, 0) + 1:.6f}"]
        command += ["-i", str(audio.path), "-map", "0:v:0", "-map", "1:a:0"]
        # Silence before a late first sample (and nothing of what comes before the first frame); with the
        # frame count known, cut and padded to the exact video duration: `-shortest` alone overshoots by
        # what the muxer buffered (worse on a busy machine).
        timing = "aresample=async=1:first_pts=0,apad"  # without the frame count `-shortest` ends the padding with the video
        if total is not None:
            timing += f"=whole_dur={float(total / rate):.6f},atrim=end={float(total / rate):.6f}"
        command += ["-c:a", "aac", "-b:a", AUDIO_BITRATE, "-af", timing, *([] if total else ["-shortest"])]
    command += ["-fps_mode", "passthrough", "-vf", TO_BT709_YUV420P]
    command += ["-c:v", "libx264", "-crf", str(VIDEO_CRF), "-preset", "medium"]
    command += ["-movflags", "+faststart+use_metadata_tags"]
    for key, value in (metadata or {}).items():
        command += ["-metadata", f"{key}={value}"]

    with atomic_output(path) as temporary, tempfile.TemporaryFile() as errors:
        process = subprocess.Popen([*command, "-f", muxer, str(temporary)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            _feed(process, path, first, frames, progress, total)
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
            process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if process.returncode != 0:
            raise _ffmpeg_failure(path, _tail(errors))
    return path


def _audio(source: Path | VideoInfo | AudioTrack | None) -> AudioTrack | None:
    """What `write_video` muxes: None where the source has no audio."""
    if source is None or isinstance(source, AudioTrack):
        return source
    if isinstance(source, VideoInfo):
        return audio_track(source)
    return AudioTrack(Path(source)) if _header(Path(source)).has_audio else None


def read_audio(path: Path) -> tuple[np.ndarray, int] | None:
    """The first audio stream decoded: (channels, samples) float32 and its sample rate, mono kept
    mono and more channels mixed down to stereo; None when the file has no audio."""
    path = Path(path)
    header = _header(path)
    if not header.has_audio:
        return None
    if header.audio_rate is None:
        raise HellomemeError(f"{path}: the audio does not say its sample rate")
    channels = header.audio_channels
    command = [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", str(channels), "-f", "f32le", "-c:a", "pcm_f32le", "pipe:1"]
    result = subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise HellomemeError(f"{path}: cannot decode its audio (ffmpeg: {_last_line(result.stderr.decode(errors='replace'))})")
    samples = np.frombuffer(result.stdout, np.float32)
    return samples[: len(samples) // channels * channels].reshape(-1, channels).T.copy(), header.audio_rate


def write_audio(samples: np.ndarray, rate: int, path: Path) -> Path:
    """(channels, samples) float audio at `rate` written as a 32-bit float WAV (atomically), for a
    video to mux (`write_video(audio_from=...)`)."""
    samples = np.ascontiguousarray(np.asarray(samples, np.float32).T)  # interleaved, as raw audio is
    command = [ffmpeg_exe(), "-nostdin", "-v", "error", "-f", "f32le", "-ar", str(int(rate)), "-ac", str(samples.shape[1]), "-i", "pipe:0"]
    with atomic_output(Path(path)) as temporary:
        result = subprocess.run([*command, "-c:a", "pcm_f32le", "-rf64", "auto", "-f", "wav", "-y", str(temporary)], input=samples.tobytes(), capture_output=True)
        if result.returncode != 0:
            raise _ffmpeg_failure(Path(path), result.stderr.decode(errors="replace"))
    return Path(path)


def write_image(
    image: np.ndarray, path: Path, force: bool = False, protect: Iterable[Path] = (), tags: Mapping[str, str] | None = None
) -> Path:
    """Save an RGB uint8 image (format from the extension) atomically; returns `path`. `tags` go into
    a PNG's text chunks (the seed a picture was made with, as a video's metadata holds it)."""
    path = Path(path)
    check_destination(path, force, protect)
    try:
        ok, encoded = cv2.imencode(path.suffix, np.ascontiguousarray(image[..., ::-1]))
    except cv2.error:
        ok = False
    if not ok:
        raise HellomemeError(f"{path}: cannot write an image with extension {path.suffix or '(none)'}")
    data = encoded.tobytes()
    if tags and data.startswith(PNG_SIGNATURE):
        data = _with_png_text(data, tags)
    return write_atomically(path, data)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# OpenCV writes no PNG text chunks, and a picture's seed is a dozen bytes: the chunks are written here.
def _with_png_text(data: bytes, tags: Mapping[str, str]) -> bytes:
    """`data` (a PNG) with one tEXt chunk per tag after its header chunk."""
    header_end = len(PNG_SIGNATURE) + 8 + int.from_bytes(data[8:12], "big") + 4
    chunks = b""
    for key, value in tags.items():
        body = b"tEXt" + key.encode("latin-1") + b"\0" + value.encode("latin-1")
        chunks += (len(body) - 4).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    return data[:header_end] + chunks + data[header_end:]


def image_tags(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG (what `write_image` stored); {} for other formats."""
    data = Path(path).read_bytes()
    tags, position = {}, len(PNG_SIGNATURE)
    if not data.startswith(PNG_SIGNATURE):
        return tags
    while position + 8 <= len(data):
        length, kind = int.from_bytes(data[position:position + 4], "big"), data[position + 4:position + 8]
        if kind == b"tEXt":
            key, _, value = data[position + 8:position + 8 + length].partition(b"\0")
            tags[key.decode("latin-1")] = value.decode("latin-1")
        if kind == b"IEND":
            break
        position += 12 + length
    return tags


# -- reading -----------------------------------------------------------------


def _header(path: Path) -> _Header:
    """Open the file with ffmpeg (no output: it prints the header and stops) and parse the header."""
    require_file(path)
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)]
    return _parse_header(path, subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL, text=True, errors="replace").stderr)


def _parse_header(path: Path, text: str) -> _Header:
    text = re.sub(r"^\[info\] ", "", text, flags=re.MULTILINE)
    opened = re.search(r"^Input #0, ([^,]+)", text, re.MULTILINE)
    if opened is None:
        reason = _last_line(text).rpartition(": ")[2]
        raise HellomemeError(f"{path}: not a video or audio file ffmpeg can read ({reason or 'no message'})")
    input_part = text.split("Stream mapping:")[0].split("Output #0")[0]
    streams = re.findall(r"^\s*Stream #0:\d+\S*: (Video|Audio): (.*)$", input_part, re.MULTILINE)
    audios = [rest for kind, rest in streams if kind == "Audio"]
    file_start = re.search(r"^\s*Duration: .*, start: (-?[\d.]+)", input_part, re.MULTILINE)
    # ffmpeg names a stream's start only where it is not 0.
    audio_start = None if not audios else float(stream_start[1]) if (stream_start := re.search(r", start (-?[\d.]+)", audios[0])) else 0.0
    audio_rate = int(sampled[1]) if audios and (sampled := re.search(r", (\d+) Hz", audios[0])) else None
    videos = [rest for kind, rest in streams if kind == "Video" and "(attached pic)" not in rest]
    rate = size = None
    rotation = 0
    if videos:
        if stored := re.search(r", (\d+)x(\d+)", videos[0]):
            size = (int(stored[1]), int(stored[2]))
        if printed := re.search(r", ([\d.]+)(k?) fps", videos[0]) or re.search(r", ([\d.]+)(k?) tbr", videos[0]):
            rate = _snap_rate(float(printed[1]) * (1000 if printed[2] else 1))
        video_part = input_part.split(videos[0], 1)[1].split("Stream #0:")[0]
        if turned := re.search(r"rotation of (-?[\d.]+) degrees", video_part):
            rotation = round(float(turned[1])) % 360
    if size is not None and rotation in (90, 270):
        size = size[::-1]
    return _Header(
        container=opened[1],
        has_video=bool(videos),
        has_audio=bool(audios),
        rate=rate,
        size=size,
        rotation=rotation,
        tags=_container_tags(input_part),
        start=float(file_start[1]) if file_start else 0.0,
        audio_start=audio_start,
        audio_rate=audio_rate,
        audio_channels=0 if not audios else 1 if re.search(r"\bmono\b", audios[0]) else 2,
    )


def _video_header(path: Path, header: _Header) -> _Header:
    if IMAGE_FORMATS.match(header.container):
        raise HellomemeError(f"{path}: is an image, not a video")
    if not header.has_video:
        raise HellomemeError(f"{path}: has no video stream")
    if header.size is None:
        raise HellomemeError(f"{path}: the video does not say its frame size")
    return header


def _container_tags(input_part: str) -> dict[str, str]:
    """The `Metadata:` block right under `Input #0` (two-space indent), not the streams' own blocks."""
    block = re.search(r"^  Metadata:\n((?:    .*\n)+)", input_part, re.MULTILINE)
    if block is None:
        return {}
    tags = {}
    for line in block[1].splitlines():
        key, _, value = line.strip().partition(":")
        tags[key.strip().lower()] = value.strip()  # Matroska (WebM) keeps its tags upper-case
    return tags


@dataclasses.dataclass(frozen=True)
class _Packets:
    """The video packets framecrc listed, shown ones only, in display order (ticks of `time_base`)."""

    count: int
    pts: np.ndarray | None  # None: some packet had no timestamp, or two had the same
    last_duration: int
    time_base: Fraction


def _packets(listing: str) -> _Packets:
    base = re.search(r"^#tb 0: (\d+)/(\d+)$", listing, re.MULTILINE)
    time_base = Fraction(int(base[1]), int(base[2])) if base else Fraction(0)
    shown = []
    for line in listing.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        fields = [field.strip() for field in line.split(",")]
        flags = next((int(field[2:], 16) for field in fields[6:] if field.startswith("F=")), 0)
        if not flags & _DISCARD_FLAG:
            shown.append((int(fields[2]), int(fields[3])))
    pts = np.array(sorted(stamp for stamp, _ in shown), np.int64)
    usable = time_base > 0 and len(pts) > 0 and pts[0] != _NO_TIMESTAMP and (np.diff(pts) > 0).all()
    last_duration = max(shown)[1] if shown else 0
    return _Packets(len(shown), pts if usable else None, last_duration, time_base)


def _timing(packets: _Packets, header_rate: Fraction | None) -> tuple[Fraction | None, np.ndarray | None, float, bool]:
    """(rate, timestamps, duration, variable) from the packets' timestamps, or from the header's rate
    where the container gives none."""
    if packets.pts is None:
        return header_rate, None, packets.count / float(header_rate or 1), False
    ticks = packets.pts - packets.pts[0]
    timestamps = ticks * float(packets.time_base)
    if packets.count == 1:
        rate = Fraction(1, packets.last_duration * packets.time_base) if packets.last_duration > 0 else header_rate
        return rate, timestamps, 1 / float(rate or 1), False
    intervals = np.diff(ticks)
    mean = ticks[-1] / (packets.count - 1)
    spread = max(intervals.max() - mean, mean - intervals.min())
    if spread <= max(CONSTANT_RATE_TICKS, CONSTANT_RATE_TOLERANCE * mean):
        if intervals.min() == intervals.max():
            rate = 1 / (int(intervals[0]) * packets.time_base)
        else:
            rate = _rounded_rate(packets.count - 1, int(ticks[-1]), packets.time_base)
        return rate, timestamps, packets.count / float(rate), False
    fastest = 1 / (int(intervals.min()) * packets.time_base)
    rate = next((standard for standard in STANDARD_RATES if standard >= fastest * (1 - CONSTANT_RATE_TOLERANCE)), STANDARD_RATES[-1])
    last = packets.last_duration if packets.last_duration > 0 else int(np.median(intervals))
    return rate, timestamps, float((int(ticks[-1]) + last) * packets.time_base), True


def _rounded_rate(intervals: int, ticks: int, time_base: Fraction) -> Fraction:
    """The rate of `intervals` frame intervals spanning `ticks` whose timestamps were rounded to the
    time base (GIF: 1/100 s, WebP and WebM: 1/1000 s): the standard or whole rate nearest the mean
    that such rounding allows (a tick either way), else the mean as a fraction."""
    mean = Fraction(intervals, ticks * time_base)
    low, high = Fraction(intervals, (ticks + 1) * time_base), Fraction(intervals, max(ticks - 1, 1) * time_base)
    candidates = [rate for rate in (*STANDARD_RATES, *map(Fraction, range(1, 241))) if low <= rate <= high]
    return min(candidates, key=lambda rate: abs(rate - mean)) if candidates else mean.limit_denominator(1001)


def _snap_rate(fps: float) -> Fraction | None:
    """A rate ffmpeg printed rounded (29.97) as the fraction it stands for (30000/1001)."""
    if fps <= 0:
        return None
    ntsc = Fraction(round(fps * 1.001) * 1000, 1001)
    if abs(float(ntsc) - fps) < 0.006 and ntsc.denominator == 1001:
        return ntsc
    return Fraction(fps).limit_denominator(1000)


def _error_lines(log: str) -> str:
    """The error-level lines of a `-loglevel level+info` log."""
    return "\n".join(line for line in log.splitlines() if re.search(r"\[(error|fatal|panic)\] ", line))


def _raise_on_decode_errors(path: Path, returncode: int, errors: str) -> None:
    """A clip that decodes with errors (cut short, damaged) is refused rather than used in part."""
    if returncode != 0 or errors.strip():
        raise HellomemeError(f"{path}: corrupt or truncated video (ffmpeg: {_last_line(errors) or f'exit {returncode}'})")


def _decode(
    path: Path, width: int, height: int, max_frames: int | None, audio: tuple[Path, float, float | None] | None
) -> Iterator[np.ndarray]:
    """`audio`: (file, first frame's time, seconds after it to keep or None) for the audio output."""
    # Frames keep the demuxer's time base: in a coarser one two close frames of a variable-rate clip collide.
    command = [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:V:0", "-fps_mode", "passthrough"]
    command += ["-enc_time_base", "demux"]
    if max_frames is not None:
        command += ["-frames:v", str(max_frames)]
    command += ["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    if audio is not None:
        # Decoded, as a stream copy would lose an AAC encoder's priming in most containers: silence where
        # the sound starts after the file does, then cut to start at the first frame, as `AudioTrack` places it.
        audio_to, first_frame, keep = audio
        placed = f"aresample=async=1:first_pts=0,atrim=start={first_frame:.6f},asetpts=PTS-STARTPTS"
        command += ["-map", "0:a:0", "-af", placed, *(["-t", f"{keep:.6f}"] if keep is not None else [])]
        command += ["-c:a", "pcm_f32le", "-rf64", "auto", "-f", "wav", "-y", str(audio_to)]
    frame_bytes = width * height * 3
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL)
        try:
            count = 0
            while True:
                frame = np.empty((height, width, 3), np.uint8)
                received = process.stdout.readinto(memoryview(frame).cast("B"))
                if received == 0:
                    break
                if received < frame_bytes:
                    raise HellomemeError(f"{path}: corrupt video (frame {count} is cut short)")
                count += 1
                yield frame
            process.wait()
            _raise_on_decode_errors(path, process.returncode, _tail(errors))
            if count == 0:
                raise HellomemeError(f"{path}: the video has no frames")
        finally:
            process.stdout.close()
            if process.poll() is None:
                process.kill()
                process.wait()


def _composite_on_white(bgra: np.ndarray) -> np.ndarray:
    scale = float(np.iinfo(bgra.dtype).max)
    colour = bgra[..., 2::-1].astype(np.float32) / scale
    alpha = bgra[..., 3:].astype(np.float32) / scale
    return np.rint((colour * alpha + (1.0 - alpha)) * 255.0).astype(np.uint8)


# -- writing -----------------------------------------------------------------


def _exact_rate(fps: float | Fraction) -> Fraction:
    rate = Fraction(fps).limit_denominator(MAX_RATE_DENOMINATOR)
    if rate <= 0:
        raise HellomemeError(f"frame rate must be positive, not {fps}")
    return rate


def _even(n: int) -> int:
    return n + n % 2


def _check_frame(path: Path, index: int, frame: np.ndarray, shape: tuple[int, ...]) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        described = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise HellomemeError(f"{path}: frame {index} is {described}, not RGB uint8 (H, W, 3)")
    if frame.shape != shape:
        raise HellomemeError(f"{path}: frame {index} is {frame.shape[1]}x{frame.shape[0]}, frame 0 was {shape[1]}x{shape[0]}")


def _feed(
    process: subprocess.Popen,
    path: Path,
    first: np.ndarray,
    rest: Iterator[np.ndarray],
    progress: ProgressCallback,
    total: int | None,
) -> None:
    """Write every frame to ffmpeg's stdin; stops quietly if ffmpeg died (its exit code says why)."""
    for index, frame in enumerate(itertools.chain([first], rest)):
        _check_frame(path, index, frame, first.shape)
        if frame.shape[0] % 2 or frame.shape[1] % 2:
            frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
        try:
            process.stdin.write(np.ascontiguousarray(frame).data)
        except BrokenPipeError:
            return
        progress(ProgressEvent("writing", index + 1, total, unit="frames"))


def _ffmpeg_failure(path: Path, errors: str) -> HellomemeError:
    if "No space left on device" in errors:
        return HellomemeError(f"{path}: disk full (no space left on device)")
    return HellomemeError(f"{path}: ffmpeg failed ({_last_line(errors) or 'no message'})")


def _tail(file) -> str:
    """The last few KiB ffmpeg wrote to a temporary stderr file."""
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - 8192))
    return file.read().decode(errors="replace")


def _last_line(text: str) -> str:
    """ffmpeg's last message, without its `[component @ 0x...]` prefixes."""
    lines = [re.sub(r"^(\[[^\]]*\]\s*)+", "", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("Last message repeated")]
    return lines[-1] if lines else ""
