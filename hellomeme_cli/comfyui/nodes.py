"""hellomeme's ComfyUI nodes: ids prefixed `HelloMeme`, in the `hellomeme` category, every setting
an input named as the setting is (inputs.py), every run through the library (api, pipeline).

Load pipeline -> HELLOMEME_PIPELINE (a handle: the networks are loaded by the first node that runs
on them, once its own inputs are checked, into one ModelCache, reused by every prompt with the same
model settings and listed in ComfyUI's model management, which lets them go on "Unload Models");
Driving motion (VIDEO, or IMAGE batch with its frame rate and AUDIO) or Load motion template ->
HELLOMEME_MOTION; Animate (pipeline, reference IMAGE, motion)
-> VIDEO with the driving clip's sound, its IMAGE batch, fps and AUDIO; Image -> IMAGE;
Evaluate -> the eval table (STRING) and its plot (IMAGE). Progress goes to ComfyUI's progress bar,
Cancel stops a run within one denoising step, bad input is ComfyUI's error as one line.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hellomeme_cli import api
from hellomeme_cli.comfyui import comfy
from hellomeme_cli.comfyui.inputs import input_types, setting_values
from hellomeme_cli.comfyui.values import LORAS, MOTION, PIPELINE, Motion, PipelineHandle, audio_file, audio_of, image_batch, pixels
from hellomeme_cli.errors import HellomemeError, first_line
from hellomeme_cli.face.driving import TEMPLATE_SUFFIX, load_template, save_template, track_clip, tracking_options
from hellomeme_cli.face.preview import preview_frames
from hellomeme_cli.face.tracking import MODEL_COMPONENT, MODEL_FILE
from hellomeme_cli.front_end import FIXED_CHOICES, ModelCache, checkpoint_choices, lora_choices
from hellomeme_cli.media.video import AudioTrack, read_frames, read_image, write_image, write_video
from hellomeme_cli.model_options import check_options
from hellomeme_cli.pipeline import animate as animate_clip, generate, load_reference, run_components
from hellomeme_cli.progress import ProgressCallback
from hellomeme_cli.quality.identity import COMPONENT as IDENTITY_COMPONENT
from hellomeme_cli.quality.plot import plot
from hellomeme_cli.settings import CAPTIONS, CLIP_ONLY, CLIP_OUTPUT, AnimateSettings, Setting, all_settings, from_values
from hellomeme_cli.versions import VERSIONS, get_version
from hellomeme_cli.weights.cache import WeightCache

CATEGORY = "hellomeme"
PIPELINES_KEPT = 3  # two versions side by side and a picture pipeline; ComfyUI's "Unload Models" lets all go
PREVIEW_SIZE = 256  # the tracked clip's preview frames: a batch of every frame is held in memory
MODES = ("video", "image")
# The settings of each node: what loads (Load pipeline), what tracks (Driving motion), what generates.
MODEL_SETTINGS = tuple(s.name for s in all_settings() if s.group == "models" and s.name not in ("device", "loras"))
TRACKING = ("face_index", "max_frames", "smoothing", "smooth_pose", "smooth_expression")
# How a file is written (format, sticker, size, loop, captions) is left to ComfyUI's own nodes: ours give frames.
WRITTEN = (*CLIP_OUTPUT, *CAPTIONS)
ANIMATE_SETTINGS = tuple(s.name for s in all_settings() if s.group == "generation" and s.name not in (*TRACKING, *WRITTEN))
IMAGE_SETTINGS = tuple(s.name for s in all_settings() if s.group == "generation" and s.name not in (*CLIP_ONLY, *WRITTEN))

_log = logging.getLogger(__name__)
_pipelines: ModelCache | None = None


def pipelines() -> ModelCache:
    """The loaded pipelines every node shares, in hellomeme's weight cache (HELLOMEME_HOME, the
    Hugging Face cache), each listed in ComfyUI's model management while held."""
    global _pipelines
    if _pipelines is None:
        _pipelines = ModelCache(WeightCache(), size=PIPELINES_KEPT, on_change=lambda: comfy.register(_pipelines))
    return _pipelines


