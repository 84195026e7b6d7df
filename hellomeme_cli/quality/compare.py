"""`hellomeme compare`: one reference and driving clip through several variants (versions,
checkpoints, few-step recipes), each timed and scored, then shown together.

1. every variant checked before any model loads (the same seed for all)
2. each variant made with its models loaded once, then let go: VARIANT.mp4 in the folder
3. each output scored against the driving clip and the reference (`evaluate`)
4. side_by_side.mp4: the driving clip, then one labelled column per variant, with the clip's audio
5. contact_sheet.png: a row of frames per variant under the driving clip's
6. metrics.md and metrics.json: one row per variant, the best value of each column marked
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path

import cv2
import numpy as np

from hellomeme_cli.engine import load_pipeline
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.logs import libraries_quiet
from hellomeme_cli.media.files import check_writable, write_atomically
from hellomeme_cli.media.video import VideoInfo, probe_video, read_frames, write_image, write_video
from hellomeme_cli.pipeline import prepare_run
from hellomeme_cli.progress import ProgressCallback, no_progress
from hellomeme_cli.quality.evaluate import Evaluation, driving_frame_at, evaluate
from hellomeme_cli.settings import AnimateSettings
from hellomeme_cli.weights.cache import WeightCache

LABEL_HEIGHT = 28
SHEET_FRAMES = 6
# The columns of the table, and which way is better: lower errors; higher identity, PSNR, SSIM;
# flicker and seam score nearest 1 (the driving clip's own change, no trace of the windows).
COLUMNS = {
    "seconds": "low", "pose_error_deg": "low", "movement_error": "low", "expression_error": "low", "identity": "high",
    "flicker": "one", "seam_score": "one", "faceless_frames": "low",
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to make the clip: a HelloMeme version, a checkpoint (None: the version's base) and a
    few-step recipe (None: the version's own sampling)."""

    version: str
    checkpoint: str | None = None
    few_step: str | None = None

    @property
    def label(self) -> str:
        parts = [self.version]
        if self.checkpoint:
            parts.append(Path(self.checkpoint).stem if Path(self.checkpoint).exists() else self.checkpoint.rsplit("/", 1)[-1])
        if self.few_step:
            parts.append(f"few-step {self.few_step}")
        return " ".join(parts)


@dataclasses.dataclass
class Comparison:
    variants: list[Variant]
    outputs: list[Path]
    evaluations: list[Evaluation]
    seed: int
    side_by_side: Path
    contact_sheet: Path
    table: Path

    seconds: list[float] = dataclasses.field(default_factory=list)  # each variant's making, models loaded

    def rows(self) -> list[dict]:
        return [{"variant": variant.label, "output": str(output), "seconds": seconds, **evaluation.summary}
                for variant, output, seconds, evaluation in zip(self.variants, self.outputs, self.seconds, self.evaluations)]


def compare(
    reference: Path,
    driving: Path,
    variants: list[Variant],
    settings: AnimateSettings,
    folder: Path,
    *,
    force: bool = False,
    cache: WeightCache | None = None,
    progress: ProgressCallback = no_progress,
) -> Comparison:
    """Make, score and show `variants` of `reference` driven by `driving` into `folder` (made if missing)."""
    if not variants:
        raise HellomemeError("compare needs at least one variant (--versions)")
    labels = [variant.label for variant in variants]
    if len(set(labels)) < len(labels):
        raise HellomemeError(f"compare: variants named twice ({', '.join(labels)})")
    folder, cache, settings = Path(folder), cache or WeightCache(), settings.with_seed()
    check_writable(folder)
    folder.mkdir(parents=True, exist_ok=True)

    # 1. Every variant checked before any model loads.
    runs = []
    for variant in variants:
        models = dataclasses.replace(
            settings.models, version=variant.version, checkpoint=variant.checkpoint or settings.models.checkpoint,
            few_step=variant.few_step or settings.models.few_step,
        )
        own = dataclasses.replace(settings, models=models)
        runs.append(prepare_run(Path(reference), Path(driving), folder / f"{_file_name(variant.label)}.mp4", own, mode="video", force=force, cache=cache))

    # 2 and 3. Each made (its models loaded, then let go) and scored.
    outputs, evaluations, seconds = [], [], []
    for run in runs:
        with libraries_quiet():
            models = load_pipeline(run.settings.models.version, run.settings.models, cache, progress)
        started = time.perf_counter()
        result = run.execute(models, progress)
        seconds.append(time.perf_counter() - started)
        del models
        gc.collect()
        outputs.append(result.output)
        evaluations.append(evaluate(result.output, Path(driving), Path(reference), cache=cache, progress=progress))

    # 4-6. Side by side, the contact sheet, the table.
    clips = [probe_video(output) for output in outputs]
    side_by_side = _side_by_side(probe_video(Path(driving)), clips, labels, folder / "side_by_side.mp4", force)
    sheet = _contact_sheet(probe_video(Path(driving)), clips, labels, folder / "contact_sheet.png", force)
    comparison = Comparison(list(variants), outputs, evaluations, settings.seed, side_by_side, sheet, folder / "metrics.md", seconds)
    write_atomically(folder / "metrics.json", json.dumps({"seed": settings.seed, "variants": comparison.rows()}, indent=1) + "\n")
    write_atomically(comparison.table, metrics_markdown(comparison.rows()))
    return comparison


