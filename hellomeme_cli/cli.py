"""Command line: parses and validates, then calls the library. Nothing else lives here."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import platform
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from rich.table import Table

from hellomeme_cli.version import __version__
from hellomeme_cli.errors import HellomemeError, first_line as _first_line
from hellomeme_cli.progress import ProgressCallback, ProgressEvent
from hellomeme_cli.settings import CAPTIONS, CLIP_ONLY, CLIP_OUTPUT, INPUT_OUTPUT, MODEL, MOTION
from hellomeme_cli.versions import DEFAULT_VERSIONS, users, version_names

if TYPE_CHECKING:
    from hellomeme_cli.batch.jobs import BatchReport
    from hellomeme_cli.pipeline import AnimateSettings

class _HelpCommand(TyperCommand):
    """A command whose help reads well in 80 columns: usage as `hellomeme animate [OPTIONS] REFERENCE
    DRIVE` (typer writes `{reference} {drive}`) and `--help` without a `<bool>` after it."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for parameter in self.get_params(ctx):
            if parameter.param_type_name == "argument":
                name = parameter.display_name_raw.upper() + ("..." if parameter.nargs != 1 else "")
                pieces.append(name if parameter.required else f"[{name}]")
        return pieces

    def get_help_option(self, ctx):
        option = _without_type(super().get_help_option(ctx))
        if option is not None and any(getattr(parameter, "rich_help_panel", None) for parameter in self.params):
            option.rich_help_panel = "Help"  # after the panels, not alone in a first "Options" panel
        return option


class _HelpGroup(TyperGroup):
    """The command groups' help, likewise without `<bool>` after `--help`."""

    def get_help_option(self, ctx):
        return _without_type(super().get_help_option(ctx))


def _without_type(option):
    if option is not None:
        option.metavar = FLAG
    return option


app = typer.Typer(
    name="hellomeme",
    cls=_HelpGroup,
    help="Make meme videos: give a portrait the head motion and expressions of a driving video (HelloMeme v1, v2, v3, v4, v5, v5b or v5c, chosen with --version).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
weights_app = typer.Typer(help="List, download, verify and import model weights.", no_args_is_help=True, cls=_HelpGroup)
app.add_typer(weights_app, name="weights")
comfyui_app = typer.Typer(help="hellomeme's nodes in ComfyUI (docs/comfyui.md).", no_args_is_help=True, cls=_HelpGroup)
app.add_typer(comfyui_app, name="comfyui")
console = Console(stderr=True, soft_wrap=True)
# Written to a pipe or file, tables take the width they need: an identifier is never cut or folded.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 100_000)


class _AmountColumn(ProgressColumn):
    """Bytes as sizes (downloads), anything else as `done/total unit` (frames, steps)."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = DownloadColumn()

    def render(self, task) -> Text:
        unit = task.fields.get("unit", "B")
        if unit == "B":
            return self._bytes.render(task)
        total = "?" if task.total is None else f"{task.total:.0f}"
        return Text(f"{task.completed:.0f}/{total} {unit}", style="progress.download")


@contextlib.contextmanager
def _progress_bars() -> Iterator[ProgressCallback]:
    """One rich progress bar per task the library reports, with its amount and ETA."""
    columns = [TextColumn("{task.description:<16}"), BarColumn(), TaskProgressColumn(), _AmountColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as bars:
        tasks: dict[str, int] = {}

        def report(event: ProgressEvent) -> None:
            if event.task not in tasks:
                tasks[event.task] = bars.add_task(event.task, total=event.total, unit=event.unit)
            description = f"{event.task} {event.detail}" if event.detail else event.task
            bars.update(tasks[event.task], completed=event.completed, total=event.total, description=description, unit=event.unit)

        yield report


def _print_version(value: bool) -> None:
    if value:
        print(f"hellomeme {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.", metavar=FLAG)
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of an error (also HELLOMEME_DEBUG=1; may follow any command).", metavar=FLAG)
    ] = False,
) -> None:
    """Make meme videos: give a portrait the head motion and expressions of a driving video (HelloMeme)."""


@app.command(cls=_HelpCommand)
def info() -> None:
    """Show the versions and compute devices hellomeme would use."""
    import diffusers
    import torch

    print(f"hellomeme   {__version__}")
    print(f"python      {platform.python_version()} ({platform.machine()})")
    print(f"torch       {torch.__version__}")
    print(f"diffusers   {diffusers.__version__}")
    devices = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    print(f"devices     {', '.join(devices + ['cpu'])}")
    print(f"bfloat16    {_bfloat16_on_this_cpu()}")
    print(f"HelloMeme   video: {', '.join(version_names('video'))} (default {DEFAULT_VERSIONS['video']}); "
          f"image: {', '.join(version_names('image'))} (default {DEFAULT_VERSIONS['image']})")


def _bfloat16_on_this_cpu() -> str:
    """Whether `--dtype bfloat16` is the fast choice on this CPU (docs/performance.md, "bfloat16 on the CPU")."""
    from hellomeme_cli.model_options import BFLOAT16_FEATURES, native_bfloat16

    feature = native_bfloat16()
    if feature is None:
        return "on the CPU: unknown (no /proc/cpuinfo to tell)"
    if feature:
        return f"native on this CPU ({feature}): --dtype bfloat16 is faster than float32 here"
    return f"not native on this CPU (no {', '.join(BFLOAT16_FEATURES)}): --dtype bfloat16 is slower than float32 here"


FLAG = ""  # the metavar of an on/off switch: typer would show `<bool>` after it
RAY, SCORING = "Ray", "Scoring"  # the --help panels of batch's cluster options and eval's scoring options


def _with_generation_options(mode: str, skip: tuple[str, ...] = ()) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command every declared setting (settings.py) as an option: typer sees one flat list of
    options, the command gets the settings they make as its `settings` argument."""
    from hellomeme_cli.settings import PANELS, all_settings, from_values

    declared = [setting for setting in all_settings() if setting.name not in skip]

    def parameter(setting) -> inspect.Parameter:
        default = setting.default
        if setting.name == "version":
            default = DEFAULT_VERSIONS[mode]
        if isinstance(default, tuple):
            default = None
        kind = setting.cli_type if default is not None else setting.cli_type | None
        shown = default if setting.name == "version" else setting.shown_default
        # typer wraps a string default in brackets of its own ("[default: (on)]"), so the help says it instead.
        option = typer.Option(
            *setting.flags, help=f"{setting.help} \\[default: {shown}]", show_default=False, metavar=setting.metavar or FLAG, rich_help_panel=setting.panel
        )
        return inspect.Parameter(setting.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option])

    def in_panel_order(parameters: list[inspect.Parameter]) -> list[inspect.Parameter]:
        """Arguments first, then the options panel by panel in the order of the data flow (typer lists
        the panels as their first options come): every option keyword-only, so any order is a signature."""
        def panel(parameter: inspect.Parameter) -> int:
            info = next((item for item in getattr(parameter.annotation, "__metadata__", ()) if isinstance(item, typer.models.ParameterInfo)), None)
            if isinstance(info, typer.models.ArgumentInfo):
                return -1
            named = getattr(info, "rich_help_panel", None)
            return PANELS.index(named) if named in PANELS else len(PANELS)

        ordered = sorted(parameters, key=panel)
        return [p if panel(p) < 0 else p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in ordered]

    def wrap(command: Callable[..., None]) -> Callable[..., None]:
        own = inspect.signature(command, eval_str=True, locals=_LAZY_NAMES).parameters
        parameters = in_panel_order([p for name, p in own.items() if name != "settings"] + [parameter(setting) for setting in declared])

        @functools.wraps(command, assigned=("__module__", "__name__", "__qualname__", "__doc__"))
        def run(**values: Any) -> None:
            chosen = {setting.name: values.pop(setting.name) for setting in declared}
            command(**values, settings=from_values(chosen))

        run.__signature__ = inspect.Signature(parameters)
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return wrap