def _loaded(mode: str, values: dict[str, Any], progress: ProgressCallback) -> Any:
    """The pipeline of these model settings: the one held, else loaded now (and said in ComfyUI's console)."""
    cache = pipelines()
    if cache.key(mode, values) not in cache.keys():
        _log.info("hellomeme: loading HelloMeme %s for %s on %s", values["version"], mode, values["device"])
    return cache.get(mode, values, progress)


def _one_line(run: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input as ComfyUI's error in one line: the HellomemeError raised again from the node, its
    first line only, without the library's frames below it."""

    @functools.wraps(run)
    def node_function(*args: Any, **kwargs: Any) -> Any:
        try:
            return run(*args, **kwargs)
        except HellomemeError as error:
            raise HellomemeError(first_line(error)) from None

    return node_function


def _choices(setting: Setting) -> list | None:
    """The values a list input offers: ComfyUI's own model folders before hellomeme's cache."""
    folders = comfy.folder_paths()
    if setting.name == "version":
        return list(VERSIONS)
    if setting.name == "checkpoint":
        return [*folders.get_filename_list("checkpoints"), *checkpoint_choices(pipelines().cache)]
    if setting.name == "vae":
        return list(folders.get_filename_list("vae"))
    return list(FIXED_CHOICES[setting.name]) if setting.name in FIXED_CHOICES else None


def _model_file(folder: str, name: str | None) -> str | None:
    """A file of ComfyUI's models/<folder> as its path; anything else (a preset, a repo id, a path) as given."""
    if name is None:
        return None
    return comfy.folder_paths().get_full_path(folder, name) or name


def _weights(names: Sequence[str], progress: comfy.NodeProgress) -> dict[str, Path]:
    """The components' folders, fetching (with progress, Cancel heeded) what hellomeme's cache lacks."""
    cache = pipelines().cache
    try:
        return cache.require(names)
    except HellomemeError:
        try:
            progress.wait(lambda: cache.fetch(names, progress))
        except HellomemeError as error:
            raise HellomemeError(
                f"missing weights ({', '.join(names)}) and cannot fetch them: {first_line(error)}; run `hellomeme weights fetch "
                f"{' '.join(names)}` where Hugging Face is reachable, or copy them over and run `hellomeme weights import DIR`"
            ) from None
        return cache.require(names)


def _face_model(progress: comfy.NodeProgress) -> Path:
    return _weights([MODEL_COMPONENT], progress)[MODEL_COMPONENT] / MODEL_FILE


def _scratch() -> Path:
    """A new folder in ComfyUI's temp folder (which ComfyUI empties when it starts)."""
    folder = Path(comfy.folder_paths().get_temp_directory()) / "hellomeme"
    folder.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=folder))


