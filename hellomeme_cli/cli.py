"""Command line: parses and validates, then calls the library. Nothing else lives here."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
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

from . import __version__
from .errors import HellomemeError
from .progress import ProgressCallback, ProgressEvent

if TYPE_CHECKING:
    from .batch import BatchReport
    from .pipeline import AnimateSettings

app = typer.Typer(
    name="hellomeme",
    help="Make meme videos: give a portrait the head motion and expressions of a driving video (HelloMeme v1).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
weights_app = typer.Typer(help="List, download, verify and import model weights.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


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
            bars.update(tasks[event.task], completed=event.completed, total=event.total)

        yield report


def _quiet_libraries() -> None:
    """diffusers and transformers log warnings and draw their own bars while loading; we draw ours."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _print_version(value: bool) -> None:
    if value:
        print(f"hellomeme {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Make meme videos: give a portrait the head motion and expressions of a driving video (HelloMeme v1)."""


@app.command()
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


def _generation_settings(
    steps: Annotated[int, typer.Option(help="Denoising steps (stage 2; stage 1 uses at most 10).")] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (1 turns it off).")] = 2.0,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: a new one, printed and stored in the video).")] = None,
    fps: Annotated[float | None, typer.Option(help="Output frame rate (default: the driving clip's).")] = None,
    max_frames: Annotated[int | None, typer.Option(help="Use only the first N frames of the driving clip.")] = None,
    trans_ratio: Annotated[float, typer.Option(help="How much of the driving head's movement across the frame to follow (0..1).")] = 0.0,
    control: Annotated[str, typer.Option(help="Expression signal: blendshapes (HMControlNet) or pdfgc (HMControlNet2).")] = "blendshapes",
    prompt: Annotated[str, typer.Option(help="Extra prompt, put before the default portrait prompt.")] = "",
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt.")] = "",
    checkpoint: Annotated[
        str | None, typer.Option(help="SD1.5-family checkpoint: a .safetensors/.ckpt file, a diffusers folder or a Hugging Face repo id.")
    ] = None,
    lora: Annotated[list[str] | None, typer.Option(help="LoRA file, FILE or FILE:SCALE; repeat for several.")] = None,
    vae: Annotated[Path | None, typer.Option(help="Replacement VAE for decoding (file or diffusers folder).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (float16 on GPUs, float32 on CPU), float32, float16 or bfloat16.")] = "auto",
    window: Annotated[int, typer.Option(help="Frames per motion-module window in stage 2.")] = 12,
    overlap: Annotated[int, typer.Option(help="Frames shared by neighbouring windows in stage 2.")] = 4,
    crop: Annotated[bool, typer.Option(help="Crop the reference and the clip around the face (--no-crop: use whole frames).")] = True,
    face_index: Annotated[int, typer.Option(help="Which face of the driving clip to follow (0: the largest).")] = 0,
    smooth: Annotated[bool, typer.Option(help="Smooth the driving landmarks and pose over time.")] = True,
    size: Annotated[int, typer.Option(help="Working size in pixels (multiple of 64); the released weights are trained at 512.")] = 512,
    paste_back: Annotated[
        bool, typer.Option(help="Blend the generated face back into the whole reference picture, at its full size.")
    ] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the network blocks (slow first clip, faster after).")] = False,
    low_memory: Annotated[
        bool, typer.Option("--low-memory", help="Keep networks on the CPU, each on the GPU only while it runs (8-12 GB cards).")
    ] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Channels-last memory format (faster convolutions on recent GPUs).")] = False,
) -> AnimateSettings:
    """The generation options `animate` and `batch` share, as the (validated) settings they make; the
    device is each command's own option."""
    from .checkpoints import parse_lora_option
    from .engine import ModelOptions
    from .pipeline import AnimateSettings

    models = ModelOptions(
        control=control,
        checkpoint=checkpoint,
        vae=vae,
        loras=tuple(parse_lora_option(value) for value in lora or []),
        dtype=dtype,
        compile=compile,
        low_memory=low_memory,
        channels_last=channels_last,
    )
    return AnimateSettings(
        models=models, steps=steps, guidance=guidance, seed=seed, fps=fps, max_frames=max_frames, trans_ratio=trans_ratio,
        prompt=prompt, negative_prompt=negative_prompt, window=window, overlap=overlap, crop=crop, face_index=face_index,
        smoothing=smooth, size=size, paste_back=paste_back,
    )


# Resolving annotations: `AnimateSettings` is imported where it is used (it pulls in torch); here any class will do.
_LAZY_NAMES = {"AnimateSettings": object}