# Resolving annotations: `AnimateSettings` is imported where it is used (it pulls in torch); here any class will do.
_LAZY_NAMES = {"AnimateSettings": object}
LOCAL_RAY = "local"  # `--ray local`, or `--ray` alone: a Ray runtime started on this machine
# The arguments animate, image and demo share.
Portrait = Annotated[Path, typer.Argument(help="The portrait to animate (jpg, png, webp, the first frame of a gif, ...).", metavar="REFERENCE", show_default=False)]
Force = Annotated[bool, typer.Option(help="Replace an existing output file.", metavar=FLAG, rich_help_panel=INPUT_OUTPUT)]
DrivingClip = Annotated[Path, typer.Argument(
    help="The driving video whose head motion and expressions it takes, or its `hellomeme track` .npz (silent output).", metavar="DRIVE", show_default=False
)]
DrivingPicture = Annotated[Path, typer.Argument(
    help="A picture whose head pose and expression it takes, or a `hellomeme track` .npz (its first frame with a face).", metavar="DRIVE_IMAGE", show_default=False
)]
VideoOutput = Annotated[Path | None, typer.Option(
    "--output", "-o", metavar="FILE", rich_help_panel=INPUT_OUTPUT,
    help="The clip to write: .mp4 (.m4v, .mov), .gif, .webp or .webm (default: REF_DRIVE_VERSION.mp4 in the current folder, or the --format's or --sticker's suffix).",
)]
PictureOutput = Annotated[Path | None, typer.Option(
    "--output", "-o", help="The picture to write: .png, .jpg, .webp, .gif, ... (default: REF_DRIVE_VERSION.png in the current folder).", metavar="FILE",
    rich_help_panel=INPUT_OUTPUT,
)]


@app.command(cls=_HelpCommand)
@_with_generation_options("video")
def animate(reference: Portrait, drive: DrivingClip, output: VideoOutput = None, force: Force = False, *, settings: AnimateSettings) -> None:
    """Animate a portrait with a driving video's head motion and expressions; writes an mp4 with the clip's audio, or a GIF, WebP, WebM or sticker, captioned and looped as asked."""
    _animate(reference, drive, output, force, settings)