class HelloMemeLoadPipeline:
    """Every network of a HelloMeme version on ComfyUI's device: its options checked and its weights
    fetched now, the networks loaded when a node first runs on them (after that node's inputs are
    checked: a picture without a face costs no loading) and kept for later prompts."""

    CATEGORY = CATEGORY
    DESCRIPTION = (
        "A HelloMeme version (v1..v5c) for clips (video) or pictures (image) on ComfyUI's device, from hellomeme's weight cache "
        "(missing parts are fetched). Loaded when Animate or Image first runs on it; prompts with the same settings reuse it; "
        "ComfyUI's Unload Models lets it go."
    )
    RETURN_TYPES = (PIPELINE,)
    RETURN_NAMES = ("pipeline",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        mode = (list(MODES), {"default": "video", "tooltip": "video: Animate and Image; image: Image only, without the motion modules (v5c is image only)."})
        loras = (LORAS, {"tooltip": "LoRAs from HelloMeme LoRA nodes."})
        return {"required": {"mode": mode, **input_types(MODEL_SETTINGS, _choices)}, "optional": {"loras": loras}}

    @classmethod
    def VALIDATE_INPUTS(cls, checkpoint: str) -> bool | str:
        """A checkpoint outside the list (a Hugging Face repo id, a path) is taken too, from an API-format prompt."""
        return True

    @_one_line
    def load(self, mode: str, loras: Sequence[tuple[Path, float]] = (), **given: Any) -> tuple[PipelineHandle]:
        progress = comfy.NodeProgress()
        values = setting_values(MODEL_SETTINGS, given)
        values.update(checkpoint=_model_file("checkpoints", values["checkpoint"]), vae=_model_file("vae", values["vae"]))
        values.update(loras=list(loras), device=str(comfy.torch_device()))
        options = from_values(values).models
        version = get_version(options.version, mode)
        check_options(options)
        _weights(version.components(options.control_kind.name, mode), progress)
        return (PipelineHandle(mode, values),)


class HelloMemeLoRA:
    """One LoRA for Load pipeline; chain several."""

    CATEGORY = CATEGORY
    DESCRIPTION = "A LoRA (models/loras, or a preset name) with its strength, for Load pipeline's loras; chain several."
    RETURN_TYPES = (LORAS,)
    RETURN_NAMES = ("loras",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        setting = next(s for s in all_settings() if s.name == "loras")
        names = [*comfy.folder_paths().get_filename_list("loras"), *lora_choices(pipelines().cache)]
        return {
            "required": {
                "lora": (names, {"tooltip": setting.help}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "round": 0.001, "tooltip": "The LoRA's scale (FILE:SCALE)."}),
            },
            "optional": {"loras": (LORAS, {"tooltip": "LoRAs before this one."})},
        }

    def add(self, lora: str, strength: float, loras: Sequence[tuple[Path, float]] = ()) -> tuple[tuple[tuple[Path, float], ...]]:
        return ((*loras, (Path(_model_file("loras", lora)), float(strength))),)


class HelloMemeDrivingMotion:
    """A driving clip tracked: what Animate follows, and a preview of it."""

    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Tracks the face of a driving clip: a VIDEO (LoadVideo), or an IMAGE batch at its frame rate with an optional AUDIO. "
        "Gives the motion Animate follows (with the clip's sound) and a preview of what is followed."
    )
    RETURN_TYPES = (MOTION, "IMAGE")
    RETURN_NAMES = ("driving", "preview")
    FUNCTION = "track"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": input_types(TRACKING, _choices),
            "optional": {
                "video": ("VIDEO", {"tooltip": "The driving clip (its sound goes with the motion)."}),
                "images": ("IMAGE", {"tooltip": "Or the driving clip as an IMAGE batch."}),
                "frame_rate": ("FLOAT", {"default": 25.0, "min": 0.01, "max": 240.0, "step": 0.01, "round": 0.001, "tooltip": "The IMAGE batch's frames per second."}),
                "audio": ("AUDIO", {"tooltip": "The IMAGE batch's sound (with a VIDEO: in place of its own)."}),
            },
        }

    @_one_line
    def track(self, video: Any = None, images: Any = None, frame_rate: float = 25.0, audio: dict | None = None, **given: Any) -> tuple[Motion, Any]:
        if (video is None) == (images is None):
            raise HellomemeError("driving motion: connect a VIDEO or an IMAGE batch (one of them)")
        progress = comfy.NodeProgress()
        settings = from_values(setting_values(TRACKING, given))
        options = tracking_options(settings, _face_model(progress), progress)
        clip = comfy.video_file(video) if video is not None else None
        if clip is not None:
            template = track_clip(clip, **options)
            shown = read_frames(clip, len(template))
        else:
            if video is not None:
                components = video.get_components()
                images, frame_rate, audio = components.images, components.frame_rate, audio or components.audio
            shown = pixels(images)
            template = track_clip(shown, fps=float(frame_rate), **options)
        motion = Motion(template, clip, None if clip is not None else images)
        if audio is not None:
            template.audio = AudioTrack(audio_file(audio, motion.folder / "audio.wav"))
        return motion, image_batch(list(preview_frames(template.track, shown, PREVIEW_SIZE)))


class HelloMemeLoadMotionTemplate:
    """A motion template (`hellomeme track`'s .npz) as a driving motion."""

    CATEGORY = CATEGORY
    DESCRIPTION = "A motion template (.npz from `hellomeme track` or HelloMeme Save motion template) in ComfyUI's input or output folder; silent unless given an AUDIO."
    RETURN_TYPES = (MOTION,)
    RETURN_NAMES = ("driving",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {"template": (_templates(), {"tooltip": "A .npz in the input folder, or in the output folder ([output])."})},
            "optional": {"audio": ("AUDIO", {"tooltip": "Sound for the clips made from it."})},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, template: str) -> bool | str:
        """A template saved since the list was made is taken too."""
        return True if comfy.folder_paths().exists_annotated_filepath(template) else f"no such motion template: {template}"

    @classmethod
    def IS_CHANGED(cls, template: str, audio: dict | None = None) -> float:
        return os.path.getmtime(comfy.folder_paths().get_annotated_filepath(template))

    @_one_line
    def load(self, template: str, audio: dict | None = None) -> tuple[Motion]:
        motion = Motion(load_template(Path(comfy.folder_paths().get_annotated_filepath(template))))
        if audio is not None:
            motion.template.audio = AudioTrack(audio_file(audio, motion.folder / "audio.wav"))
        return (motion,)


