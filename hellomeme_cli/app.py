"""`hellomeme app`: the web page (Gradio) over the library, as the official app offers it.

Every input is made from the one settings source (settings.all_settings), every run goes through
the library API (api.load_pipeline, api.animate, api.render_image), progress comes through the
library's callback. Loaded models are kept while the model options stay the same (`ModelCache`),
and one generation runs at a time: the others wait in Gradio's queue.
"""

from __future__ import annotations

import contextlib
import html
import inspect
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from hellomeme_cli import api
from hellomeme_cli.errors import HellomemeError, first_line
from hellomeme_cli.front_end import BASE_CHECKPOINT, FIXED_CHOICES, ModelCache, checkpoint_choices, lora_choices
from hellomeme_cli.media.files import check_writable
from hellomeme_cli.media.formats import DEFAULT_CROSSFADE, FORMATS, STICKERS, output_suffix
from hellomeme_cli.progress import ProgressCallback, ProgressEvent
from hellomeme_cli.settings import CAPTIONS, CLIP_OUTPUT, Setting, all_settings, flat_values, from_values, parse_cell
from hellomeme_cli.versions import DEFAULT_VERSIONS, version_names
from hellomeme_cli.weights.cache import WeightCache

MAX_UPLOAD = "200mb"  # Gradio refuses larger uploads (launch's max_file_size)
DEFAULT_CONTROL = "the version's"
# Settings the image tab leaves out: a clip's (and the compare tab, which writes each variant as an
# mp4 to score it, the output's format, limits, loop and captions).
NOT_IN_IMAGE_TAB = ("fps", "max_frames", "window", "overlap", *CLIP_OUTPUT)
NOT_COMPARED = (*CLIP_OUTPUT, *CAPTIONS)
PICTURE_FORMATS = ("gif", "webp")  # shown as an animated picture: a video player plays neither
_log = logging.getLogger(__name__)


def _choices(setting: Setting, mode: str, cache: WeightCache) -> list | None:
    """The values a setting takes, where there is a known list (free text is allowed where marked)."""
    if setting.name == "version":
        return list(version_names(mode))
    if setting.name == "control":
        return [DEFAULT_CONTROL, *FIXED_CHOICES["control"]]
    if setting.name == "checkpoint":
        return checkpoint_choices(cache)
    if setting.name == "loras":
        return lora_choices(cache)
    if setting.name in ("scheduler", "few_step"):
        return ["", *FIXED_CHOICES[setting.name]]  # "": the version's own (an API caller may leave it)
    if setting.name == "device":
        return ["auto", "cpu", "cuda", "mps"]
    meme = {"format": ("", *FORMATS), "sticker": ("", *STICKERS), "loop": ("off", "pingpong", f"crossfade:{DEFAULT_CROSSFADE}")}
    if setting.name in meme:
        return list(meme[setting.name])
    return list(FIXED_CHOICES[setting.name]) if setting.name in FIXED_CHOICES else None


def _component(setting: Setting, mode: str, cache: WeightCache) -> gr.components.Component:
    """One input for a declared setting: its kind from the setting's type, its label the option's name."""
    label = setting.flags[0].split("/")[0].removeprefix("--")
    info = f"{setting.help} Default: {DEFAULT_VERSIONS[mode] if setting.name == 'version' else setting.shown_default}."
    common = dict(label=label, info=info, elem_id=f"{mode}-{setting.name}")
    choices = _choices(setting, mode, cache)
    if setting.name == "version":
        return gr.Dropdown(choices, value=DEFAULT_VERSIONS[mode], **common)
    if setting.name == "control":
        return gr.Dropdown(choices, value=DEFAULT_CONTROL, **common)
    if setting.name == "loras":
        return gr.Dropdown(choices, value=[], multiselect=True, allow_custom_value=True, **{**common, "info": info + " NAME or FILE, :SCALE after it."})
    if setting.name == "checkpoint":
        return gr.Dropdown(choices, value=choices[0], allow_custom_value=True, **{**common, "info": info + " Or a file, folder or repo id."})
    if choices is not None:
        value = "" if setting.default is None else setting.default
        return gr.Dropdown(choices, value=value, allow_custom_value=setting.name in ("device", "scheduler", "loop"), **common)
    if setting.cli_type is bool:
        return gr.Checkbox(value=setting.default, **common)
    if setting.cli_type in (int | None, float | None):  # empty means the default (a number field would send 0)
        return gr.Textbox(value="", placeholder=setting.shown_default, **common)
    if setting.cli_type is int:
        return gr.Number(value=setting.default, precision=0, **common)
    if setting.cli_type is float:
        return gr.Number(value=setting.default, **common)
    return gr.Textbox(value=setting.default or "", **common)