@app.command(cls=_HelpCommand)
@_with_generation_options("video")
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="The mp4 to write.", metavar="FILE", rich_help_panel=INPUT_OUTPUT)] = Path("hellomeme-demo.mp4"),
    force: Force = False,
    *,
    settings: AnimateSettings,
) -> None:
    """The main job on an example: fetch what animate needs and an example portrait and clip, animate them, say where the mp4 is."""
    from hellomeme_cli.demo import fetch_demo

    with _progress_bars() as report:
        portrait, clip = fetch_demo(settings, _cache(), report)
    _animate(portrait, clip, output, force, settings)


def _animate(reference: Path, drive: Path, output: Path | None, force: bool, settings: AnimateSettings) -> None:
    result = _generate("video", reference, drive, output, force, settings)
    out.print(
        f"wrote {result.output}: {result.description}, seed {result.seed}, "
        f"{result.faceless_frames} driving frames without a face (filled), "
        + (f"{result.repeated_frames} driving frames repeated and {result.dropped_frames} dropped for the rate, " if result.repeated_frames or result.dropped_frames else "")
        + f"{result.seconds:.0f} s",
        highlight=False,
    )


@app.command(cls=_HelpCommand)
@_with_generation_options("image", skip=(*CLIP_ONLY, *CLIP_OUTPUT))
def image(reference: Portrait, drive_image: DrivingPicture, output: PictureOutput = None, force: Force = False, *, settings: AnimateSettings) -> None:
    """One picture: the portrait with the head pose and expression of another picture."""
    seed = _generate("image", reference, drive_image, output, force, settings)
    out.print(f"wrote {output or _default_output('image', reference, drive_image, settings)}, seed {seed}", highlight=False)


def _default_output(mode: str, reference: Path, drive: Path, settings: AnimateSettings) -> Path:
    from hellomeme_cli.media.formats import output_suffix
    from hellomeme_cli.preflight import default_output

    suffix = output_suffix(settings.format, settings.sticker) if mode == "video" else ".png"
    return default_output(reference, drive, suffix, version=settings.models.version)


def _generate(mode: str, reference: Path, drive: Path, output: Path | None, force: bool, settings: AnimateSettings):
    """Check everything that can fail fast before importing torch or loading a model (the seed is said
    at once), then load the models with progress bars and run; `output` defaults to REF_DRIVE_VERSION."""
    output = output or _default_output(mode, reference, drive, settings)
    prepared, cache = _prepare_run(reference, drive, output, force, settings, mode)
    from hellomeme_cli.engine import load_pipeline
    from hellomeme_cli.logs import libraries_quiet

    with _progress_bars() as report:
        with libraries_quiet():
            models = load_pipeline(prepared.settings.models.version, prepared.settings.models, cache, progress=report, mode=mode)
        return prepared.execute(models, progress=report)


def _prepare_run(reference: Path, drive: Path, output: Path, force: bool, settings: AnimateSettings, mode: str):
    from hellomeme_cli.preflight import check_paths, plan_output

    check_paths(reference, drive, output, settings.models.version, mode=mode, force=force)
    if mode == "video":
        plan_output(output, settings)  # a suffix that is no clip format, or not the --format or --sticker asked for
    from hellomeme_cli.pipeline import prepare_run

    cache = _cache()
    prepared = prepare_run(reference, drive, output, settings, mode=mode, force=force, cache=cache)
    console.print(f"seed {prepared.settings.seed}", highlight=False)
    return prepared, cache