def _templates() -> list[str]:
    """The motion templates ComfyUI can name: in its input folder, and in its output folder annotated `[output]`."""
    folders = comfy.folder_paths()
    found = []
    for root, annotation in ((folders.get_input_directory(), ""), (folders.get_output_directory(), " [output]")):
        for path in sorted(Path(root).rglob(f"*{TEMPLATE_SUFFIX}")):
            found.append(f"{path.relative_to(root).as_posix()}{annotation}")
    return found


class HelloMemeSaveMotionTemplate:
    """A driving motion saved as a motion template, to drive later runs without the clip."""

    CATEGORY = CATEGORY
    DESCRIPTION = "Saves a driving motion as a motion template (.npz, as `hellomeme track` writes) in ComfyUI's output folder."
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"driving": (MOTION, {}), "filename_prefix": ("STRING", {"default": "hellomeme/motion"})}}

    @_one_line
    def save(self, driving: Motion, filename_prefix: str) -> dict:
        folders = comfy.folder_paths()
        folder, name, counter, subfolder, _ = folders.get_save_image_path(filename_prefix, folders.get_output_directory())
        path = save_template(driving.template, Path(folder) / f"{name}_{counter:05}_{TEMPLATE_SUFFIX}")
        return {"ui": {"text": [str(path)]}, "result": (str(path),)}


class HelloMemeAnimate:
    """The reference portrait with the driving motion: a clip with the driving clip's sound."""

    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Gives the reference portrait the driving motion's head motion and expressions. Gives the clip as a VIDEO with the driving "
        "clip's sound in sync (for SaveVideo), and its frames, frame rate and sound for other nodes."
    )
    RETURN_TYPES = ("VIDEO", "IMAGE", "FLOAT", "AUDIO")
    RETURN_NAMES = ("video", "images", "fps", "audio")
    FUNCTION = "animate"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        inputs = {"pipeline": (PIPELINE, {}), "reference": ("IMAGE", {"tooltip": "The portrait to animate."}), "driving": (MOTION, {})}
        return {"required": {**inputs, **input_types(ANIMATE_SETTINGS, _choices)}}

    @_one_line
    def animate(self, pipeline: PipelineHandle, reference: Any, driving: Motion, **given: Any) -> tuple:
        progress = comfy.NodeProgress()
        settings = from_values(setting_values(ANIMATE_SETTINGS, given), AnimateSettings(models=from_values(pipeline.values).models))
        if pipeline.mode != "video":
            raise HellomemeError("pipeline: loaded for pictures (mode image), which make no clips: load it with mode video")
        folders = _weights(run_components(settings, "video"), progress)
        portrait = load_reference(pixels(reference)[0], settings, folders[MODEL_COMPONENT] / MODEL_FILE)  # no face: said before any loading
        pipe = _loaded(pipeline.mode, pipeline.values, progress)
        output, frames = _scratch() / f"hellomeme_{settings.models.version}.mp4", []
        made = animate_clip(portrait, driving.template.borrowed(), output, settings, pipe, progress=progress, on_step=progress.on_step, each_frame=frames.append)
        return comfy.video_from_file(output), image_batch(frames), made.fps, audio_of(output)


