"""Batch jobs: what a batch is made of, here or on Ray: the plan, the checks, the ledger and report, the clip maker.

`run.run_batch` takes these steps:

1. plan: the clips of a folder (one reference) or the rows of a CSV (reference, driving, output and
   per-row options); files in the folder that are not videos are recorded as failed
2. check the setup (options valid on every device, weights present) before any work
3. remove temporary files a killed run left; skip outputs already made with the same settings
   (each output carries a digest of what made it in its metadata); read every reference once
4. make the clips, grouped by the models they need: in this process on one device, or on Ray
   workers (on_ray.py, one per GPU); each loads the models once (again only for a clip that needs
   other models). A clip that fails is recorded with its reason and the batch goes on.
5. the JSON report, rewritten after every clip, so a killed run leaves one too
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import hashlib
import io
import json
import re
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import torch

from hellomeme_cli.version import __version__
from hellomeme_cli.engine import HelloMemePipeline, ModelOptions, load_pipeline
from hellomeme_cli.model_options import check_options
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.face.driving import TEMPLATE_SUFFIX, expected_frames
from hellomeme_cli.pipeline import SEED_TAG, VIDEO_SUFFIXES, AnimateSettings, Reference, animate, load_reference, run_components
from hellomeme_cli.preflight import BATCH_FOLDER, default_output, plan_output
from hellomeme_cli.progress import ProgressCallback, ProgressEvent
from hellomeme_cli.settings import Setting, all_settings, digest_values, from_values, parse_cell
from hellomeme_cli.media.formats import OUTPUT_SUFFIXES as WRITABLE_SUFFIXES, output_suffix
from hellomeme_cli.media.meme import FRAMES_TAG
from hellomeme_cli.logs import libraries_quiet
from hellomeme_cli.media.files import leftover_temporaries, write_atomically
from hellomeme_cli.media.video import VideoInfo, probe_video
from hellomeme_cli.weights.cache import WeightCache, sha256_of

DIGEST_TAG = "hellomeme_batch"  # the output's metadata key holding the digest of what made it
REPORT_NAME = "batch-report.json"  # and beside it batch-report.csv (the same rows) and .log: the traceback of every failure
TRACK_CACHE = "tracks"  # in the weight cache's home: the motion template of every clip tracked, reused by later runs
DRIVE_SUFFIXES = (*VIDEO_SUFFIXES, TEMPLATE_SUFFIX)
STATUSES = ("ok", "failed", "skipped")
DONE = "already done with the same settings"
NOT_RUN = "not run: the batch stopped first"
FINISHED_AT_STOP = "finished as the batch stopped"
FOREIGN = "already exists and was not made by hellomeme (--force replaces it)"

# What a --pairs row may set besides its files: every per-clip setting (settings.py); a blank cell keeps the command line's value.
ROW_OPTIONS: dict[str, Setting] = {setting.column: setting for setting in all_settings() if setting.per_clip}
ROW_FILES = ("reference", "driving", "output")


@dataclasses.dataclass(frozen=True)
class BatchJob:
    """One clip to make. `settings.seed` None: a new seed for this clip; the device is the batch's."""

    reference: Path
    driving: Path
    output: Path
    settings: AnimateSettings


@dataclasses.dataclass(frozen=True)
class ClipReport:
    """What became of one clip: status ok, failed or skipped, and why it failed or was skipped."""

    driving: Path
    reference: Path | None
    output: Path | None
    status: str
    reason: str = ""
    frames: int | None = None
    seconds: float | None = None
    seed: int | None = None
    device: str | None = None
    traceback: str = ""  # of a failure, for the log beside the report (not in the JSON)
    metrics: dict | None = None  # with `batch --eval`: the output's `evaluate` summary

    def to_json(self) -> dict[str, object]:
        fields = dataclasses.asdict(self)
        fields.pop("traceback")
        return {key: str(value.absolute()) if isinstance(value, Path) else value for key, value in fields.items()}

    def to_row(self) -> dict[str, object]:
        """A flat row for the CSV: the metrics as columns of their own."""
        row = self.to_json()
        return {**{key: value for key, value in row.items() if key != "metrics"}, **(self.metrics or {})}


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """The clips to make, the files of the folder that are not clips, and where the report goes."""

    jobs: tuple[BatchJob, ...]
    rejected: tuple[ClipReport, ...]
    report: Path