def _with_generation_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command the generation options too: typer sees one flat list of options, the command
    gets the settings they make as its `settings` argument."""
    shared = inspect.signature(_generation_settings, eval_str=True, locals=_LAZY_NAMES).parameters
    own = inspect.signature(command, eval_str=True, locals=_LAZY_NAMES).parameters
    parameters = [parameter for name, parameter in own.items() if name != "settings"] + list(shared.values())

    @functools.wraps(command, assigned=("__module__", "__name__", "__qualname__", "__doc__"))
    def run(**values: Any) -> None:
        settings = _generation_settings(**{name: values.pop(name) for name in shared})
        command(**values, settings=settings)

    run.__signature__ = inspect.Signature(parameters)
    run.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    return run


@app.command()
@_with_generation_options
def animate(
    reference: Annotated[Path, typer.Argument(help="The portrait to animate (jpg, png, ...).")],
    drive: Annotated[Path, typer.Argument(help="The driving video whose head motion and expressions it takes, or its `hellomeme track` .npz (silent output).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="The mp4 to write (default: REF_DRIVE.mp4 in the current folder).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    *,
    settings: AnimateSettings,
) -> None:
    """Animate a portrait with a driving video's head motion and expressions; writes an mp4 with the clip's audio."""
    from .driving import check_driving
    from .pipeline import animate as run_animate, default_output

    output = output or default_output(reference, drive)
    source, settings, cache = _prepare_run(reference, drive, output, device, force, settings, check_driving)
    with _progress_bars() as report:
        result = run_animate(source, drive, output, settings, _load_models(settings, cache, report), force=force, progress=report)
    out.print(
        f"wrote {result.output}: {result.frames} frames at {result.fps:g} fps, seed {result.seed}, "
        f"{result.faceless_frames} driving frames without a face (filled), "
        + (f"{result.repeated_frames} driving frames repeated and {result.dropped_frames} dropped for the rate, " if result.repeated_frames or result.dropped_frames else "")
        + f"{result.seconds:.0f} s",
        highlight=False,
    )


@app.command()
@_with_generation_options
def image(
    reference: Annotated[Path, typer.Argument(help="The portrait to animate (jpg, png, ...).")],
    drive_image: Annotated[Path, typer.Argument(help="A picture whose head pose and expression it takes, or a `hellomeme track` .npz (its first frame with a face).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="The picture to write (default: REF_DRIVE.png in the current folder).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    *,
    settings: AnimateSettings,
) -> None:
    """One picture: the portrait with the head pose and expression of another picture."""
    from .driving import check_driving_image
    from .pipeline import default_output, render_image

    output = output or default_output(reference, drive_image, ".png")
    source, settings, cache = _prepare_run(reference, drive_image, output, device, force, settings, check_driving_image)
    with _progress_bars() as report:
        seed = render_image(source, drive_image, output, settings, _load_models(settings, cache, report), force=force, progress=report)
    out.print(f"wrote {output}, seed {seed}", highlight=False)


def _prepare_run(
    reference: Path, drive: Path, output: Path, device: str, force: bool, settings: AnimateSettings, check_drive: Callable[[Path], object]
):
    """Everything that can fail fast, before any model loads: the output path, the options, the
    weight cache, the driving input (`check_drive` reads or probes it) and the reference's face."""
    from .engine import check_options, required_components
    from .pipeline import load_reference
    from .tracking import MODEL_FILE
    from .video import check_destination

    settings = dataclasses.replace(settings, models=dataclasses.replace(settings.models, device=device)).with_seed()
    check_destination(output, force, [reference, drive])
    check_options(settings.models)
    cache = _cache()
    face_model = cache.require(required_components(settings.models.control))["face_landmarker"] / MODEL_FILE
    check_drive(drive)
    source = load_reference(reference, settings, face_model)
    console.print(f"seed {settings.seed}", highlight=False)
    _quiet_libraries()
    return source, settings, cache


def _load_models(settings: AnimateSettings, cache, report: ProgressCallback):
    from .engine import load_models

    return load_models(settings.models, cache, progress=report)