@app.command(cls=_HelpCommand)
@_with_generation_options("video")
def batch(
    input_dir: Annotated[
        Path | None, typer.Argument(help="Folder of driving clips: each video directly in it (other files are reported as failed).", metavar="INPUT_DIR", show_default=False)
    ] = None,
    ref: Annotated[Path | None, typer.Option("--ref", help="The portrait to animate with every clip (or every --pairs row without one).", metavar="FILE", rich_help_panel=INPUT_OUTPUT)] = None,
    pairs: Annotated[
        Path | None, typer.Option(help="CSV with columns reference,driving[,output,seed,steps,...] instead of a folder (docs/batch.md).", metavar="CSV", rich_help_panel=INPUT_OUTPUT)
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", "-o", help="Where outputs and the report go (default: a hellomeme folder in INPUT_DIR, or beside the CSV).", metavar="DIR", rich_help_panel=INPUT_OUTPUT)
    ] = None,
    report: Annotated[Path | None, typer.Option(help="The JSON report to write (default: OUTPUT_DIR/batch-report.json).", metavar="FILE", rich_help_panel=INPUT_OUTPUT)] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray", metavar="[ADDRESS]", rich_help_panel=RAY,
            help="Run on Ray: alone (or `local`), a Ray runtime of its own on this machine, one worker per GPU; HOST:PORT, auto or ray://HOST:PORT, a cluster, with its token (docs/batch.md).",
        ),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="With --ray: this many workers (default: one per GPU, one without a GPU).", metavar="N", rich_help_panel=RAY)] = None,
    force: Annotated[bool, typer.Option(help="Remake every clip, replacing finished outputs too.", metavar=FLAG, rich_help_panel=INPUT_OUTPUT)] = False,
    evaluate_outputs: Annotated[
        bool, typer.Option("--eval", help="Then score every finished output (hellomeme eval): its summary on its row of the JSON and CSV report.", metavar=FLAG, rich_help_panel=INPUT_OUTPUT)
    ] = False,
    *,
    settings: AnimateSettings,
) -> None:
    """Animate many clips with models loaded once; re-running skips finished clips. Exit code 1 if any clip failed."""
    from hellomeme_cli.preflight import check_batch_folders

    check_batch_folders(input_dir, pairs, output_dir, report)
    from hellomeme_cli.batch.jobs import ClusterOptions, plan_folder, plan_pairs
    from hellomeme_cli.batch.run import run_batch

    if workers is not None and ray is None:
        raise HellomemeError("--workers needs --ray (without it the batch runs in this process, on --device)")
    cluster = None if ray is None else ClusterOptions(None if ray == LOCAL_RAY else ray, workers)
    if pairs and input_dir:
        raise HellomemeError("give a folder of clips or --pairs, not both")
    if pairs:
        plan = plan_pairs(pairs, settings, reference=ref, output_dir=output_dir, report=report)
    elif input_dir and ref:
        plan = plan_folder(input_dir, ref, settings, output_dir=output_dir, report=report)
    else:
        raise HellomemeError("give a folder of clips and --ref REF, or --pairs FILE.csv")
    with _progress_bars() as bars:
        result = run_batch(plan, force=force, cache=_cache(), progress=bars, cluster=cluster, evaluate=evaluate_outputs)
    out.print(_batch_table(result))
    out.print(f"report {result.path}", highlight=False)
    if not result.finished:
        console.print("[yellow]interrupted[/yellow]: run the same command again to finish", highlight=False)
        raise typer.Exit(interrupted_status())
    if result.failed:
        raise typer.Exit(1)


def _batch_table(result: BatchReport) -> Table:
    """One row per clip: how it went, and its output or why it failed (the clip's name said once)."""
    from hellomeme_cli.batch.jobs import STATUSES

    references = {clip.reference for clip in result.clips}
    counts = ", ".join(f"{result.count(status)} {status}" for status in STATUSES)
    table = Table(title=f"{len(result.clips)} clips: {counts}")
    columns = ["clip", *(["reference"] if len(references) > 1 else []), "status", "frames", "seconds", "seed", "output or reason"]
    for column in columns:
        table.add_column(column, overflow="fold")
    styles = {"ok": "green", "failed": "red", "skipped": "yellow"}
    for clip in result.clips:
        reason = clip.reason.removeprefix(f"{clip.driving}: ")
        table.add_row(
            clip.driving.name,
            *([clip.reference.name if clip.reference else ""] if len(references) > 1 else []),
            Text(clip.status, style=styles[clip.status]),
            "" if clip.frames is None else str(clip.frames),
            "" if clip.seconds is None else f"{clip.seconds:.1f}",
            "" if clip.seed is None else str(clip.seed),
            reason if clip.status == "failed" else f"{clip.output.name} ({reason})" if reason else clip.output.name,
        )
    return table


@app.command(cls=_HelpCommand)
def track(
    drive: Annotated[Path, typer.Argument(help="The driving video.", metavar="DRIVE", show_default=False)],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to save the track (.npz; default: DRIVE-NAME.track.npz here).", metavar="FILE", rich_help_panel=INPUT_OUTPUT)
    ] = None,
    preview: Annotated[
        Path | None, typer.Option(help="Also write a preview video: crop, landmarks, pose square, expression bars.", metavar="FILE", rich_help_panel=INPUT_OUTPUT)
    ] = None,
    face_index: Annotated[int, typer.Option(help="Which face to follow: 0 the largest in the first frame with a face, 1 the next...", metavar="N", rich_help_panel=MOTION)] = 0,
    smooth: Annotated[bool, typer.Option(help="Smooth landmarks and pose over time (One Euro filter, no lag).", metavar=FLAG, rich_help_panel=MOTION)] = True,
    smooth_cutoff: Annotated[float, typer.Option(help="Smoothing: lower removes more jitter from slow motion.", metavar="X", rich_help_panel=MOTION)] = 1.0,
    smooth_beta: Annotated[float, typer.Option(help="Smoothing: higher follows fast motion more closely.", metavar="X", rich_help_panel=MOTION)] = 10.0,
    max_frames: Annotated[int | None, typer.Option(help="Track only the first N frames.", metavar="N", rich_help_panel=INPUT_OUTPUT)] = None,
    force: Annotated[bool, typer.Option(help="Replace existing output files.", metavar=FLAG, rich_help_panel=INPUT_OUTPUT)] = False,
) -> None:
    """Track the face through a clip: save its motion template (landmarks, expression scores, head pose, face patches, timing) to drive animate, image and batch without the clip."""
    from hellomeme_cli.media.files import check_destination

    output = output or Path.cwd() / f"{drive.stem}.track.npz"
    for path in filter(None, (output, preview)):
        check_destination(path, force, [drive])
    if max_frames is not None and max_frames < 1:
        raise HellomemeError(f"--max-frames must be at least 1 (got {max_frames})")
    from hellomeme_cli.face.driving import save_template, track_clip
    from hellomeme_cli.face.preview import write_preview
    from hellomeme_cli.face.tracking import Smoothing, default_model_path
    from hellomeme_cli.media.video import read_frames

    smoothing = Smoothing(min_cutoff=smooth_cutoff, beta=smooth_beta) if smooth else None
    model = default_model_path()
    with _progress_bars() as report, track_clip(
        drive, face_index=face_index, smoothing=smoothing, max_frames=max_frames, model_path=model, progress=report
    ) as template:
        face_track = template.track
        save_template(template, output, force=force, protect=[drive])
        if preview:  # the preview shows whole frames: the clip is decoded a second time for it
            frames = read_frames(drive, len(face_track))
            write_preview(face_track, frames, preview, audio_from=drive, force=force, protect=[drive], progress=report)
    out.print(
        f"{len(face_track)} frames at {face_track.fps:g} fps, {face_track.filled_count} without a face (filled) -> {output}"
        + (f", preview {preview}" if preview else ""),
        highlight=False,
    )


