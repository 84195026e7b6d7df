"""What an output is, declared once: the formats by suffix, the sticker platforms' limits, the loops.

Nothing here encodes (media/meme.py does) and nothing heavy is imported: the settings checks and
the preflight read these declarations before a model loads. GIF and WebP have no metadata ffmpeg
writes, so a clip's tags (its seed, the batch digest) go into a GIF comment or a WebP XMP chunk here.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path

from hellomeme_cli.errors import HellomemeError


@dataclasses.dataclass(frozen=True)
class OutputFormat:
    """One kind of output file. `tick`: frame delays are whole multiples of it (None: any rate is
    exact); `max_rate`: the fastest rate written (faster clips are resampled to it)."""

    name: str
    label: str
    suffixes: tuple[str, ...]
    sound: bool
    tick: Fraction | None = None
    max_rate: Fraction | None = None
    quality: bool = False  # takes --quality


FORMATS = {
    "mp4": OutputFormat("mp4", "H.264 mp4", (".mp4", ".m4v", ".mov"), sound=True),
    # Browsers play a GIF delay under 2/100 s as 10/100 s: 50 fps is the fastest a GIF shows.
    "gif": OutputFormat("gif", "GIF", (".gif",), sound=False, tick=Fraction(1, 100), max_rate=Fraction(50)),
    "webp": OutputFormat("webp", "animated WebP", (".webp",), sound=False, tick=Fraction(1, 1000), quality=True),
    "webm": OutputFormat("webm", "VP9 WebM", (".webm",), sound=True, quality=True),
}
OUTPUT_SUFFIXES = {suffix: output for output in FORMATS.values() for suffix in output.suffixes}
DEFAULT_FORMAT = "mp4"
DEFAULT_QUALITY = 75  # --quality: libwebp's own default; VP9 CRF 30 (`vp9_crf`)


def vp9_crf(quality: int) -> int:
    """--quality (1-100) as VP9's CRF (0-63, lower is better): 75 gives 30, a good 512-pixel clip."""
    return round(60 - 0.4 * quality)


def format_of(path: Path) -> OutputFormat:
    """The format an output's suffix names, or one line listing the suffixes written."""
    path = Path(path)
    found = OUTPUT_SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise HellomemeError(f"{path}: clips are written as {', '.join(OUTPUT_SUFFIXES)}, not {path.suffix or 'no extension'}")
    return found


@dataclasses.dataclass(frozen=True)
class Sticker:
    """A platform's published limits for an animated sticker (docs/usage.md says where each comes from).

    side: the longer side is made exactly this many pixels; square: both sides are (the picture is
    padded with transparency); max_seconds: longer clips are cut to their first `max_seconds`."""

    name: str
    format: str
    side: int
    square: bool
    max_seconds: float
    max_rate: Fraction | None
    max_kb: int
    source: str


STICKERS = {
    "telegram": Sticker("telegram", "webm", 512, False, 3.0, Fraction(30), 256, "core.telegram.org/stickers (video stickers)"),
    "whatsapp": Sticker("whatsapp", "webp", 512, True, 10.0, None, 500, "github.com/WhatsApp/stickers (Android README, animated stickers)"),
}

LOOPS = ("off", "pingpong", "crossfade")
DEFAULT_CROSSFADE = 8


@dataclasses.dataclass(frozen=True)
class Loop:
    """`--loop`: off, pingpong (forward then back, the turning frames once) or crossfade (the last
    `frames` frames blended into the first)."""

    kind: str = "off"
    frames: int = 0

    def count(self, made: int) -> int:
        """How many frames a clip of `made` frames has once looped."""
        if self.kind == "pingpong":
            return max(made, 2 * made - 2)
        return made - self.frames if self.kind == "crossfade" else made

    def __str__(self) -> str:
        return f"crossfade:{self.frames}" if self.kind == "crossfade" else self.kind


def parse_loop(value: str) -> Loop:
    """`off`, `pingpong`, `crossfade` (8 frames), `crossfade:N` (also `crossfade N`, `crossfade=N`)."""
    text = str(value).strip().lower()
    parts = re.split(r"[\s:=]+", text, maxsplit=1)
    kind, frames = parts[0], parts[1] if len(parts) > 1 else None
    if kind not in LOOPS or (frames is not None and kind != "crossfade"):
        raise HellomemeError(f"--loop must be off, pingpong or crossfade:N (got {value!r})")
    if kind != "crossfade":
        return Loop(kind)
    if frames is None:
        return Loop(kind, DEFAULT_CROSSFADE)
    if not frames.isdigit() or int(frames) < 1:
        raise HellomemeError(f"--loop crossfade:N takes a number of frames, at least 1 (got {value!r})")
    return Loop(kind, int(frames))