@dataclasses.dataclass(frozen=True)
class BatchReport:
    clips: tuple[ClipReport, ...]
    finished: bool  # False when the batch was interrupted: the clips it did not reach are skipped, NOT_RUN
    path: Path

    def count(self, status: str) -> int:
        return sum(clip.status == status for clip in self.clips)

    @property
    def failed(self) -> bool:
        return self.count("failed") > 0


# -- 1. plan -----------------------------------------------------------------


def plan_folder(
    folder: Path, reference: Path, settings: AnimateSettings, output_dir: Path | None = None, report: Path | None = None
) -> BatchPlan:
    """Every file directly in `folder` as a driving clip of `reference`, output `REF_CLIP.mp4` (or the
    --format's or --sticker's suffix) in `output_dir` (default: `folder/hellomeme`). Hidden files, subfolders, the reference and this
    batch's own outputs and report are left out; files without a video suffix are rejected as failed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HellomemeError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    output_dir = Path(output_dir) if output_dir else folder / BATCH_FOLDER
    report = Path(report) if report else output_dir / REPORT_NAME
    files = sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))
    suffix = output_suffix(settings.format, settings.sticker)
    outputs = {clip: default_output(reference, clip, suffix, folder=output_dir) for clip in files if clip.suffix.lower() in DRIVE_SUFFIXES}
    ours = {_identity(path) for path in (reference, report, report.with_suffix(".csv"), *outputs.values())}
    jobs = [BatchJob(reference, clip, output, settings) for clip, output in outputs.items() if _identity(clip) not in ours]
    rejected = [
        ClipReport(path, reference, None, "failed", f"{path}: not a video (clips end in {', '.join(DRIVE_SUFFIXES)})")
        for path in files
        if path.suffix.lower() not in DRIVE_SUFFIXES and _identity(path) not in ours
    ]
    _check_outputs(jobs, [str(job.driving) for job in jobs], "rename one, or name the outputs in a --pairs CSV")
    return BatchPlan(tuple(jobs), tuple(rejected), report)


def plan_pairs(
    table: Path,
    settings: AnimateSettings,
    reference: Path | None = None,
    output_dir: Path | None = None,
    report: Path | None = None,
) -> BatchPlan:
    """One clip per row of a CSV whose header names its columns: `driving`, `reference` (blank: the
    `reference` given here), `output` (blank: `REF_CLIP.mp4` in `output_dir`, default `hellomeme/`
    beside the CSV) and any of ROW_OPTIONS. Relative paths are relative to the CSV's folder.
    Any bad row refuses the whole table, naming its line."""
    table = Path(table)
    try:
        with table.open(newline="", encoding="utf-8-sig") as file:
            rows = _read_rows(table, file)
    except OSError as error:
        raise HellomemeError(f"{table}: cannot read ({error.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise HellomemeError(f"{table}: not a CSV file ({error})") from None
    output_dir = Path(output_dir) if output_dir else table.parent / BATCH_FOLDER
    origins = [f"{table}:{line}" for line, _ in rows]
    jobs = [_row_job(origin, values, table.parent, reference, settings, output_dir) for origin, (_, values) in zip(origins, rows)]
    if not jobs:
        raise HellomemeError(f"{table}: no rows under the header")
    _check_outputs(jobs, origins, "give each row its own output")
    return BatchPlan(tuple(jobs), (), Path(report) if report else output_dir / REPORT_NAME)


def _read_rows(table: Path, file) -> list[tuple[int, dict[str, str]]]:
    """(line number, {column: stripped text}) per row; column names lower-cased, `-` read as `_`."""
    reader = csv.DictReader(file)
    columns = [name.strip().lower().replace("-", "_") for name in reader.fieldnames or []]
    unknown = [name for name in columns if name not in (*ROW_FILES, *ROW_OPTIONS)]
    if unknown:
        raise HellomemeError(
            f"{table}: unknown column(s) {', '.join(map(repr, unknown))} (known: {', '.join((*ROW_FILES, *ROW_OPTIONS))})"
        )
    if "driving" not in columns:
        raise HellomemeError(f"{table}: no 'driving' column (the first row names the columns, e.g. reference,driving,output)")
    reader.fieldnames = columns
    rows = []
    for row in reader:
        if None in row:
            raise HellomemeError(f"{table}:{reader.line_num}: more cells than the header has columns")
        rows.append((reader.line_num, {name: (text or "").strip() for name, text in row.items()}))
    return rows


def _row_job(
    where: str, values: dict[str, str], base: Path, reference: Path | None, settings: AnimateSettings, output_dir: Path
) -> BatchJob:
    if not values.get("driving"):
        raise HellomemeError(f"{where}: no driving clip")
    driving = base / Path(values["driving"]).expanduser()
    if values.get("reference"):
        reference = base / Path(values["reference"]).expanduser()
    if reference is None:
        raise HellomemeError(f"{where}: no reference (name one in the row, or give --ref for all rows)")
    try:
        cells = {setting.name: parse_cell(setting, values[column]) for column, setting in ROW_OPTIONS.items() if values.get(column)}
        row_settings = from_values(cells, settings)
        suffix = output_suffix(row_settings.format, row_settings.sticker)
        output = base / Path(values["output"]).expanduser() if values.get("output") else default_output(reference, driving, suffix, folder=output_dir)
        return BatchJob(reference, driving, output, row_settings)
    except HellomemeError as error:
        raise HellomemeError(f"{where}: {error}") from None


def _check_outputs(jobs: Sequence[BatchJob], origins: Sequence[str], advice: str) -> None:
    """Outputs the writer can make, none over an input, no two clips to one file; an error names
    where the job comes from (its clip, or its CSV line)."""
    inputs = {_identity(path) for job in jobs for path in (job.reference, job.driving)}
    taken: dict[Path, str] = {}
    for job, origin in zip(jobs, origins):
        key = _identity(job.output)
        if job.output.suffix.lower() not in WRITABLE_SUFFIXES:
            raise HellomemeError(f"{origin}: {job.output}: outputs are written as {', '.join(WRITABLE_SUFFIXES)}")
        try:
            plan_output(job.output, job.settings)
        except HellomemeError as error:
            raise HellomemeError(f"{origin}: {error}") from None
        if key in inputs:
            raise HellomemeError(f"{origin}: {job.output}: refusing to write over an input file")
        if key in taken:
            raise HellomemeError(f"{origin}: {job.output} is also the output of {taken[key]} ({advice})")
        taken[key] = origin


def _identity(path: Path) -> Path:
    return Path(path).expanduser().resolve()


# -- 2 to 5. run -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Task:
    """A clip to make, with what the parent prepared: its reference read, its digest, whether an
    old output is replaced."""

    index: int
    job: BatchJob
    reference: Reference
    digest: str
    replace: bool


@dataclasses.dataclass(frozen=True)
class ClusterOptions:
    """Where a batch runs on Ray: `address` None starts a runtime of its own on this machine (or uses
    the one this process already started), `HOST:PORT`, `auto` or `ray://HOST:PORT` joins a cluster;
    `workers` None is one per GPU (one on a machine without), else that many."""

    address: str | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        address = self.address
        if address is not None and address != "auto" and not address.startswith("ray://") and not _HOST_PORT.fullmatch(address):
            raise HellomemeError(f"--ray {address}: not a Ray address (auto, ray://HOST:PORT or HOST:PORT; give the clips folder before --ray)")
        if self.workers is not None and self.workers < 1:
            raise HellomemeError(f"--workers must be at least 1 (got {self.workers})")


_HOST_PORT = re.compile(r"[\w.\-\[\]:]+:\d+")


def remove_leftovers(output: Path) -> None:
    """The temporary files a killed writer of `output` left (SIGKILL, power loss, a lost worker)."""
    for leftover in leftover_temporaries(output):
        leftover.unlink(missing_ok=True)


def _check_setup(jobs: Sequence[BatchJob], device: str | None, cache: WeightCache) -> None:
    """What would fail every clip, found before any work: options invalid on the device (each Ray
    worker checks its own: `device` None), weights missing."""
    if device is not None:
        for options in {job.settings.models for job in jobs}:
            check_options(dataclasses.replace(options, device=device))
    components = {name for job in jobs for name in run_components(job.settings, "video")}
    cache.require(sorted(components))


def _prepare(
    jobs: Sequence[BatchJob], ledger: _Ledger, force: bool, face_model: Path, progress: ProgressCallback
) -> list[_Task]:
    """Step 3 (after the leftovers): finished clips recorded as skipped, each reference read once; the clips left to make,
    grouped by the models they need (in order of first use)."""
    references: dict[tuple[Path, int, bool], Reference | str] = {}
    tasks = []
    for index, job in enumerate(jobs):
        digest = settings_digest(job)
        state, info = _existing_output(job, digest, force)
        if state == "done":
            ledger.record(index, _finished(job, info, "skipped", DONE))
        elif state == "foreign":
            ledger.record(index, _failed(job, f"{job.output}: {FOREIGN}"))
        else:
            key = (job.reference, job.settings.size, job.settings.crop)
            if key not in references:
                try:
                    references[key] = load_reference(job.reference, job.settings, face_model)
                except Exception as error:
                    references[key] = _reason(error)
            reference = references[key]
            if isinstance(reference, str):
                ledger.record(index, _failed(job, reference))
            else:
                tasks.append(_Task(index, job, reference, digest or "", replace=state != "missing"))
        progress(ProgressEvent("checking", index + 1, len(jobs), "clips"))
    first_use: dict[ModelOptions, int] = {}
    return sorted(tasks, key=lambda task: first_use.setdefault(task.job.settings.models, len(first_use)))


def settings_digest(job: BatchJob) -> str | None:
    """16 hex digits naming what makes a clip: the settings that change the output (`digest_values`:
    the seed only if one was given; not the device or speed options) and the contents of the reference and the driving clip.
    None when an input cannot be read."""
    try:
        contents = [sha256_of(Path(job.reference)), sha256_of(Path(job.driving))]
    except OSError:
        return None
    text = json.dumps({"settings": digest_values(job.settings), "inputs": contents}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _existing_output(job: BatchJob, digest: str | None, force: bool) -> tuple[str, VideoInfo | None]:
    """('missing' | 'done' | 'stale' | 'foreign', the output's VideoInfo when read). Done: it decodes,
    carries this digest and has the frames the clip and settings give. Stale: remade (forced,
    unreadable, cut short, or made by hellomeme otherwise). Foreign: a video hellomeme did not make."""
    if not job.output.exists():
        return "missing", None
    if force:
        return "stale", None
    try:
        info = probe_video(job.output)
    except HellomemeError:
        return "stale", None
    if DIGEST_TAG not in info.tags and SEED_TAG not in info.tags:
        return "foreign", info
    if digest is None or info.tags.get(DIGEST_TAG) != digest or info.frame_count != _expected_frames(job, info):
        return "stale", info
    return "done", info


def _expected_frames(job: BatchJob, info: VideoInfo) -> int | None:
    """How many frames the clip's output has: one per driving frame (up to --max-frames), resampled by
    --fps, within its format's and sticker's limits, looped; as written where a size target kept fewer."""
    if FRAMES_TAG in info.tags and info.tags[FRAMES_TAG].isdigit():
        return int(info.tags[FRAMES_TAG])
    plan = plan_output(job.output, job.settings)
    made = expected_frames(job.driving, job.settings, max_rate=plan.max_rate, max_seconds=plan.max_seconds)
    return None if made is None else plan.loop.count(made)


def _signature(path: Path) -> tuple[int, int] | None:
    """(mtime, size): whether a file was replaced, with no clock compared (a worker's may differ)."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size


class _Ledger:
    """The report as it grows, in plan order; saved after every entry, so a killed run leaves one."""

    def __init__(self, plan: BatchPlan, progress: ProgressCallback):
        self.plan = plan
        self.progress = progress
        self.entries: list[ClipReport | None] = [None] * len(plan.jobs)
        self.running = 0  # clips being made now, set by whoever makes them
        self.before = [_signature(job.output) for job in plan.jobs]  # what a stop is compared with

    def record(self, index: int, entry: ClipReport) -> None:
        self.entries[index] = entry
        self.show()
        self._save(finished=False)

    def show(self) -> None:
        """The bar over clips: how many are done, and how they went."""
        made = [entry.status for entry in self.entries if entry is not None]
        counts = ", ".join(f"{made.count(status)} {status}" for status in STATUSES)
        self.progress(ProgressEvent("clips", len(made), len(self.entries), "clips", detail=f"{counts}, {self.running} running"))

    def close(self, finished: bool) -> BatchReport:
        if not finished:
            self._record_finished_at_stop()
        self._save(finished)
        return BatchReport(self._clips(), finished, self.plan.report)

    def _record_finished_at_stop(self) -> None:
        """A clip whose video was put in place between its writer's rename and its entry (the stop came
        in between, here or on a worker) is ok, not 'not run': the report says what is on disk."""
        for index, job in enumerate(self.plan.jobs):
            if self.entries[index] is not None or _signature(job.output) in (None, self.before[index]):
                continue
            state, info = _existing_output(job, settings_digest(job), force=False)
            if state == "done":
                self.entries[index] = _finished(job, info, "ok", FINISHED_AT_STOP)

    def _clips(self) -> tuple[ClipReport, ...]:
        not_run = (ClipReport(job.driving, job.reference, job.output, "skipped", NOT_RUN) for job in self.plan.jobs)
        return (*self.plan.rejected, *(entry or missing for entry, missing in zip(self.entries, not_run)))

    def _save(self, finished: bool) -> None:
        clips = self._clips()
        data = {
            "hellomeme": __version__,
            "finished": finished,
            "counts": {status: sum(clip.status == status for clip in clips) for status in STATUSES},
            "clips": [clip.to_json() for clip in clips],
        }
        write_atomically(self.plan.report, json.dumps(data, indent=1) + "\n")
        write_atomically(csv_path(self.plan.report), _csv([clip.to_row() for clip in clips]))
        failures = [f"== {clip.driving}: {clip.reason}\n{clip.traceback}" for clip in clips if clip.traceback]
        if failures:
            write_atomically(log_path(self.plan.report), "\n".join(failures))


class _ClipMaker:
    """Makes clips on one device, keeping the last clip's models loaded (clips come grouped by the
    models they need, so each set loads once)."""

    def __init__(self, label: str, device: str, cache: WeightCache):
        self.label = label
        self.device = device
        self.cache = cache
        self.options: ModelOptions | None = None
        self.models: HelloMemePipeline | None = None
        self.load_failure = ""

    def make(self, task: _Task, progress: ProgressCallback) -> ClipReport:
        started = time.monotonic()
        job = task.job
        settings = job.settings.with_seed()
        made = ClipReport(job.driving, job.reference, job.output, "ok", seed=settings.seed, device=self.label)
        try:
            models = self._models(job.settings.models, progress)
            result = animate(
                task.reference, job.driving, job.output, settings, models,
                force=task.replace, progress=progress, extra_tags={DIGEST_TAG: task.digest}, track_cache=self.cache.home / TRACK_CACHE,
            )
        except Exception as error:
            return dataclasses.replace(
                made, status="failed", reason=_reason(error), seconds=round(time.monotonic() - started, 2),
                traceback="".join(traceback.format_exception(error)),
            )
        return dataclasses.replace(made, frames=result.frames, seconds=round(result.seconds, 2))

    def _models(self, options: ModelOptions, progress: ProgressCallback) -> HelloMemePipeline:
        options = dataclasses.replace(options, device=self.device)
        if options != self.options:
            self.options, self.models, self.load_failure = options, None, ""
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            try:
                with libraries_quiet():
                    self.models = load_pipeline(options.version, options, self.cache, progress)
            except Exception as error:  # every clip that needs these models fails the same way, without a retry
                self.load_failure = f"cannot load the models: {_reason(error)}"
        if self.models is None:
            raise HellomemeError(self.load_failure)
        return self.models


def csv_path(report: Path) -> Path:
    """The report's rows as a table (spreadsheets, sorting a thousand clips by identity) beside the JSON."""
    return report.with_suffix(".csv")


def _csv(rows: list[dict[str, object]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = io.StringIO()
    writer = csv.DictWriter(table, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return table.getvalue()


def log_path(report: Path) -> Path:
    """The failures' tracebacks are kept beside the JSON report."""
    return report.with_suffix(".log")


def _finished(job: BatchJob, output: VideoInfo, status: str, reason: str) -> ClipReport:
    """The entry of a clip whose output is on disk and done: its frames and the seed it carries."""
    seed = output.tags.get(SEED_TAG, "")
    return ClipReport(job.driving, job.reference, job.output, status, reason, frames=output.frame_count, seed=int(seed) if seed.isdigit() else None)


def _failed(job: BatchJob, reason: str) -> ClipReport:
    return ClipReport(job.driving, job.reference, job.output, "failed", reason)


def _reason(error: Exception) -> str:
    """A project error says it in one line; anything else is named by its type."""
    return str(error) if isinstance(error, HellomemeError) else f"{type(error).__name__}: {error}"