def _evaluation_table(summary: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in summary.items():
        table.add_row(name, "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


@app.command("eval", cls=_HelpCommand)
def evaluate(
    output: Annotated[Path, typer.Argument(help="The clip to score: one hellomeme made, or any clip of a face.", metavar="CLIP", show_default=False)],
    drive: Annotated[Path, typer.Option("--drive", help="Its driving clip.", metavar="FILE", rich_help_panel=INPUT_OUTPUT)],
    ref: Annotated[Path, typer.Option("--ref", help="Its reference portrait.", metavar="FILE", rich_help_panel=INPUT_OUTPUT)],
    self_reenactment: Annotated[
        bool, typer.Option("--self", help="Self-reenactment (the reference is the driving clip's first frame): PSNR and SSIM too.", metavar=FLAG, rich_help_panel=SCORING)
    ] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the summary and the per-frame values as JSON.", metavar="FILE", rich_help_panel=INPUT_OUTPUT)] = None,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Also draw the per-frame curves and a strip of frames (PNG).", metavar="FILE", rich_help_panel=INPUT_OUTPUT)] = None,
    window: Annotated[int | None, typer.Option(help="The sampler's window, for a clip whose metadata does not say it.", metavar="N", rich_help_panel=SCORING)] = None,
    overlap: Annotated[int, typer.Option(help="With --window: frames neighbouring windows share.", metavar="N", rich_help_panel=SCORING)] = 0,
    force: Force = False,
) -> None:
    """Score a made clip: pose and expression against the driving clip, identity against the reference, flicker, window seams, audio (docs/eval.md)."""
    from hellomeme_cli.media.files import check_destination, require_file

    for path in (output, drive, ref):
        require_file(path)
    for path in filter(None, (json_path, plot_path)):
        check_destination(path, force, [output, drive, ref])
    from hellomeme_cli.quality.evaluate import evaluate as run_evaluation
    from hellomeme_cli.samplers.common import plan_windows
    from hellomeme_cli.media.video import probe_video

    windows = None
    if window is not None:
        count = probe_video(output).frame_count
        windows = tuple((start, min(stop, count)) for start, stop in plan_windows(count, window, overlap).windows)
    with _progress_bars() as report:
        evaluation = run_evaluation(output, drive, ref, self_reenactment=self_reenactment, windows=windows, cache=_cache(), progress=report)
    if evaluation.summary["faceless_frames"] == evaluation.summary["frames"]:
        raise HellomemeError(f"{output}: no face found in any of its {evaluation.summary['frames']} frames")
    out.print(_evaluation_table(evaluation.summary, f"{output.name} against {drive.name} and {ref.name}"))
    for name, why in evaluation.notes.items():
        out.print(f"not measured: {name}: {why}", highlight=False)
    if json_path:
        from hellomeme_cli.media.files import write_atomically

        write_atomically(json_path, evaluation.to_json())
        out.print(f"wrote {json_path}", highlight=False)
    if plot_path:
        from hellomeme_cli.quality.plot import plot

        plot(evaluation, output, plot_path, force=force)
        out.print(f"wrote {plot_path}", highlight=False)