@app.command()
@_with_generation_options
def batch(
    input_dir: Annotated[
        Path | None, typer.Argument(help="Folder of driving clips: each video directly in it (other files are reported as failed).")
    ] = None,
    ref: Annotated[Path | None, typer.Option("--ref", help="The portrait to animate with every clip (or every --pairs row without one).")] = None,
    pairs: Annotated[
        Path | None, typer.Option(help="CSV with columns reference,driving[,output,seed,steps,...] instead of a folder (docs/batch.md).")
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", "-o", help="Where outputs and the report go (default: a hellomeme folder in INPUT_DIR, or beside the CSV).")
    ] = None,
    report: Annotated[Path | None, typer.Option(help="The JSON report to write (default: OUTPUT_DIR/batch-report.json).")] = None,
    devices: Annotated[
        str, typer.Option(help="Comma-separated devices, e.g. cuda:0,cuda:1: one worker process each; one device runs in this process.")
    ] = "auto",
    force: Annotated[bool, typer.Option(help="Remake every clip, replacing finished outputs too.")] = False,
    *,
    settings: AnimateSettings,
) -> None:
    """Animate many clips with models loaded once; re-running skips finished clips. Exit code 1 if any clip failed."""
    from .batch import plan_folder, plan_pairs, run_batch, sigterm_interrupts

    if pairs and input_dir:
        raise HellomemeError("give a folder of clips or --pairs, not both")
    if pairs:
        plan = plan_pairs(pairs, settings, reference=ref, output_dir=output_dir, report=report)
    elif input_dir and ref:
        plan = plan_folder(input_dir, ref, settings, output_dir=output_dir, report=report)
    else:
        raise HellomemeError("give a folder of clips and --ref REF, or --pairs FILE.csv")
    _quiet_libraries()
    with _progress_bars() as bars, sigterm_interrupts():
        result = run_batch(plan, devices.split(","), force=force, cache=_cache(), progress=bars)
    out.print(_batch_table(result))
    out.print(f"report {result.path}", highlight=False)
    if not result.finished:
        console.print("[yellow]interrupted[/yellow]: run the same command again to finish", highlight=False)
        raise typer.Exit(130)
    if result.failed:
        raise typer.Exit(1)


def _batch_table(result: BatchReport) -> Table:
    """One row per clip: how it went, and its output or why it failed (the clip's name said once)."""
    from .batch import STATUSES

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


@app.command()
def track(
    drive: Annotated[Path, typer.Argument(help="The driving video.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to save the track (.npz; default: DRIVE-NAME.track.npz here).")
    ] = None,
    preview: Annotated[
        Path | None, typer.Option(help="Also write a preview video: crop, landmarks, pose square, expression bars.")
    ] = None,
    face_index: Annotated[int, typer.Option(help="Which face to follow: 0 the largest in the first frame with a face, 1 the next...")] = 0,
    smooth: Annotated[bool, typer.Option(help="Smooth landmarks and pose over time (One Euro filter, no lag).")] = True,
    smooth_cutoff: Annotated[float, typer.Option(help="Smoothing: lower removes more jitter from slow motion.")] = 1.0,
    smooth_beta: Annotated[float, typer.Option(help="Smoothing: higher follows fast motion more closely.")] = 10.0,
    max_frames: Annotated[int | None, typer.Option(help="Track only the first N frames.")] = None,
    force: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
) -> None:
    """Track the face through a clip: save its motion template (landmarks, expression scores, head pose, face patches, timing) to drive animate, image and batch without the clip."""
    from .driving import save_template, track_clip
    from .preview import write_preview
    from .tracking import Smoothing, default_model_path
    from .video import check_destination, read_frames

    output = output or Path.cwd() / f"{drive.stem}.track.npz"
    for path in filter(None, (output, preview)):
        check_destination(path, force, [drive])
    if max_frames is not None and max_frames < 1:
        raise HellomemeError(f"--max-frames must be at least 1 (got {max_frames})")
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


def _cache():
    from .weights import WeightCache

    return WeightCache()


@weights_app.command("list")
def weights_list() -> None:
    """Show every component, where it comes from, and its state in the cache."""
    cache = _cache()
    states: dict[str, list[str]] = {}
    for state in cache.states():
        states.setdefault(state.component, []).append(state.state)
    table = Table(title=f"weights in {cache.home}")
    for column in ("component", "state", "files", "source", "needed for"):
        table.add_column(column)
    for name, component in cache.lock.items():
        found = states[name]
        state = "ok" if all(s == "ok" for s in found) else "missing" if all(s == "missing" for s in found) else "incomplete"
        present = sum(s == "ok" for s in found)
        table.add_row(name, state, f"{present}/{len(found)}", component.source, ", ".join(component.needed_for))
    out.print(table)


@weights_app.command("fetch")
def weights_fetch(
    names: Annotated[list[str] | None, typer.Argument(help="Components to fetch (default: all).")] = None,
) -> None:
    """Download missing components (resumable, sha256-checked before use)."""
    cache = _cache()
    for name in names or []:
        cache.component(name)
    with _progress_bars() as report:
        cache.fetch(names or None, progress=report)
    out.print(f"weights ready in {cache.home}")