def _value(setting: Setting, value: Any) -> Any:
    """An input's value as the setting's (empty means the default; numbers typed as declared)."""
    if (setting.name, value) in (("control", DEFAULT_CONTROL), ("checkpoint", BASE_CHECKPOINT)):
        return None
    if isinstance(value, str):
        value = value.strip()
    if value in ("", None):
        return setting.default
    if isinstance(value, str) and setting.cli_type in (int | None, float | None):
        return parse_cell(setting, value)
    if setting.cli_type is int:
        return int(value)
    if setting.cli_type is float:
        return float(value)
    return value


class RunCancelled(Exception):
    """A run stopped by its page's Cancel button (raised at its next progress event)."""


class _Cancels:
    """The Cancel buttons' requests, by browser session. Gradio's own cancelling lets a function that
    is already running finish (and write its file), so a run looks here at every progress event
    (each frame, each denoising step) and stops: its partial file is removed as on any failure."""

    def __init__(self) -> None:
        self._asked: set[str] = set()
        self._lock = threading.Lock()

    def ask(self, session: str) -> None:
        with self._lock:
            self._asked.add(session)

    def start(self, session: str) -> None:
        """A new run of `session`: a Cancel pressed before it does not stop it."""
        with self._lock:
            self._asked.discard(session)

    def check(self, session: str) -> None:
        with self._lock:
            if session in self._asked:
                self._asked.discard(session)
                raise RunCancelled("cancelled: nothing was written")


def _reporter(progress: gr.Progress, stop: Callable[[], None] = lambda: None) -> ProgressCallback:
    """The library's progress events shown in the page, one bar per stage; `stop` raises when the
    run is to end there."""

    def report(event: ProgressEvent) -> None:
        stop()
        progress((event.completed, event.total), desc=event.task, unit=event.unit)

    return report