@app.command(cls=_HelpCommand)
@_with_generation_options("video", skip=("version", "checkpoint", *CLIP_OUTPUT, *CAPTIONS))
def compare(
    reference: Portrait,
    drive: DrivingClip,
    versions: Annotated[str, typer.Option("--versions", help="The HelloMeme versions to compare, comma-separated (e.g. v2,v5).", metavar="LIST", rich_help_panel=MODEL)],
    checkpoints: Annotated[
        str | None, typer.Option("--checkpoint", help="Checkpoints to compare, comma-separated (files, presets or repo ids); each with each version.", metavar="LIST", rich_help_panel=MODEL)
    ] = None,
    recipes: Annotated[
        str | None, typer.Option("--recipes", help="Few-step recipes to compare, comma-separated; off: the version's own sampling (e.g. off,lcm,tcd,hyper-sd).", metavar="LIST", rich_help_panel=MODEL)
    ] = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="The folder to write the videos, the contact sheet and the table into.", metavar="DIR", rich_help_panel=INPUT_OUTPUT)] = Path("compare"),
    force: Force = False,
    *,
    settings: AnimateSettings,
) -> None:
    """Make the clip with each variant (version x checkpoint x recipe), time and score each (eval), write them side by side, a contact sheet and a table with the best marked."""
    from hellomeme_cli.media.files import check_writable, require_file
    from hellomeme_cli.settings import ModelOptions
    from hellomeme_cli.versions import get_version

    def listed(value: str | None) -> list:
        return [item.strip() for item in value.split(",") if item.strip()] if value else [None]

    variants = [(version, checkpoint, None if recipe == "off" else recipe)
                for version in listed(versions) if version for checkpoint in listed(checkpoints) for recipe in listed(recipes)]
    for version, _, recipe in variants:
        get_version(version, "video")
        ModelOptions(few_step=recipe)  # an unknown recipe is said now
    for path in (reference, drive):
        require_file(path)
    check_writable(output_dir)
    from hellomeme_cli.quality.compare import Variant, compare as run_compare

    with _progress_bars() as report:
        comparison = run_compare(reference, drive, [Variant(*variant) for variant in variants], settings, output_dir, force=force, cache=_cache(), progress=report)
    table = Table(title=f"{reference.name} driven by {drive.name}, seed {comparison.seed}")
    from hellomeme_cli.quality.compare import COLUMNS, best

    rows, marked = comparison.rows(), best(comparison.rows())
    for column in ("variant", *COLUMNS):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for index, row in enumerate(rows):
        cells = ["-" if row[c] is None else f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
        table.add_row(row["variant"], *[f"[bold green]{cell}[/]" if marked[c] == index else cell for c, cell in zip(COLUMNS, cells)])
    out.print(table)
    out.print(f"wrote {comparison.side_by_side}, {comparison.contact_sheet}, {comparison.table} and metrics.json in {output_dir}", highlight=False)


@app.command("app", cls=_HelpCommand)
def web_app(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every network interface).", metavar="ADDRESS")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port (default: Gradio's, 7860 or the next free one).", metavar="N")] = None,
    share: Annotated[bool, typer.Option("--share", help="Also serve it through a public gradio.live link.", metavar=FLAG)] = False,
) -> None:
    """Serve the web page (Gradio): video and image tabs with every setting, the clip check, results with their seed (docs/app.md)."""
    try:
        from hellomeme_cli.app import launch
    except ImportError as error:
        if (error.name or "").split(".")[0] != "gradio":
            raise
        raise HellomemeError('the app needs Gradio: pip install "hellomeme-cli[app]"') from None
    launch(host=host, port=port, share=share)


def _cache():
    from hellomeme_cli.weights.cache import WeightCache

    return WeightCache()


@weights_app.command("list", cls=_HelpCommand)
def weights_list() -> None:
    """Show every component, its source, and where each of its files is (HELLOMEME_HOME, the Hugging Face cache) or that it is missing."""
    cache = _cache()
    states: dict[str, list] = {}
    for file_state in cache.states():
        states.setdefault(file_state.component, []).append(file_state)
    places = {"home": "HELLOMEME_HOME", "hub": "HF cache"}
    rows = [("component", "state", "files", "source / location", "needed for")]
    for name, component in cache.lock.items():
        found = [s.state for s in states[name]]
        state = "ok" if all(s == "ok" for s in found) else "missing" if all(s == "missing" for s in found) else "incomplete"
        present = sum(s == "ok" for s in found)
        needed = ", ".join(component.needed_for or users(name))
        rows.append((name, state, f"{present}/{len(found)}", component.source, needed))
        rows += [(f"  {s.path}", places.get(s.where, "missing"), "", str(s.location or ""), s.detail) for s in states[name]]
    # Plain aligned text: a table drawn to the console's width would cut names in a pipe or a narrow terminal.
    typer.echo(f"HELLOMEME_HOME {cache.home}\nHF cache {cache.hub_cache}\n")
    for row in _aligned(rows):
        typer.echo(row)


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as lines whose columns start at the same place; nothing is cut."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _with_version(names: list[str] | None, version: str | None) -> list[str] | None:
    """The components named, and those `version` needs (every control and mode) where one is given."""
    from hellomeme_cli.versions import any_version

    if version is None:
        return names
    return list(dict.fromkeys([*(names or []), *any_version(version).all_components()]))


VersionComponents = Annotated[
    str | None, typer.Option("--version", help="Also what this HelloMeme version needs, every control and mode (docs/versions.md).", metavar="VERSION")
]
FetchNames = Annotated[list[str] | None, typer.Argument(help="Components or preset names (`weights presets`) to fetch (default: every component).", metavar="NAMES", show_default=False)]
VerifyNames = Annotated[list[str] | None, typer.Argument(help="Components to check; a missing file is an error (default: every file that is here).", metavar="NAMES", show_default=False)]