@dataclasses.dataclass(frozen=True)
class OutputPlan:
    """How one clip is written: its format, the limits it is made to fit, its loop."""

    format: OutputFormat
    sticker: Sticker | None = None
    max_kb: int | None = None  # the smaller of --max-kb and the sticker's
    quality: int = DEFAULT_QUALITY
    loop: Loop = Loop()

    @property
    def max_rate(self) -> Fraction | None:
        rates = [rate for rate in (self.format.max_rate, self.sticker and self.sticker.max_rate) if rate]
        return min(rates) if rates else None

    @property
    def max_seconds(self) -> float | None:
        return self.sticker.max_seconds if self.sticker else None

    @property
    def streamed(self) -> bool:
        """Written as the frames come (a plain mp4); anything else keeps them to encode again."""
        return self.format.name == "mp4" and self.max_kb is None and self.loop.kind == "off"

    @property
    def sound(self) -> bool:
        """Whether the file keeps the clip's audio (else the result says why not)."""
        return self.format.sound and self.sticker is None and self.loop.kind != "pingpong"


def output_plan(
    path: Path, *, format: str | None = None, sticker: str | None = None, max_kb: int | None = None,
    quality: int | None = None, loop: str = "off",
) -> OutputPlan:
    """The plan for writing `path` with these settings; a suffix that is not the format asked for,
    or a setting the format does not take, is one line naming both."""
    path = Path(path)
    chosen = format_of(path)
    wanted = STICKERS[sticker] if sticker else None
    if format and format != chosen.name:
        raise HellomemeError(f"{path}: --format {format} writes {', '.join(FORMATS[format].suffixes)}, not {path.suffix}")
    if wanted and wanted.format != chosen.name:
        raise HellomemeError(f"{path}: {wanted.name} stickers are {FORMATS[wanted.format].label} ({FORMATS[wanted.format].suffixes[0]}), not {path.suffix}")
    if quality is not None and not chosen.quality:
        raise HellomemeError(f"{path}: --quality applies to .webp and .webm outputs ({chosen.label} has none; --max-kb sets its size)")
    limits = [kb for kb in (max_kb, wanted and wanted.max_kb) if kb]
    return OutputPlan(chosen, wanted, min(limits) if limits else None, DEFAULT_QUALITY if quality is None else quality, parse_loop(loop))


def output_suffix(format: str | None = None, sticker: str | None = None) -> str:
    """The suffix of a default output name: the sticker's format, the format's, else .mp4."""
    name = STICKERS[sticker].format if sticker else format or DEFAULT_FORMAT
    return FORMATS[name].suffixes[0]


# -- tags of the formats ffmpeg writes no metadata into -------------------------------------

GIF_HEADER = 13  # "GIF89a" and the logical screen descriptor
XMP_NAMESPACE = "https://github.com/hellomeme-cli/tags"


def with_tags(data: bytes, format: str, tags: Mapping[str, str]) -> bytes:
    """`data` (a GIF or an animated WebP as ffmpeg wrote it) carrying `tags` as JSON: in a GIF
    comment extension (ffmpeg reads it back as the `comment` tag) or a WebP XMP chunk."""
    text = json.dumps(dict(tags), separators=(",", ":"), ensure_ascii=True)
    if format == "gif":
        return _gif_with_comment(data, text.encode())
    if format == "webp":
        return _webp_with_xmp(data, text)
    return data


def tags_in(path: Path, container_tags: Mapping[str, str]) -> dict[str, str]:
    """The tags `with_tags` wrote into a GIF (its comment, as ffmpeg read it) or a WebP (read
    here: ffmpeg reads no WebP metadata); {} when there are none."""
    comment = container_tags.get("comment", "")
    if comment.startswith("{"):
        try:
            return {str(key): str(value) for key, value in json.loads(comment).items()}
        except ValueError:
            return {}
    if Path(path).suffix.lower() != ".webp":
        return {}
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return {}
    found = re.search(rb'hellomeme:tags="([^"]*)"', data[-65536:])
    if not found:
        return {}
    try:
        return {str(key): str(value) for key, value in json.loads(html.unescape(found[1].decode("utf-8"))).items()}
    except ValueError:
        return {}


# GIF and WebP containers are a few fixed-layout blocks; no library at hand writes a comment or an
# XMP chunk into a file ffmpeg made, so the bytes are put in here (GIF89a spec, RIFF/WebP container spec).
def _gif_with_comment(data: bytes, comment: bytes) -> bytes:
    """A comment extension (0x21 0xFE, sub-blocks of at most 255 bytes) right after the header
    and the global colour table, where a demuxer meets it before the first frame."""
    flags = data[10]
    start = GIF_HEADER + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    blocks = b"".join(bytes([len(chunk)]) + chunk for chunk in (comment[i:i + 255] for i in range(0, len(comment), 255)))
    return data[:start] + b"\x21\xfe" + blocks + b"\x00" + data[start:]


def _webp_with_xmp(data: bytes, text: str) -> bytes:
    """An XMP chunk at the end of the RIFF, the XMP flag set in the VP8X header, the RIFF size mended."""
    packet = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description xmlns:hellomeme="{XMP_NAMESPACE}" hellomeme:tags="{html.escape(text, quote=True)}"/>'
        "</rdf:RDF></x:xmpmeta>"
    ).encode()
    chunk = b"XMP " + len(packet).to_bytes(4, "little") + packet + (b"\x00" if len(packet) % 2 else b"")
    body = bytearray(data + chunk)
    if body[12:16] == b"VP8X":
        body[20] |= 0x04  # the XMP flag
    body[4:8] = (len(body) - 8).to_bytes(4, "little")
    return bytes(body)