class HelloMemeImage:
    """The reference portrait with the head pose and expression of a driving picture."""

    CATEGORY = CATEGORY
    DESCRIPTION = "Gives the reference portrait the head pose and expression of the driving picture (the official image pipeline)."
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "render"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        inputs = {
            "pipeline": (PIPELINE, {}),
            "reference": ("IMAGE", {"tooltip": "The portrait to change."}),
            "driving": ("IMAGE", {"tooltip": "The picture whose head pose and expression it takes."}),
        }
        return {"required": {**inputs, **input_types(IMAGE_SETTINGS, _choices)}}

    @_one_line
    def render(self, pipeline: PipelineHandle, reference: Any, driving: Any, **given: Any) -> tuple:
        progress = comfy.NodeProgress()
        settings = from_values(setting_values(IMAGE_SETTINGS, given), AnimateSettings(models=from_values(pipeline.values).models))
        folders = _weights(run_components(settings, "image"), progress)
        portrait = load_reference(pixels(reference)[0], settings, folders[MODEL_COMPONENT] / MODEL_FILE)
        pipe = _loaded(pipeline.mode, pipeline.values, progress)
        made = generate(portrait, pixels(driving)[0], settings, pipe, progress=progress, on_step=progress.on_step)
        return (image_batch([next(made.frames)]),)


class HelloMemeEvaluate:
    """A made clip's numbers (`hellomeme eval`) and their plot (`eval --plot`)."""

    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Scores a made clip against its driving motion and reference portrait (docs/eval.md): pose, expression, identity, "
        "flicker, window seams, sound. Gives the table as text and the per-frame curves as an image."
    )
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("table", "plot")
    FUNCTION = "evaluate"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {"driving": (MOTION, {}), "reference": ("IMAGE", {"tooltip": "The portrait it was made from."})},
            "optional": {
                "video": ("VIDEO", {"tooltip": "The made clip (Animate's video: its metadata names the run's settings)."}),
                "images": ("IMAGE", {"tooltip": "Or the made clip as an IMAGE batch."}),
                "frame_rate": ("FLOAT", {"default": 25.0, "min": 0.01, "max": 240.0, "step": 0.01, "round": 0.001, "tooltip": "The IMAGE batch's frames per second."}),
            },
        }

    @_one_line
    def evaluate(self, driving: Motion, reference: Any, video: Any = None, images: Any = None, frame_rate: float = 25.0) -> tuple[str, Any]:
        if (video is None) == (images is None):
            raise HellomemeError("evaluate: connect the made clip as a VIDEO or an IMAGE batch (one of them)")
        progress = comfy.NodeProgress()
        _weights([MODEL_COMPONENT, IDENTITY_COMPONENT], progress)
        folder = _scratch()
        made = comfy.video_file(video) if video is not None else None
        if made is None:
            if video is not None:
                components = video.get_components()
                images, frame_rate = components.images, components.frame_rate
            made = write_video(pixels(images), folder / "made.mp4", frame_rate)
        portrait = write_image(pixels(reference)[0], folder / "reference.png")
        evaluation = api.evaluate(made, driving.clip_file(), portrait, cache=pipelines().cache, progress=progress)
        picture = read_image(plot(evaluation, made, folder / "plot.png"))
        return evaluation_table(evaluation.summary, evaluation.notes), image_batch([picture])


def evaluation_table(summary: dict, notes: dict[str, str]) -> str:
    """The summary as a Markdown table, then what was not measured."""
    rows = ["| metric | value |", "| --- | ---: |"]
    rows += [f"| {name} | {'-' if value is None else f'{value:.4g}' if isinstance(value, float) else value} |" for name, value in summary.items()]
    return "\n".join([*rows, "", *(f"not measured: {name}: {why}" for name, why in notes.items())])


NODES = (
    HelloMemeLoadPipeline, HelloMemeLoRA, HelloMemeDrivingMotion, HelloMemeLoadMotionTemplate, HelloMemeSaveMotionTemplate,
    HelloMemeAnimate, HelloMemeImage, HelloMemeEvaluate,
)
NODE_CLASS_MAPPINGS = {node.__name__: node for node in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HelloMemeLoadPipeline": "HelloMeme Load pipeline",
    "HelloMemeLoRA": "HelloMeme LoRA",
    "HelloMemeDrivingMotion": "HelloMeme Driving motion",
    "HelloMemeLoadMotionTemplate": "HelloMeme Load motion template",
    "HelloMemeSaveMotionTemplate": "HelloMeme Save motion template",
    "HelloMemeAnimate": "HelloMeme Animate",
    "HelloMemeImage": "HelloMeme Image",
    "HelloMemeEvaluate": "HelloMeme Evaluate",
}