@weights_app.command("verify")
def weights_verify(
    names: Annotated[list[str] | None, typer.Argument(help="Components to check (default: all).")] = None,
) -> None:
    """Re-hash the cache and name every missing or corrupt file."""
    cache = _cache()
    bad = [s for s in cache.states(names or None, rehash=True) if s.state in ("missing", "corrupt")]
    for state in bad:
        out.print(f"{state.state:8s} {cache.path(state.component) / state.path} {state.detail}".rstrip(), highlight=False)
    if bad:
        raise HellomemeError(f"{len(bad)} file(s) missing or corrupt in {cache.home}")
    out.print(f"all weights in {cache.home} verified")


@weights_app.command("import")
def weights_import(
    source: Annotated[Path, typer.Argument(help="A file or a folder of files obtained elsewhere.")],
) -> None:
    """Add weight files obtained elsewhere (air-gapped machines), checked against the lock."""
    imported = _cache().import_path(source)
    for state in imported:
        out.print(f"imported {state.component}/{state.path}", highlight=False)


@weights_app.command("lock")
def weights_lock() -> None:
    """Resolve revisions to commit ids and record every file's sha256 (needs the network)."""
    from .weights import LOCK_PATH, read_lock, resolve_lock, write_lock

    with _progress_bars() as report:
        resolved = resolve_lock(read_lock(), progress=report)
    write_lock(resolved, LOCK_PATH.resolve())
    out.print(f"wrote {LOCK_PATH.resolve()}")


@weights_app.command("make-tiny")
def weights_make_tiny(
    folder: Annotated[Path, typer.Argument(help="Cache folder to write, used later as HELLOMEME_HOME.")],
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
) -> None:
    """Write tiny random-weight versions of every network in the layout of a real download."""
    from .tiny import make_tiny

    make_tiny(folder, seed=seed)
    out.print(f"tiny weights in {folder}; add the face model with `HELLOMEME_HOME={folder} hellomeme weights import FILE`")


@app.command()
def bench(
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write every number to this JSON file.")] = None,
    full_size: Annotated[bool, typer.Option(help="Add the full-size run: SD1.5-sized random networks at 512x512 (CUDA GPU only).")] = False,
    frames: Annotated[list[int] | None, typer.Option(help="Looped clip lengths for the memory runs; repeat (default: 100 and 1000).")] = None,
    full_size_frames: Annotated[list[int] | None, typer.Option(help="Clip lengths of the full-size run; repeat (default: 24 and 96).")] = None,
    reference: Annotated[Path | None, typer.Option(help="Portrait (default: majicmix1.jpg of the shared test media).")] = None,
    drive: Annotated[Path | None, typer.Option(help="Driving clip (default: qie.mp4 of the shared test media).")] = None,
    face_model: Annotated[Path | None, typer.Option(help="MediaPipe face_landmarker.task (default: the weight cache's).")] = None,
    size: Annotated[int, typer.Option(help="Working size of the CPU runs with tiny weights.")] = 128,
    steps: Annotated[int, typer.Option(help="Denoising steps of the CPU clip run (memory runs use 1).")] = 4,
    max_frames: Annotated[int | None, typer.Option(help="Use only the first N frames of the clip in the CPU clip run.")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="Full-size run: torch.compile the UNet and VAE blocks.")] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Full-size run: channels-last memory format.")] = False,
    low_memory: Annotated[bool, typer.Option("--low-memory", help="Full-size run: sequential CPU offload.")] = False,
) -> None:
    """Measure speed and memory: stage times and peak RSS with tiny weights on the CPU, face tracking fps, full size on a GPU."""
    from .bench import SHARED_MEDIA, BenchSettings, format_table, run_benchmarks, write_json
    from .engine import ModelOptions
    from .tracking import default_model_path
    from .video import check_destination

    reference = reference or SHARED_MEDIA / "majicmix1.jpg"
    drive = drive or SHARED_MEDIA / "qie.mp4"
    for path, what in ((reference, "portrait"), (drive, "driving clip")):
        if not path.is_file():
            raise HellomemeError(f"{what} not found: {path} (give it with --{'reference' if what == 'portrait' else 'drive'})")
    face_model = face_model or default_model_path()
    if json_path:
        check_destination(json_path, True, [reference, drive])
    settings = BenchSettings(
        reference=reference, driving=drive, face_model=face_model, size=size, steps=steps, clip_frames=max_frames,
        memory_frames=tuple(frames or (100, 1000)), full_size=full_size, full_size_frames=tuple(full_size_frames or (24, 96)),
        full_size_options=ModelOptions(device="cuda", compile=compile, channels_last=channels_last, low_memory=low_memory),
    )
    _quiet_libraries()
    with _progress_bars() as report:
        result = run_benchmarks(settings, progress=report)
    out.print(format_table(result), highlight=False)
    if json_path:
        write_json(result, json_path)
        out.print(f"wrote {json_path}", highlight=False)


def main() -> None:
    try:
        app()
    except HellomemeError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