def _one_line_errors(run: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input said in the page in one line (gr.Error), never a traceback; a bug is logged on the server."""

    def guarded(*args: Any) -> Any:
        try:
            return run(*args)
        except RunCancelled as cancelled:
            raise gr.Error(str(cancelled), duration=None, print_exception=False) from None
        except HellomemeError as error:
            message = first_line(error)
            for upload in (arg for arg in args if isinstance(arg, str) and Path(arg).is_file()):
                message = message.replace(str(upload), Path(upload).name)  # the name the user gave, not Gradio's upload folder
            raise gr.Error(html.escape(message), duration=None, print_exception=False) from None
        except gr.Error:
            raise
        except Exception as error:
            _log.exception("hellomeme app: unexpected error")
            raise gr.Error(html.escape(f"unexpected {type(error).__name__}: {first_line(error)}"), duration=None, print_exception=False) from None

    return guarded


def _named(run: Callable[..., Any], names: Iterable[str]) -> Callable[..., Any]:
    """`run(*values, request, progress)` with a signature naming each input: Gradio finds the progress
    parameter by its default and the request (its browser session) by its annotation, and the API
    (gradio_client) names its parameters after the settings."""

    def handler(*args: Any) -> Any:
        return run(*args)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter(name, kind) for name in names]
    extra = [inspect.Parameter("request", kind, annotation=gr.Request), inspect.Parameter("progress", kind, default=gr.Progress())]
    handler.__signature__ = inspect.Signature([*parameters, *extra])
    handler.__annotations__ = {"request": gr.Request}
    handler.__name__ = run.__name__
    return handler


class _Tab:
    """One tab's settings inputs, and its values split as the library wants them."""

    def __init__(self, mode: str, cache: WeightCache, groups: tuple[str, ...] = ("models", "generation"), leave_out: tuple[str, ...] = ()):
        self.mode = mode
        self.settings = [
            s for s in all_settings() if (mode == "video" or s.name not in NOT_IN_IMAGE_TAB) and s.group in groups and s.name not in leave_out
        ]
        self.inputs: dict[str, gr.components.Component] = {}
        for group, title in (("models", "Models"), ("generation", "Generation")):
            with gr.Accordion(title, open=group == "generation"):
                for setting in self.settings:
                    if setting.group == group:
                        self.inputs[setting.name] = _component(setting, mode, cache)

    def split(self, values: Iterable[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model settings, generation settings) by name, from the inputs' values in order."""
        typed = {setting.name: _value(setting, value) for setting, value in zip(self.settings, values)}
        groups = {setting.name: setting.group for setting in self.settings}
        models = {name: value for name, value in typed.items() if groups[name] == "models"}
        return models, {name: value for name, value in typed.items() if groups[name] == "generation"}


def _shown_settings(models: dict[str, Any], generation: dict[str, Any], seed: int) -> dict[str, Any]:
    """The run's settings as shown beside the result: every setting, the version's defaults filled in, the seed the one used."""
    settings = from_values({**models, **generation, "seed": seed})
    values = {name: settings.resolved(name) if value is None and hasattr(settings.models.spec.defaults, name) else value
              for name, value in flat_values(settings).items()}
    values["control"] = settings.models.control_kind.name
    return {name: (str(value) if isinstance(value, Path) else [f"{p}:{s:g}" for p, s in value] if name == "loras" else value)
            for name, value in values.items()}


def create_app(cache: WeightCache | None = None, output_dir: Path | None = None) -> gr.Blocks:
    """The page: a video tab, an image tab, the driving clip's check. Outputs go to `output_dir`
    (default: a new temporary folder), one subfolder per run."""
    cache = cache or WeightCache()
    output_root = Path(output_dir or tempfile.mkdtemp(prefix="hellomeme-app-"))
    check_writable(output_root)  # when the app starts, not when the first result is written
    output_root.mkdir(parents=True, exist_ok=True)
    models = ModelCache(cache)
    cancels = _Cancels()

    def run_folder() -> Path:
        return Path(tempfile.mkdtemp(prefix="run-", dir=output_root))

    @contextlib.contextmanager
    def cancellable(request: gr.Request) -> Iterator[tuple[Callable[[], None], Path]]:
        """A run that its page's Cancel button stops, and its own new folder; stopped, it leaves
        that folder no more."""
        session = request.session_hash or ""
        cancels.start(session)
        folder = run_folder()
        try:
            yield lambda: cancels.check(session), folder
        except RunCancelled:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def ask_to_cancel(request: gr.Request) -> None:
        cancels.ask(request.session_hash or "")

    @_one_line_errors
    def generation(tab: _Tab, driving_kind: str, reference_path, driving_path, *rest) -> tuple[Any, int, dict[str, Any]]:
        """One run of a tab: the inputs checked as the command line checks them (a picture without a
        face is said before any model loads), the models for its settings, the result (the seed of a
        picture, a clip's `AnimateResult`), its seed and its settings."""
        *values, request, progress = rest
        if not reference_path or not driving_path:
            raise HellomemeError(f"upload a reference portrait and {driving_kind}")
        model_values, generation_values = tab.split(values)
        with cancellable(request) as (stop, folder):
            report = _reporter(progress, stop)
            suffix = output_suffix(generation_values.get("format"), generation_values.get("sticker")) if tab.mode == "video" else ".png"
            output = folder / f"{Path(reference_path).stem}_{Path(driving_path).stem}{suffix}"
            options = from_values(model_values).models
            prepared = api.prepare(tab.mode, reference_path, driving_path, output, options, cache=cache, **generation_values)
            pipe = models.get(tab.mode, model_values, report)
            done = prepared.execute(pipe, report)
        seed = done if tab.mode == "image" else done.seed
        return (output if tab.mode == "image" else done), seed, _shown_settings(model_values, generation_values, seed)

    def cancel_on(button: gr.Button, run: Any) -> None:
        """The Cancel button beside a Generate button: the running event stops at its next frame or step."""
        button.click(ask_to_cancel, None, None, cancels=[run], queue=False, api_name=button.elem_id.replace("-", "_"))

    with gr.Blocks(title="hellomeme", analytics_enabled=False) as demo:  # no usage reports to Gradio
        gr.Markdown("# hellomeme\nGive a portrait the head motion and expressions of a driving video (HelloMeme).")
        with gr.Tab("Video"):
            with gr.Row():
                with gr.Column():
                    reference = gr.Image(type="filepath", label="reference portrait", elem_id="video-reference")
                    driving = gr.Video(label="driving clip", sources=["upload"], include_audio=True, elem_id="video-driving")
                    with gr.Row():
                        generate = gr.Button("Generate", variant="primary", elem_id="video-generate")
                        video_cancel = gr.Button("Cancel", variant="stop", elem_id="video-cancel")
                        check = gr.Button("Check the driving clip", elem_id="video-check")
                    video_tab = _Tab("video", cache)
                with gr.Column():
                    preview = gr.Video(label="driving clip as tracked (crop, landmarks, pose, expression)", interactive=False, elem_id="video-preview")
                    result = gr.Video(label="result", interactive=False, elem_id="video-result")
                    result_picture = gr.Image(label="result as a picture (GIF, WebP)", type="filepath", interactive=False, elem_id="video-result-picture")
                    result_line = gr.Markdown(elem_id="video-result-line")
                    download = gr.File(label="download", interactive=False, elem_id="video-download")
                    used_seed = gr.Number(label="seed used", precision=0, interactive=False, elem_id="video-used-seed")
                    reuse = gr.Button("Reuse this seed", elem_id="video-reuse-seed")
                    shown = gr.JSON(label="settings of this result", elem_id="video-settings")

            def animate(reference_path, driving_path, *rest):
                """The /animate endpoint's four outputs (video, file, seed, settings with the result line), and
                for the page the GIF or WebP to show and that line (a state: not part of the API)."""
                done, seed, shown_settings = generation(video_tab, "a driving clip", reference_path, driving_path, *rest)
                output, picture = str(done.output), done.format in PICTURE_FORMATS
                line = f"{Path(output).name}: {done.description}"
                return None if picture else output, output, seed, {**shown_settings, "result": line}, (output if picture else None, line)

            shown_result = gr.State()
            animating = generate.click(
                _named(animate, ["reference", "driving", *video_tab.inputs]), [reference, driving, *video_tab.inputs.values()],
                [result, download, used_seed, shown, shown_result], api_name="animate", concurrency_id="generation",
                show_progress_on=result,
            )
            animating.success(lambda kept: kept, shown_result, [result_picture, result_line], api_name=False)
            cancel_on(video_cancel, animating)
            reuse.click(lambda seed: seed, used_seed, video_tab.inputs["seed"], api_name=False)

            @_one_line_errors
            def check_clip(driving_path, face_index, max_frames, smoothing, request, progress):
                if not driving_path:
                    raise HellomemeError("upload a driving clip")
                return str(_write_track_preview(Path(driving_path), run_folder(), cache, int(face_index or 0), max_frames, smoothing, _reporter(progress)))

            check.click(
                _named(check_clip, ["driving", "face_index", "max_frames", "smoothing"]),
                [driving, video_tab.inputs["face_index"], video_tab.inputs["max_frames"], video_tab.inputs["smoothing"]],
                preview, api_name="check_driving",
            )

        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column():
                    image_reference = gr.Image(type="filepath", label="reference portrait", elem_id="image-reference")
                    image_driving = gr.Image(type="filepath", label="driving picture (head pose and expression)", elem_id="image-driving")
                    with gr.Row():
                        image_generate = gr.Button("Generate", variant="primary", elem_id="image-generate")
                        image_cancel = gr.Button("Cancel", variant="stop", elem_id="image-cancel")
                    image_tab = _Tab("image", cache)
                with gr.Column():
                    image_result = gr.Image(label="result", type="filepath", interactive=False, elem_id="image-result")
                    image_seed = gr.Number(label="seed used", precision=0, interactive=False, elem_id="image-used-seed")
                    image_reuse = gr.Button("Reuse this seed", elem_id="image-reuse-seed")
                    image_shown = gr.JSON(label="settings of this result", elem_id="image-settings")

            def render(reference_path, driving_path, *rest):
                output, seed, shown_settings = generation(image_tab, "a driving picture", reference_path, driving_path, *rest)
                return str(output), seed, shown_settings

            rendering = image_generate.click(
                _named(render, ["reference", "driving", *image_tab.inputs]), [image_reference, image_driving, *image_tab.inputs.values()],
                [image_result, image_seed, image_shown], api_name="render_image", concurrency_id="generation", show_progress_on=image_result,
            )
            cancel_on(image_cancel, rendering)
            image_reuse.click(lambda seed: seed, image_seed, image_tab.inputs["seed"], api_name=False)

        with gr.Tab("Compare"):
            with gr.Row():
                with gr.Column():
                    compare_reference = gr.Image(type="filepath", label="reference portrait", elem_id="compare-reference")
                    compare_driving = gr.Video(label="driving clip", sources=["upload"], include_audio=True, elem_id="compare-driving")
                    compare_versions = gr.CheckboxGroup(list(version_names("video")), value=["v2", "v5"], label="versions", elem_id="compare-versions")
                    compare_checkpoints = gr.Dropdown(
                        _choices(next(s for s in all_settings() if s.name == "checkpoint"), "video", cache), value=[], multiselect=True,
                        allow_custom_value=True, label="checkpoints (none: each version's base)", elem_id="compare-checkpoints",
                    )
                    with gr.Row():
                        compare_run = gr.Button("Compare", variant="primary", elem_id="compare-run")
                        compare_cancel = gr.Button("Cancel", variant="stop", elem_id="compare-cancel")
                    compare_tab = _Tab("video", cache, groups=("generation",), leave_out=NOT_COMPARED)
                with gr.Column():
                    compare_video = gr.Video(label="side by side", interactive=False, elem_id="compare-video")
                    compare_sheet = gr.Image(label="contact sheet", type="filepath", interactive=False, elem_id="compare-sheet")
                    compare_table = gr.Markdown(elem_id="compare-table")

            @_one_line_errors
            def run_compare(reference_path, driving_path, versions, checkpoints, *rest):
                """The library's `compare` on the uploads, with the tab's generation settings."""
                *values, request, progress = rest
                if not reference_path or not driving_path or not versions:
                    raise HellomemeError("upload a reference portrait and a driving clip, and pick at least one version")
                from hellomeme_cli.quality.compare import Variant, compare, metrics_markdown

                _, generation_values = compare_tab.split(values)
                variants = [Variant(version, checkpoint) for version in versions for checkpoint in (checkpoints or [None])]
                with cancellable(request) as (stop, folder):
                    done = compare(Path(reference_path), Path(driving_path), variants, from_values(generation_values), folder, cache=cache, progress=_reporter(progress, stop))
                return str(done.side_by_side), str(done.contact_sheet), f"seed {done.seed}\n\n" + metrics_markdown(done.rows())

            comparing = compare_run.click(
                _named(run_compare, ["reference", "driving", "versions", "checkpoints", *compare_tab.inputs]),
                [compare_reference, compare_driving, compare_versions, compare_checkpoints, *compare_tab.inputs.values()],
                [compare_video, compare_sheet, compare_table], api_name="compare", concurrency_id="generation", show_progress_on=compare_video,
            )
            cancel_on(compare_cancel, comparing)

    demo.models = models  # the loaded pipelines, for a caller (tests) to inspect
    demo.output_root = output_root
    return demo.queue(default_concurrency_limit=1)


def _write_track_preview(
    driving: Path, folder: Path, cache: WeightCache, face_index: int, max_frames: float | None, smoothing: bool, progress: ProgressCallback
) -> Path:
    """The preview `hellomeme track --preview` writes: what the model will follow in the clip."""
    from hellomeme_cli.face.preview import write_preview
    from hellomeme_cli.face.tracking import Smoothing, default_model_path, track_video
    from hellomeme_cli.media.video import read_frames

    frames = None if max_frames in (None, "") else int(max_frames)
    track = track_video(driving, face_index=face_index, smoothing=Smoothing() if smoothing else None, max_frames=frames,
                        model_path=default_model_path(cache), progress=progress)
    output = folder / f"{driving.stem}_preview.mp4"
    return write_preview(track, read_frames(driving, len(track)), output, audio_from=driving, protect=[driving], progress=progress)


def launch(host: str = "127.0.0.1", port: int | None = None, share: bool = False, **options: Any) -> None:
    """Serve the page until interrupted: on 127.0.0.1 unless `host` or `share` says otherwise."""
    create_app().launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD, **options)
