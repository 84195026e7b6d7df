"""The library entry points: load a pipeline once, then make videos and pictures with it.

    import hellomeme_cli as hm
    pipe = hm.load_pipeline(device="cuda")  # v2, the official app's video default
    result = hm.animate(pipe, "ref.jpg", "drive.mp4", "out.mp4", seed=1)

Settings are the command line's (settings.py), by their names; the ones that choose networks
(version, control, checkpoint, ...) are given to `load_pipeline`, the others to each call.
Nothing here prints: pass `progress=` a callback to follow the stages.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hellomeme_cli.engine import HelloMemePipeline
from hellomeme_cli.engine import load_pipeline as engine_load_pipeline
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.logs import libraries_quiet
from hellomeme_cli.pipeline import AnimateResult, PreparedRun, Reference, prepare_run
from hellomeme_cli.progress import ProgressCallback, no_progress
from hellomeme_cli.quality.evaluate import Evaluation
from hellomeme_cli.quality.evaluate import evaluate as score
from hellomeme_cli.settings import AnimateSettings, ModelOptions, from_values
from hellomeme_cli.versions import DEFAULT_VERSIONS
from hellomeme_cli.weights.cache import WeightCache

_MODEL_SETTINGS = {field.name for field in dataclasses.fields(ModelOptions)}


def load_pipeline(
    version: str | None = None,
    *,
    mode: str = "video",
    cache: WeightCache | None = None,
    progress: ProgressCallback = no_progress,
    **options: Any,
) -> HelloMemePipeline:
    """Every network of `version` (default: the official app's for `mode`, v2 for "video", v5 for
    "image") loaded once onto `device` (`auto`: a CUDA GPU, else MPS, else the CPU). A "video"
    pipeline serves `animate` and `render_image`; an "image" one only `render_image`, without the
    motion modules (and v5c exists only as that). `options` are the model settings: control,
    checkpoint, vae, lora (list of FILE[:SCALE]), few_step, device, dtype, channels_last, compile, low_memory.
    Raises HellomemeError when weights are missing (`hellomeme weights fetch`)."""
    unknown = sorted(set(options) - _MODEL_SETTINGS - {"lora"})
    if unknown:
        raise HellomemeError(f"load_pipeline: unknown option(s) {', '.join(unknown)} (model options: {', '.join(sorted(_MODEL_SETTINGS))})")
    if "lora" in options:
        options["loras"] = options.pop("lora")
    options["version"] = version or DEFAULT_VERSIONS[mode]
    settings = from_values(options)
    with libraries_quiet():
        return engine_load_pipeline(settings.models.version, settings.models, cache or WeightCache(), progress, mode=mode)


def animate(
    pipe: HelloMemePipeline,
    reference: str | Path,
    driving: str | Path,
    output: str | Path,
    *,
    force: bool = False,
    progress: ProgressCallback = no_progress,
    **settings: Any,
) -> AnimateResult:
    """Give the portrait `reference` the motion of `driving` and write `output` in the format its
    suffix names: .mp4 (with the clip's audio), .gif, .webp or .webm. `settings` are the generation
    settings by name (seed, steps, guidance, fps, max_frames, trans_ratio, prompt, ...; and how it is
    written: format, sticker, max_kb, quality, loop, caption, caption_bottom, caption_font); the
    result names the seed used and says what was written (`description`)."""
    return prepare("video", reference, driving, output, pipe.options, force=force, cache=pipe.cache, **settings).execute(pipe, progress)


# Alike in shape only to `animate`: the library's two entry points take the same kinds of argument.
def render_image(
    pipe: HelloMemePipeline,
    reference: str | Path,
    driving_image: str | Path,
    output: str | Path,
    *,
    force: bool = False,
    progress: ProgressCallback = no_progress,
    **settings: Any,
) -> int:
    """One picture: `reference` with the head pose and expression of `driving_image`, written to
    `output`; returns the seed used."""
    return prepare("image", reference, driving_image, output, pipe.options, force=force, cache=pipe.cache, **settings).execute(pipe, progress)


def prepare(
    mode: str,
    reference: str | Path,
    driving: str | Path,
    output: str | Path,
    models: ModelOptions,
    *,
    force: bool = False,
    cache: WeightCache | None = None,
    **settings: Any,
) -> PreparedRun:
    """A run checked before any model loads (paths, settings, weights, the reference's face), for
    models loaded with the options `models`: `.execute(pipe)` it on them. A caller that loads models
    itself (the app) says bad input before a load."""
    model_values = sorted(set(settings) & (_MODEL_SETTINGS | {"lora"}))
    if model_values:
        raise HellomemeError(f"{', '.join(model_values)}: model settings are chosen by load_pipeline, not per call")
    chosen = from_values(settings, AnimateSettings(models=models))
    return prepare_run(Path(reference), Path(driving), Path(output), chosen, mode=mode, force=force, cache=cache)


def evaluate(
    output: str | Path,
    driving: str | Path,
    reference: str | Path,
    *,
    self_reenactment: bool = False,
    windows: tuple[tuple[int, int], ...] | None = None,
    cache: WeightCache | None = None,
    progress: ProgressCallback = no_progress,
) -> Evaluation:
    """The numbers of a made clip against its driving clip and reference portrait (docs/eval.md):
    `.summary` (one value per metric), `.frames` (per frame), `.to_json()`. Needs no pipeline: the
    face tracker and the identity model (weights component `sface`) are all it loads."""
    return score(Path(output), Path(driving), Path(reference), self_reenactment=self_reenactment, windows=windows, cache=cache, progress=progress)


__all__ = ["AnimateResult", "Evaluation", "PreparedRun", "Reference", "animate", "evaluate", "load_pipeline", "prepare", "render_image"]