def best(rows: list[dict]) -> dict[str, int | None]:
    """For each column, the row with its best value (None where no row has one)."""
    choice = {}
    for column, better in COLUMNS.items():
        known = [(index, row[column]) for index, row in enumerate(rows) if row.get(column) is not None]
        if not known:
            choice[column] = None
            continue
        key = {"low": lambda item: item[1], "high": lambda item: -item[1], "one": lambda item: abs(item[1] - 1)}[better]
        choice[column] = min(known, key=key)[0]
    return choice


def metrics_markdown(rows: list[dict]) -> str:
    """The table, the best value of each column in bold."""
    marked = best(rows)
    lines = ["| variant | " + " | ".join(COLUMNS) + " |", "| --- |" + " ---: |" * len(COLUMNS)]
    for index, row in enumerate(rows):
        cells = []
        for column in COLUMNS:
            value = row.get(column)
            text = "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
            cells.append(f"**{text}**" if marked[column] == index else text)
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nBold: the best of each column (seconds and errors lowest, identity highest, flicker and seam score nearest 1).\n"


def _file_name(label: str) -> str:
    return "".join(character if character.isalnum() or character in "-_." else "_" for character in label)


def _labelled(frame: np.ndarray, label: str) -> np.ndarray:
    bar = np.full((LABEL_HEIGHT, frame.shape[1], 3), 20, np.uint8)
    cv2.putText(bar, label, (6, LABEL_HEIGHT - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([bar, frame])


def _fit(frame: np.ndarray, height: int) -> np.ndarray:
    width = max(2, round(frame.shape[1] * height / frame.shape[0]) // 2 * 2)
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)


def _side_by_side(driving: VideoInfo, clips: list[VideoInfo], labels: list[str], path: Path, force: bool) -> Path:
    """The driving clip and each variant, frame by frame at the variants' rate, labelled, with the clip's audio."""
    height = clips[0].height
    shown = driving_frame_at(clips[0], driving)
    streams = [read_frames(clip) for clip in clips]
    drive_frames = enumerate(read_frames(driving, int(shown.max()) + 1))
    index, current = next(drive_frames)

    def frames():
        nonlocal index, current
        for number in range(clips[0].frame_count):
            while index < shown[number]:
                index, current = next(drive_frames)
            columns = [_labelled(_fit(current, height), "driving clip")]
            columns += [_labelled(_fit(next(stream), height), label) for stream, label in zip(streams, labels)]
            yield np.hstack(columns)

    return write_video(frames(), path, clips[0].rate, audio_from=driving, force=force, total=clips[0].frame_count)


def _contact_sheet(driving: VideoInfo, clips: list[VideoInfo], labels: list[str], path: Path, force: bool) -> Path:
    """SHEET_FRAMES frames evenly spaced, a row for the driving clip and one per variant."""
    count, size = clips[0].frame_count, 160
    wanted = sorted({round(i * (count - 1) / max(SHEET_FRAMES - 1, 1)) for i in range(SHEET_FRAMES)})
    shown = driving_frame_at(clips[0], driving)
    rows = [_row(driving, [int(shown[number]) for number in wanted], "driving clip", size)]
    rows += [_row(clip, wanted, label, size) for clip, label in zip(clips, labels)]
    width = max(row.shape[1] for row in rows)
    sheet = np.vstack([np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows])
    return write_image(sheet, path, force=force)


def _row(clip: VideoInfo, wanted: list[int], label: str, size: int) -> np.ndarray:
    picked = {}
    for number, frame in enumerate(read_frames(clip, max(wanted) + 1)):
        if number in wanted:
            picked[number] = _fit(frame, size)
    return _labelled(np.hstack([picked[number] for number in wanted]), label)
