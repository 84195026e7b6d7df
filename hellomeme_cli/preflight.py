"""The checks a run passes before anything heavy is imported: torch, diffusers and MediaPipe take
seconds to import, and a mistyped path should be answered at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hellomeme_cli.media.files import check_destination, check_writable, require_file
from hellomeme_cli.media.formats import OutputPlan, output_plan
from hellomeme_cli.versions import get_version

BATCH_FOLDER = "hellomeme"  # a batch's default output folder, inside the clips' folder (or beside the CSV)


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


def check_batch_folders(clips: Path | None, table: Path | None, output_dir: Path | None, report: Path | None) -> None:
    """The folders a batch writes its outputs and report into take new files (made if missing): said
    before anything is imported or planned. A --pairs row naming an output elsewhere is checked
    with the plan (`batch.run.run_batch`)."""
    folder = output_dir or ((clips / BATCH_FOLDER) if clips else (table.parent / BATCH_FOLDER) if table else None)
    for where in filter(None, (folder, report.parent if report else None)):
        check_writable(where)
