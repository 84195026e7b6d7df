"""Meme captions: white condensed bold letters with a black outline, top and bottom, fitted to the width.

The text is laid out and drawn by Pillow (FreeType, with raqm's shaping where Pillow has it) into a
transparent layer the size of the output frame, once per size, then laid over every frame. The font
is Anton (SIL Open Font License, the `fontpkg-anton` package), an Impact-like condensed bold; what
Anton lacks (Cyrillic, Greek, many symbols) comes from DejaVu Sans Bold (Bitstream Vera licence,
shipped by matplotlib). A character neither font has (CJK, emoji) is refused in one line naming
it, never drawn as a box; `--caption-font FILE` gives a font that has them.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from hellomeme_cli.errors import HellomemeError

MARGIN = 0.03  # of the width, left and right of the text, and of the height above and below it
START_SIZE = 0.11  # the letters' size (em) as a share of the frame's height, shrunk until the text fits
MAX_BAND = 0.3  # a caption may take at most this share of the frame's height
MIN_SIZE = 8  # pixels: smaller letters are not worth drawing
OUTLINE = 0.08  # the black outline's width, as a share of the letters' size
LINE_SPACING = 1.05


@functools.cache
def default_fonts() -> tuple[Path, ...]:
    """Anton, then DejaVu Sans Bold for what it lacks."""
    import fontpkg
    import matplotlib

    return (Path(fontpkg.path("Anton")), Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf")


@functools.cache
def _font_file(font: Path) -> tuple[str, frozenset[str]]:
    """A font's full name and the characters it has glyphs for (its Unicode cmap)."""
    from fontTools.ttLib import TTFont, TTLibError

    try:
        with TTFont(font, lazy=True, fontNumber=0) as loaded:
            return str(loaded["name"].getDebugName(4) or font.stem), frozenset(map(chr, loaded.getBestCmap() or {}))
    except (OSError, TTLibError, AssertionError, KeyError) as error:
        raise HellomemeError(f"{font}: not a font file (.ttf, .otf) that can be read ({error})") from None


def _characters(font: Path) -> frozenset[str]:
    return _font_file(font)[1]


def font_chain(font: Path | None) -> tuple[Path, ...]:
    """The fonts a caption is drawn with, in order of preference."""
    if font is None:
        return default_fonts()
    font = Path(font)
    if not font.is_file():
        raise HellomemeError(f"{font}: no such font file (--caption-font)")
    return (font,)


def check_caption(text: str, font: Path | None = None, option: str = "--caption") -> None:
    """One line naming the characters no font of the chain has, if any (spaces need no glyph)."""
    chain = font_chain(font)
    known = frozenset().union(*(_characters(path) for path in chain))
    missing = sorted({char for char in text if not char.isspace() and char not in known})
    if missing:
        names = " and ".join(_font_file(path)[0] for path in chain)
        shown = " ".join(f"{char} (U+{ord(char):04X})" for char in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise HellomemeError(f"{option} {text!r}: {names} {'has' if len(chain) == 1 else 'have'} no glyph for {shown}: give --caption-font FILE, a font that has them")


@dataclasses.dataclass(frozen=True)
class Captions:
    """A top and a bottom line of text (either may be None) and the font to draw them in."""

    top: str | None = None
    bottom: str | None = None
    font: Path | None = None

    def __bool__(self) -> bool:
        return bool(self.top or self.bottom)

    @functools.cache
    def layer(self, width: int, height: int) -> np.ndarray:
        """The captions drawn on a transparent (height, width, 4) uint8 RGBA layer; the text of
        each is wrapped at spaces, then shrunk, to fit the width and at most `MAX_BAND` of the height."""
        from PIL import Image, ImageDraw

        canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        draw = ImageDraw.Draw(canvas)
        chain = font_chain(self.font)
        for text, at_top in ((self.top, True), (self.bottom, False)):
            if text and text.strip():
                _draw(draw, text.strip(), at_top, width, height, chain)
        return np.asarray(canvas)

    def band(self, width: int, height: int) -> tuple[int, int] | None:
        """The rows [first, last) the drawn text covers (None without captions)."""
        rows = np.flatnonzero(self.layer(width, height)[..., 3].any(axis=1))
        return (int(rows[0]), int(rows[-1]) + 1) if len(rows) else None

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """`frame` (RGB uint8) with the captions laid over it."""
        layer = self.layer(frame.shape[1], frame.shape[0])
        # Blended here, where the frames pass anyway: one numpy expression, not a second ffmpeg input per encoder.
        alpha = layer[..., 3:].astype(np.float32) / 255.0
        return np.rint(frame * (1.0 - alpha) + layer[..., :3] * alpha).astype(np.uint8)


def _draw(draw, text: str, at_top: bool, width: int, height: int, chain: tuple[Path, ...]) -> None:
    """One caption: the largest size (from `START_SIZE` down) whose lines fit, centred, drawn."""
    usable = width * (1 - 2 * MARGIN)
    margin = round(height * MARGIN)
    for size in range(max(MIN_SIZE, round(height * START_SIZE)), MIN_SIZE - 1, -1):
        fonts = _fonts(chain, size)
        ascent, descent = fonts[0].getmetrics()
        line_height = round((ascent + descent) * LINE_SPACING)
        outline = max(1, round(size * OUTLINE))
        lines = _wrap(text, fonts, usable - 2 * outline)
        if lines is not None and len(lines) * line_height <= height * MAX_BAND:
            break
    else:
        raise HellomemeError(f"caption {text!r} does not fit a {width}x{height} frame even at {MIN_SIZE}-pixel letters: shorten it")
    top = margin if at_top else height - margin - len(lines) * line_height
    for number, line in enumerate(lines):
        runs = _runs(line, fonts)
        x = (width - sum(font.getlength(run) for run, font in runs)) / 2
        baseline = top + number * line_height + ascent
        for run, font in runs:
            draw.text((x, baseline), run, font=font, anchor="ls", fill=(255, 255, 255, 255), stroke_width=outline, stroke_fill=(0, 0, 0, 255))
            x += font.getlength(run)


@functools.cache
def _fonts(chain: tuple[Path, ...], size: int) -> tuple:
    from PIL import ImageFont

    return tuple(ImageFont.truetype(str(path), size) for path in chain)


def _runs(line: str, fonts: tuple) -> list[tuple[str, object]]:
    """The line cut into runs each drawn by the first font that has their characters (a space goes
    with the run it is in)."""
    chain = [_characters(Path(font.path)) for font in fonts]
    runs: list[tuple[str, object]] = []
    for char in line:
        index = 0 if char.isspace() and runs else next((i for i, known in enumerate(chain) if char in known), 0)
        font = runs[-1][1] if char.isspace() and runs else fonts[index]
        if runs and runs[-1][1] is font:
            runs[-1] = (runs[-1][0] + char, font)
        else:
            runs.append((char, font))
    return runs


def _wrap(text: str, fonts: tuple, width: float) -> list[str] | None:
    """The words in as few lines as fit `width` (greedy); None when one word alone is wider."""
    def length(line: str) -> float:
        return sum(font.getlength(run) for run, font in _runs(line, fonts))

    lines: list[str] = []
    for word in text.split():
        if length(word) > width:
            return None
        if lines and length(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines
