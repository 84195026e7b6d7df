"""The checks a run passes before anything heavy is imported: torch, diffusers and MediaPipe take
seconds to import, and a mistyped path should be answered at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hellomeme_cli.media.files import check_destination, require_file
from hellomeme_cli.media.formats import OutputPlan, output_plan
from hellomeme_cli.versions import get_version


def check_paths(reference: Path, driving: Path, output: Path, version: str, *, mode: str, force: bool = False) -> None:
    """The version makes `mode`, both inputs are readable files and the output may be written."""
    get_version(version, mode)
    require_file(Path(reference))
    require_file(Path(driving))
    check_destination(Path(output), force, [reference, driving])


def plan_output(output: Path, settings: Any) -> OutputPlan:
    """How a clip made with `settings` (AnimateSettings) is written to `output`: its format from the
    suffix, checked against --format, --sticker and --quality."""
    return output_plan(
        Path(output), format=settings.format, sticker=settings.sticker, max_kb=settings.max_kb, quality=settings.quality, loop=settings.loop
    )


def default_output(reference: Path, driving: Path, suffix: str = ".mp4", folder: Path | None = None, version: str | None = None) -> Path:
    """`<reference>_<driving><suffix>` in the current folder (or `folder`); with `version`,
    `<reference>_<driving>_<version><suffix>`, so trying another version does not meet the last output."""
    tag = f"_{version}" if version else ""
    return (folder or Path.cwd()) / f"{reference.stem}_{driving.stem}{tag}{suffix}"