@weights_app.command("fetch", cls=_HelpCommand)
def weights_fetch(names: FetchNames = None, version: VersionComponents = None) -> None:
    """Download missing components into the Hugging Face cache (sha256-checked before use)."""
    from hellomeme_cli.weights.presets import fetch_preset, find_preset

    cache = _cache()
    names = _with_version(names, version)
    presets = [preset for name in names or [] if name not in cache.lock and (preset := find_preset(name, ("checkpoint", "lora")))]
    names = [name for name in names or [] if not any(preset.name.casefold() == name.casefold() for preset in presets)]
    for name in names:
        cache.component(name)
    with _progress_bars() as report:
        for preset in presets:
            fetch_preset(preset, cache, report)
        if names or not presets:
            cache.fetch(names or None, progress=report)
    out.print(f"weights ready in {cache.home} and the Hugging Face cache {cache.hub_cache}", highlight=False)


@weights_app.command("presets", cls=_HelpCommand)
def weights_presets() -> None:
    """Show the official app's checkpoints and LoRAs by name (`--checkpoint NAME`, `--lora NAME[:SCALE]`), fetched on first use."""
    from hellomeme_cli.weights.presets import all_presets, is_fetched

    cache = _cache()
    rows = [("name", "kind", "source", "state")]
    for preset in all_presets():
        source = f"{preset.repo}/{preset.files[0]}" if preset.kind == "lora" else preset.repo
        state = "the base model (component sd15)" if preset.kind == "base" else "in cache" if is_fetched(preset, cache) else "fetched on first use"
        rows.append((preset.name, "checkpoint" if preset.kind == "base" else preset.kind, source, state))
    for row in _aligned(rows):
        typer.echo(row)


@weights_app.command("verify", cls=_HelpCommand)
def weights_verify(names: VerifyNames = None, version: VersionComponents = None) -> None:
    """Re-hash every file, wherever it is, and name every missing or corrupt one; without names or --version, say which components are not fetched."""
    cache = _cache()
    states, not_fetched = cache.verify(_with_version(names, version) or None)
    bad = [s for s in states if s.state in ("missing", "corrupt")]
    for state in bad:
        out.print(f"{state.state:8s} {state.location or f'{state.component}/{state.path}'} {state.detail}".rstrip(), highlight=False)
    if bad:
        raise HellomemeError(f"{len(bad)} file(s) missing or corrupt in {cache.home} and the Hugging Face cache {cache.hub_cache}")
    checked = len({state.component for state in states})
    out.print(f"{checked} component(s) in {cache.home} and the Hugging Face cache {cache.hub_cache} verified", highlight=False)
    if not_fetched:
        out.print(f"not fetched (`hellomeme weights fetch NAME` when a run needs one): {', '.join(not_fetched)}", highlight=False)


@weights_app.command("import", cls=_HelpCommand)
def weights_import(
    source: Annotated[Path, typer.Argument(help="A file or a folder of files obtained elsewhere.", metavar="SOURCE", show_default=False)],
) -> None:
    """Add weight files obtained elsewhere (air-gapped machines), checked against the lock."""
    imported = _cache().import_path(source)
    for state in imported:
        out.print(f"imported {state.component}/{state.path}", highlight=False)


@weights_app.command("lock", cls=_HelpCommand)
def weights_lock() -> None:
    """Resolve revisions to commit ids and record every file's sha256 (needs the network)."""
    from hellomeme_cli.weights.cache import LOCK_PATH, read_lock, resolve_lock, write_lock

    with _progress_bars() as report:
        resolved = resolve_lock(read_lock(), progress=report)
    write_lock(resolved, LOCK_PATH.resolve())
    out.print(f"wrote {LOCK_PATH.resolve()}")


@weights_app.command("make-tiny", cls=_HelpCommand)
def weights_make_tiny(
    folder: Annotated[Path, typer.Argument(help="Cache folder to write, used later as HELLOMEME_HOME.", metavar="FOLDER", show_default=False)],
    seed: Annotated[int, typer.Option(help="Seed for the random weights.", metavar="N")] = 0,
) -> None:
    """Write tiny random-weight versions of every network in the layout of a real download."""
    from hellomeme_cli.weights.tiny import make_tiny

    make_tiny(folder, seed=seed)
    out.print(f"tiny weights in {folder}; add the face model with `HELLOMEME_HOME={folder} hellomeme weights import FILE`")


@comfyui_app.command("install", cls=_HelpCommand)
def comfyui_install(
    comfyui: Annotated[Path, typer.Argument(metavar="COMFYUI_DIR", help="The ComfyUI folder: its checkout, or the --base-directory it runs with.")],
    remove: Annotated[bool, typer.Option("--remove", help="Take the nodes away again.", metavar=FLAG)] = False,
) -> None:
    """Put hellomeme's nodes and example workflows in ComfyUI (custom_nodes/hellomeme), loaded from this package; run it with the Python ComfyUI runs in."""
    from hellomeme_cli.comfyui.install import install, remove as uninstall

    if remove:
        out.print(f"removed {uninstall(comfyui)}", highlight=False)
        return
    for path in install(comfyui):
        out.print(f"wrote {path}", highlight=False)
    out.print(f"ComfyUI loads the nodes (category hellomeme) when it next starts, run by a Python that has hellomeme-cli, as this one: {sys.executable}", highlight=False)


def _ray_address_filled(arguments: list[str]) -> list[str]:
    """`--ray` without an address (last, or before another option) means `--ray local`: typer has no
    options with an optional value."""
    filled = []
    for number, argument in enumerate(arguments):
        filled.append(argument)
        if argument == "--ray" and (number + 1 == len(arguments) or arguments[number + 1].startswith("-")):
            filled.append(LOCAL_RAY)
    return filled


# The signals that stop a run, as they are named in the line that says so.
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
# Commands that write their output only at the end: stopped, they have written nothing.
WRITE_AT_THE_END = ("animate", "image", "demo")
_stopped_by: list[int] = []  # the signals that came during this run, first first


def _stop(number: int, frame: object) -> None:
    """SIGINT and SIGTERM both unwind the run as Ctrl-C does (KeyboardInterrupt: partial files removed,
    child processes ended, a batch's report written); which one came sets the exit status."""
    _stopped_by.append(number)
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stopping_on_signals() -> Iterator[None]:
    """Within: SIGINT and SIGTERM stop the run through `_stop` (a signal the caller ignores, as `nohup`
    ignores SIGINT, stays ignored)."""
    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    for number, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(number, _stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def interrupted_status() -> int:
    """The exit status of a run a signal stopped: 128 + its number (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + (_stopped_by[0] if _stopped_by else signal.SIGINT)


def _from_interrupt(error: BaseException) -> bool:
    """Whether `error` comes of a KeyboardInterrupt (typer turns one into exit 130 and says nothing)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _say_interrupted(command: str | None) -> None:
    """One line: what stopped the run and what is left of it."""
    what = STOP_SIGNALS.get(_stopped_by[0] if _stopped_by else signal.SIGINT)
    left = "nothing was written" if command in WRITE_AT_THE_END else "stopped before the end, no partial file left"
    console.print(f"[yellow]interrupted[/yellow] ({what}): {left}", highlight=False)


def _crossfade_joined(arguments: list[str]) -> list[str]:
    """`--loop crossfade N` (the frames as a word of their own) read as `--loop crossfade:N`."""
    joined: list[str] = []
    for argument in arguments:
        if argument.isdigit() and len(joined) >= 2 and joined[-2] == "--loop" and joined[-1] == "crossfade":
            joined[-1] = f"crossfade:{argument}"
        else:
            joined.append(argument)
    return joined


def main() -> None:
    """Errors end as one red line and exit code 1; `--debug` anywhere on the line (or HELLOMEME_DEBUG=1)
    shows the traceback too. An unexpected error (a bug) says so and how to see its traceback. Ctrl-C
    and SIGTERM end as one line saying so, exit code 130 and 143."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("HELLOMEME_DEBUG", "") not in ("", "0")
    arguments = _crossfade_joined(_ray_address_filled([argument for argument in sys.argv[1:] if argument != "--debug"]))
    command = next((argument for argument in arguments if not argument.startswith("-")), None)
    if debug:  # the library's own notes (weights it left unused, ...) on stderr
        import logging

        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("hellomeme_cli").setLevel(logging.DEBUG)
    try:
        with _stopping_on_signals():
            app(args=arguments)
    except SystemExit as exit_:
        if _from_interrupt(exit_) or (_stopped_by and exit_.code not in (0, None, interrupted_status())):
            _say_interrupted(command)
            raise SystemExit(interrupted_status()) from None
        # Typer ends a run whose reader left early (`hellomeme weights list | head`) with exit 1, its
        # streams wrapped to stay quiet; what the reader read was written, so nothing failed. The wrapper
        # is matched by name: typer 0.29 raises it from a private copy of click, not click's own.
        if exit_.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            raise SystemExit(0) from None
        raise
    except BaseException as error:
        if _stopped_by or isinstance(error, KeyboardInterrupt):  # a signal's unwinding, whatever it broke on the way
            _say_interrupted(command)
            raise SystemExit(interrupted_status()) from None
        if debug:
            console.print_exception()
        if isinstance(error, HellomemeError):
            console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        elif isinstance(error, OSError) and error.filename:  # a file the checks could not foresee (removed, a full disk)
            from hellomeme_cli.media.files import os_cause

            console.print(f"[red]error:[/red] {escape(str(error.filename))}: {os_cause(error)}", highlight=False)
        elif isinstance(error, Exception):
            console.print(
                f"[red]error:[/red] unexpected {type(error).__name__}: {escape(_first_line(error))} (run again with --debug for the traceback)",
                highlight=False,
            )
        else:
            raise
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
