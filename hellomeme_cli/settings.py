"""Every generation setting, declared once: name, type, default, help and check.

The command-line options of animate, image and batch, the batch CSV columns, the resume digest
and the options table of docs/usage.md are all made from these declarations. Defaults that
belong to a HelloMeme version (steps, guidance, windows, control) are None here and filled from
the version's registry entry (`resolved`), so a version can change them without touching this file.
This module imports no torch: the command line reads it to build its options.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.media.formats import DEFAULT_QUALITY, FORMATS, STICKERS, parse_loop
from hellomeme_cli.versions import DEFAULT_IMAGE_VERSION, DEFAULT_VIDEO_VERSION, FEW_STEP, SCHEDULERS, VERSIONS, FewStep, get_version

DTYPES = ("auto", "float32", "float16", "bfloat16")
# How far a run with its networks in half precision may end from float32 (relative error of the final
# latents), as docs/performance.md ("Half precision") decides: videos within 3e-2, and within 5e-2 at
# guidance 2.5 and up, where bfloat16's rounding measured 3e-2 to 3.6e-2 on v3-v5b; pictures within 5e-2.
# float16 is held to the same bounds (it ends within 5e-3).
HALF_PRECISION_BOUNDS = {"video": 3e-2, "guided video": 5e-2, "image": 5e-2}
GUIDED_FROM = 2.5


def half_precision_bound(mode: str, guidance: float) -> float:
    """The bound above for a video or picture (`mode`) made at `guidance`."""
    return HALF_PRECISION_BOUNDS["guided video" if mode == "video" and guidance >= GUIDED_FROM else mode]
UPSCALE_CHOICES = (1, 2)  # --upscale: 1 is off, 2 the official app's Real-ESRGAN x2
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One declared setting, as the command line, the batch CSV and the docs see it."""

    name: str
    default: Any
    help: str
    cli_type: Any  # the type typer parses the option as
    flags: tuple[str, ...]  # option names; `--x/--no-x` for switches
    parse: Callable[[Any], Any]  # command-line or CSV value -> the setting's value
    check: Callable[[Any], str | None] | None  # the value -> what is wrong with it, or None
    shown_default: str  # the default as the docs and --help say it
    per_clip: bool  # may differ per batch CSV row
    in_digest: bool  # changes what is generated (so a finished batch clip made otherwise is redone)
    group: str  # "models" (which networks load) or "generation"
    panel: str  # the --help panel it is listed in (PANELS)
    metavar: str | None  # what --help shows for its value (None: a switch, which takes none)

    @property
    def range(self) -> Range | None:
        """Its allowed numbers, where its check says them."""
        return self.check if isinstance(self.check, Range) else None

    @property
    def column(self) -> str:
        """Its name as a batch CSV column: the option's, without dashes (`--no-smooth` -> smooth)."""
        return self.flags[0].split("/")[0].removeprefix("--").replace("-", "_")


# The --help panels, in the order of the data flow; every setting is in one.
INPUT_OUTPUT, MODEL, SAMPLING, MOTION, MEME, SPEED = "Input and output", "Model", "Sampling", "Motion", "Meme output", "Speed and memory"
PANELS = (INPUT_OUTPUT, MODEL, SAMPLING, MOTION, MEME, SPEED)
# What --help shows for a value, by the type parsed (a setting may name its own).
_METAVARS = {"int": "N", "float": "X", "str": "TEXT", "Path": "FILE"}


def _setting(
    default: Any,
    help: str,
    *,
    panel: str,
    metavar: str | None = None,
    cli_type: Any = None,
    flags: tuple[str, ...] = (),
    parse: Callable[[Any], Any] | None = None,
    check: Callable[[Any], str | None] | None = None,
    shown: str | None = None,
    per_clip: bool = True,
    in_digest: bool = True,
) -> Any:
    """A dataclass field carrying its declaration (read back by `settings`)."""
    meta = dict(help=help, panel=panel, metavar=metavar, cli_type=cli_type, flags=flags, parse=parse, check=check, shown=shown, per_clip=per_clip, in_digest=in_digest)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Range:
    """A number setting's check that says its range too, for front ends whose number inputs take one
    (ComfyUI's widgets): from `low` (excluded when `open_low`) to `high` (None: no limit), in
    multiples of `step` where one is given."""

    option: str
    low: float
    high: float | None = None
    open_low: bool = False
    step: int | None = None

    def __call__(self, value: Any) -> str | None:
        if value is None:
            return None
        if self.step is not None:
            inside = value >= self.low and value % self.step == 0
            return None if inside else f"--{self.option} must be a multiple of {self.step}, at least {self.low:g} (got {value})"
        if self.high is None:
            return None if value >= self.low else f"--{self.option} must be at least {self.low:g} (got {value})"
        inside = (self.low < value if self.open_low else self.low <= value) and value <= self.high and math.isfinite(value)
        return None if inside else f"--{self.option} must be in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}] (got {value})"


def _at_least(low: float, option: str) -> Range:
    return Range(option, low)


def _within(low: float, high: float, option: str, *, open_low: bool = False) -> Range:
    return Range(option, low, high, open_low)


def _one_of(choices: tuple[Any, ...], option: str) -> Callable[[Any], str | None]:
    return lambda value: None if value is None or value in choices else f"--{option} must be one of {', '.join(map(str, choices))} (got {value!r})"


# Settings that only a clip has: a picture has one frame, so no frame rate, windows or smoothing over time.
CLIP_ONLY = ("fps", "max_frames", "window", "overlap", "smoothing", "smooth_pose", "smooth_expression")
POSES = ("absolute", "relative")
# How a clip is written rather than made (media/formats.py): a picture has none but the captions,
# and `compare`, which writes each variant as an mp4 to score it, takes none of them.
CLIP_OUTPUT = ("format", "sticker", "max_kb", "quality", "loop")
CAPTIONS = ("caption", "caption_bottom", "caption_font")
MOTIONS = ("all", "pose", "expression")


def _by_version(name: str) -> str:
    """A version default as the docs and --help show it, e.g. "the version's (v1: 2; v2, v3: 1.5)"."""
    groups: dict[str, list[str]] = {}
    for version in VERSIONS.values():
        value = getattr(version.defaults, name)
        shown = "fixed" if name in version.defaults.fixed else (f"{value:g}" if isinstance(value, float) else str(value))
        groups.setdefault(shown, []).append(version.name)
    if len(groups) == 1:
        return f"the version's ({next(iter(groups))})"
    return "the version's (" + "; ".join(f"{', '.join(names)}: {shown}" for shown, names in groups.items()) + ")"


def _known_version(value: str | None) -> str | None:
    if value is None or value in VERSIONS:
        return None
    return f"--version must be one of {', '.join(VERSIONS)} (got {value!r})"


def _known_control(value: str | None) -> str | None:
    controls = sorted({name for version in VERSIONS.values() for name in version.controls})
    return _one_of(tuple(controls), "control")(value)


def _seed(value: int | None) -> str | None:
    return None if value is None or 0 <= value < 2**32 else f"--seed must be in [0, 2^32) (got {value})"


def _caption(option: str) -> Callable[[Any], str | None]:
    return lambda value: None if value is None or value.strip() else f"--{option} is empty (leave it out for no caption)"


def _loop_text(value: Any) -> str:
    """`crossfade 4`, `crossfade=4` as `crossfade:4`; `crossfade` as its 8 frames."""
    return str(parse_loop(value))


def _loop(value: str) -> str | None:
    try:
        parse_loop(value)
    except HellomemeError as error:
        return str(error)
    return None


def _stickers_help() -> str:
    return "; ".join(
        f"{sticker.name}: {sticker.format}, {sticker.side} px{' square' if sticker.square else ''}, "
        f"{sticker.max_seconds:g} s{f', {sticker.max_rate} fps' if sticker.max_rate else ''}, {sticker.max_kb} KB"
        for sticker in STICKERS.values()
    )


def _known_few_step(value: str | None) -> str | None:
    if value is None or value in FEW_STEP:
        return None
    return f"unknown --few-step recipe {value!r} (use {', '.join(FEW_STEP)})"


def _known_scheduler(value: str | None) -> str | None:
    """A short name, or what can only be a diffusers class name (the class is looked up on loading)."""
    if value is None or value in SCHEDULERS or (value.isidentifier() and value.endswith("Scheduler")):
        return None
    return f"unknown --scheduler {value!r} (use {', '.join(SCHEDULERS)} or a diffusers scheduler class name)"


def _optional_path(value: Any) -> Path | None:
    return None if value in (None, "") else Path(value).expanduser()


def parse_lora(value: str) -> tuple[Path, float]:
    """`FILE` or `FILE:SCALE` (scale 1 when not given)."""
    path, separator, scale = str(value).rpartition(":")
    if separator and path and not scale.startswith(("\\", "/")):
        try:
            return Path(path).expanduser(), float(scale)
        except ValueError:
            pass
    return Path(value).expanduser(), 1.0


def _loras(values: Any) -> tuple[tuple[Path, float], ...]:
    """A list from the command line, or a CSV cell with `;` between LoRAs."""
    if isinstance(values, str):
        values = [part for part in values.split(";") if part.strip()]
    return tuple(value if isinstance(value, tuple) else parse_lora(value.strip()) for value in values or ())


def _check(instance: Any) -> None:
    for field in dataclasses.fields(instance):
        check = field.metadata.get("check")
        problem = check(getattr(instance, field.name)) if check else None
        if problem:
            raise HellomemeError(problem)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """What to load: the version, the control signal, the base-model swaps, and how to run it.
    Two runs with equal options share loaded models (batch, app)."""

    version: str = _setting(
        DEFAULT_VIDEO_VERSION, "HelloMeme version (docs/versions.md).", cli_type=str, check=_known_version,
        shown=f"{DEFAULT_VIDEO_VERSION} (image: {DEFAULT_IMAGE_VERSION})", panel=MODEL, metavar="VERSION")
    control: str | None = _setting(
        None, "Expression signal: blendshapes (ARKit + face parts) or pdfgc (PD-FGC motion).", cli_type=str,
        check=_known_control, shown=_by_version("control"), panel=MODEL, metavar="SIGNAL")
    checkpoint: str | None = _setting(
        None, "SD1.5-family checkpoint: a .safetensors/.ckpt file, a diffusers folder, a preset name (hellomeme weights presets) or a Hugging Face repo id.",
        cli_type=str, shown="SD1.5", panel=MODEL, metavar="MODEL")
    vae: Path | None = _setting(
        None, "Replacement VAE for decoding (file or diffusers folder).", cli_type=Path, parse=_optional_path,
        shown="the checkpoint's", panel=MODEL, metavar="FILE")
    loras: tuple[tuple[Path, float], ...] = _setting(
        (), "LoRA file or preset name (hellomeme weights presets), FILE or FILE:SCALE; repeat for several (CSV: separated by ;).", cli_type=list[str],
        flags=("--lora",), parse=_loras, shown="none", panel=MODEL, metavar="FILE[:SCALE]")
    few_step: str | None = _setting(
        None, f"Few-step recipe: a distillation LoRA with its scheduler, steps and guidance ({', '.join(FEW_STEP)}); unproven on HelloMeme (docs/performance.md).",
        cli_type=str, check=_known_few_step, shown="off", panel=MODEL, metavar="RECIPE")
    device: str = _setting("auto", "auto, cpu, cuda, cuda:N or mps.", cli_type=str, per_clip=False, in_digest=False, panel=SPEED, metavar="DEVICE")
    dtype: str = _setting(
        "auto", "auto (float16 on GPUs, float32 on CPUs), float32, float16 or bfloat16 (error and speed: docs/performance.md; bfloat16 on a CPU is ~10x slower unless `hellomeme info` says native).", cli_type=str,
        check=_one_of(DTYPES, "dtype"), panel=SPEED, metavar="DTYPE")
    channels_last: bool = _setting(
        False, "Channels-last memory format (faster convolutions on recent GPUs).", flags=("--channels-last",),
        per_clip=False, in_digest=False, panel=SPEED)
    compile: bool = _setting(
        False, "torch.compile the network blocks (slow first clip, faster after).", flags=("--compile",),
        per_clip=False, in_digest=False, panel=SPEED)
    low_memory: bool = _setting(
        False, "Keep networks on the CPU, each block on the GPU only while it runs (8-12 GB cards).",
        flags=("--low-memory",), per_clip=False, in_digest=False, panel=SPEED)

    def __post_init__(self) -> None:
        _check(self)
        self.spec.control(self.control)

    @property
    def spec(self):
        """The registry entry of this version."""
        return VERSIONS[self.version]

    @property
    def control_kind(self):
        return self.spec.control(self.control)

    @property
    def recipe(self) -> FewStep | None:
        """The --few-step recipe, if one was asked for."""
        return FEW_STEP[self.few_step] if self.few_step else None

    @property
    def all_loras(self) -> tuple[tuple[Path | str, float], ...]:
        """The LoRAs to fuse: the user's, then the few-step recipe's (a preset name)."""
        recipe = self.recipe
        return self.loras + (((recipe.lora, recipe.lora_scale),) if recipe else ())


@dataclasses.dataclass(frozen=True)
class AnimateSettings:
    """Everything a run depends on besides its inputs; None means the version's default."""

    models: ModelOptions = ModelOptions()
    steps: int | None = _setting(None, "Denoising steps.", check=_at_least(1, "steps"), shown=_by_version("steps"), panel=SAMPLING)
    guidance: float | None = _setting(
        None, "Classifier-free guidance scale (1 turns it off).", check=_at_least(1, "guidance"), shown=_by_version("guidance"), panel=SAMPLING, metavar="SCALE")
    scheduler: str | None = _setting(
        None, f"Noise scheduler: {', '.join(SCHEDULERS)} or a diffusers scheduler class name.", check=_known_scheduler,
        shown="the version's (official)", panel=SAMPLING, metavar="NAME")
    seed: int | None = _setting(None, "Random seed (default: a new one, printed and stored in the output).", check=_seed, shown="random", panel=SAMPLING)
    fps: float | None = _setting(None, "Output frame rate (default: the driving clip's).", check=_within(0, 240, "fps", open_low=True), shown="the clip's", panel=INPUT_OUTPUT, metavar="FPS")
    max_frames: int | None = _setting(None, "Use only the first N frames of the driving clip.", check=_at_least(1, "max-frames"), shown="all", panel=INPUT_OUTPUT)
    trans_ratio: float = _setting(0.0, "How much of the driving head's movement across the frame to follow (0..1).", check=_within(0, 1, "trans-ratio"), panel=MOTION, metavar="0..1")
    pose: str = _setting(
        "absolute", "Head pose: absolute (the driver's) or relative (the driver's turn since its first frame, on the reference's own pose).",
        check=_one_of(POSES, "pose"), panel=MOTION, metavar="MODE")
    motion: str = _setting(
        "all", "Which motion to take: all, pose (keep the reference's expression) or expression (keep its head pose).",
        check=_one_of(MOTIONS, "motion"), panel=MOTION, metavar="WHICH")
    expression_scale: float = _setting(
        1.0, "How far the expression moves from the clip's first frame (0: frozen, 2: doubled).", check=_within(0, 5, "expression-scale"), panel=MOTION)
    prompt: str = _setting("", "Extra prompt, put before the version's portrait prompt.", shown="empty", panel=SAMPLING)
    negative_prompt: str = _setting("", "Negative prompt.", shown="empty", panel=SAMPLING)
    window: int | None = _setting(None, "Frames per motion-module window.", check=_at_least(2, "window"), shown=_by_version("window"), panel=SAMPLING)
    overlap: int | None = _setting(None, "Frames shared by neighbouring windows.", check=_at_least(0, "overlap"), shown=_by_version("overlap"), panel=SAMPLING)
    crop: bool = _setting(True, "Crop the reference and the clip around the face (--no-crop: whole frames).", flags=("--crop/--no-crop",), panel=INPUT_OUTPUT)
    face_index: int = _setting(0, "Which face of the driving clip to follow (0: the largest).", check=_at_least(0, "face-index"), panel=MOTION)
    smoothing: bool = _setting(True, "Smooth the driving motion over time (--no-smooth: both strengths 0).", flags=("--smooth/--no-smooth",), panel=MOTION)
    smooth_pose: float = _setting(1.0, "Head-pose smoothing strength (0: none, 1: default, more: steadier).", check=_within(0, 10, "smooth-pose"), panel=MOTION)
    smooth_expression: float = _setting(
        1.0, "Expression (landmarks, blendshapes) smoothing strength (0: none, 1: default, more: steadier).", check=_within(0, 10, "smooth-expression"), panel=MOTION)
    size: int = _setting(512, "Working size in pixels (multiple of 64); the released weights are trained at 512.", check=Range("size", 128, step=64), panel=INPUT_OUTPUT, metavar="PX")
    paste_back: bool = _setting(False, "Blend the generated face back into the whole reference picture, at its full size.", flags=("--paste-back",), panel=INPUT_OUTPUT)
    upscale: int = _setting(
        1, "Enlarge the generated frames 2x with the official app's Real-ESRGAN x2 (1: off); with --paste-back before blending.",
        check=_one_of(UPSCALE_CHOICES, "upscale"), shown="1 (off)", panel=INPUT_OUTPUT, metavar="1|2")
    format: str | None = _setting(
        None, f"Output format: {', '.join(FORMATS)} (GIF and WebP have no sound, said in the result line); -o's suffix says it too.",
        check=_one_of(tuple(FORMATS), "format"), shown="the output's suffix, else mp4", panel=MEME, metavar="FORMAT",
    )
    sticker: str | None = _setting(
        None, f"A sticker within a platform's limits ({_stickers_help()}, no sound); longer clips are cut.",
        check=_one_of(tuple(STICKERS), "sticker"), shown="off", panel=MEME, metavar="PLATFORM",
    )
    max_kb: int | None = _setting(
        None, "Make the file fit in N KB (1024 bytes): fewer colours or lower quality, then smaller frames, then fewer; else it fails naming the smallest size reached.",
        check=_at_least(1, "max-kb"), shown="no limit", panel=MEME, metavar="KB",
    )
    quality: int | None = _setting(
        None, "Quality of .webp (libwebp's) and .webm (VP9 CRF 60 - 0.4 x Q) outputs, 1 to 100; with --max-kb, where the tries start.",
        check=_within(1, 100, "quality"), shown=str(DEFAULT_QUALITY), panel=MEME, metavar="Q",
    )
    loop: str = _setting(
        "off", "Loop without a jump: pingpong (forward then back, audio left out) or crossfade:N (the last N frames blended into the first, audio too; crossfade alone: 8).",
        parse=_loop_text, check=_loop, panel=MEME, metavar="LOOP",
    )
    caption: str | None = _setting(
        None, "Text drawn at the top of every frame (and of a picture), meme style: white condensed bold with a black outline, wrapped and shrunk to fit.",
        check=_caption("caption"), shown="none", panel=MEME,
    )
    caption_bottom: str | None = _setting(None, "Text drawn at the bottom of every frame, as --caption.", check=_caption("caption-bottom"), shown="none", panel=MEME)
    caption_font: Path | None = _setting(
        None, "A .ttf or .otf font for the captions (for scripts Anton and DejaVu Sans Bold lack: CJK, ...).",
        cli_type=Path, parse=_optional_path, shown="Anton, DejaVu Sans Bold for what it lacks", panel=MEME,
    )

    def __post_init__(self) -> None:
        _check(self)
        spec = self.models.spec
        for name, reason in spec.defaults.fixed.items():
            if getattr(self, name) is not None:
                raise HellomemeError(f"--{name.replace('_', '-')} does not apply to HelloMeme {spec.name}: {reason}")
        if self.motion == "expression" and (self.pose == "relative" or self.trans_ratio):
            raise HellomemeError("--motion expression keeps the reference's head pose: --pose relative and --trans-ratio do not apply")
        if self.motion == "pose" and self.expression_scale != 1.0:
            raise HellomemeError("--motion pose keeps the reference's expression: --expression-scale does not apply")
        window, overlap = self.resolved("window"), self.resolved("overlap")
        if not 0 <= overlap < window:
            raise HellomemeError(f"--overlap must be in [0, window) = [0, {window}) (got {overlap})")
        if self.sticker and self.format and STICKERS[self.sticker].format != self.format:
            sticker = STICKERS[self.sticker]
            raise HellomemeError(f"--sticker {sticker.name} makes {FORMATS[sticker.format].label} ({sticker.format}), not --format {self.format}")
        if self.quality is not None and self.format and not FORMATS[self.format].quality:
            raise HellomemeError(f"--quality applies to webp and webm outputs, not --format {self.format}")
        self.check_captions()

    def check_captions(self) -> None:
        """Each caption's characters are in the caption fonts (read only when there is a caption)."""
        if self.caption or self.caption_bottom:
            from hellomeme_cli.media.captions import check_caption

            for option, text in (("--caption", self.caption), ("--caption-bottom", self.caption_bottom)):
                if text:
                    check_caption(text, self.caption_font, option)

    def resolved(self, name: str) -> Any:
        """The value of a setting; where it was left None, the --few-step recipe's, else the version's
        default (None for the scheduler: the version's own)."""
        value = getattr(self, name, None)
        if value is not None:
            return value
        recipe = self.models.recipe
        if recipe and name in recipe.defaults:
            return recipe.defaults[name]
        return getattr(self.models.spec.defaults, name, None)

    def with_seed(self) -> "AnimateSettings":
        """The same settings with a seed chosen now if none was given, so it can be reported."""
        return self if self.seed is not None else dataclasses.replace(self, seed=secrets.randbelow(2**32))


def all_settings() -> Iterator[Setting]:
    """Every declared setting: the model options first, then the generation settings."""
    for owner in (ModelOptions, AnimateSettings):
        for field in dataclasses.fields(owner):
            if not field.metadata:
                continue
            meta = field.metadata
            cli_type = meta["cli_type"] or (field.type if not isinstance(field.type, str) else _TYPES[field.type])
            default = field.default
            flags = meta["flags"] or (f"--{field.name.replace('_', '-')}",)
            shown = meta["shown"] or (("on" if default else "off") if isinstance(default, bool) else str(default))
            yield Setting(
                name=field.name, default=default, help=meta["help"], cli_type=cli_type, flags=flags,
                parse=meta["parse"] or (lambda value: value), check=meta["check"], shown_default=shown,
                per_clip=meta["per_clip"], in_digest=meta["in_digest"], group="models" if owner is ModelOptions else "generation",
                panel=meta["panel"], metavar=None if cli_type is bool else meta["metavar"] or _METAVARS[_base_type(cli_type).__name__],
            )


def _base_type(kind: Any) -> type:
    """`int` of `int | None`, `str` of `list[str]`: the type of one value."""
    arguments = [argument for argument in typing.get_args(kind) if argument is not type(None)]
    return _base_type(arguments[0]) if arguments else kind


# The annotations as strings (from __future__), to the types the command line parses.
_TYPES = {"int | None": int | None, "float | None": float | None, "str | None": str | None, "int": int, "float": float, "str": str, "bool": bool}


def from_values(values: Mapping[str, Any], base: AnimateSettings | None = None) -> AnimateSettings:
    """Settings from `{setting name: value}` (command line or CSV, already typed), other settings
    as in `base`; each value goes through its setting's parser and check."""
    base = base or AnimateSettings()
    declared = {setting.name: setting for setting in all_settings()}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise HellomemeError(f"unknown setting(s) {', '.join(unknown)}")
    parsed = {name: declared[name].parse(value) for name, value in values.items()}
    model_names = {field.name for field in dataclasses.fields(ModelOptions)}
    models = dataclasses.replace(base.models, **{k: v for k, v in parsed.items() if k in model_names})
    return dataclasses.replace(base, models=models, **{k: v for k, v in parsed.items() if k not in model_names})


def flat_values(settings_: AnimateSettings) -> dict[str, Any]:
    """`{setting name: value}` of every declared setting (the inverse of `from_values`)."""
    values = {field.name: getattr(settings_.models, field.name) for field in dataclasses.fields(ModelOptions)}
    values.update({field.name: getattr(settings_, field.name) for field in dataclasses.fields(AnimateSettings) if field.metadata})
    return values


def digest_values(settings_: AnimateSettings) -> dict[str, Any]:
    """What of the settings changes the output: every setting declared `in_digest`, as given
    (version defaults resolved, so a default that later changes redoes the clip)."""
    values = flat_values(settings_)
    result = {}
    for setting in all_settings():
        if setting.in_digest:
            value = values[setting.name]
            if setting.group == "generation" and value is None and setting.name in _VERSION_DEFAULTS:
                value = settings_.resolved(setting.name)
            result[setting.name] = value
    result["control"] = settings_.models.control_kind.name
    return result


_VERSION_DEFAULTS = {field.name for field in dataclasses.fields(get_version(DEFAULT_VIDEO_VERSION).defaults)}


def parse_cell(setting: Setting, text: str) -> Any:
    """A batch CSV cell as the setting's value ("" is never passed here: blank keeps the default)."""
    kind = setting.cli_type
    try:
        if kind in (int, int | None):
            return int(text)
        if kind in (float, float | None):
            return float(text)
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return lowered in ("1", "true", "yes", "on")
    except ValueError:
        kinds = {int: "whole number", int | None: "whole number", bool: "yes/no value"}
        raise HellomemeError(f"{setting.name} {text!r} is not a {kinds.get(kind, 'number')}") from None
    return text


def options_markdown() -> str:
    """The options tables of docs/usage.md, one per --help panel (a test checks the page holds them as made here)."""
    parts = []
    for panel in PANELS:
        rows = [f"**{panel}**", "", "| option | default | meaning |", "|---|---|---|"]
        rows += [f"| `{', '.join(setting.flags)}` | {setting.shown_default} | {setting.help} |" for setting in all_settings() if setting.panel == panel]
        parts.append("\n".join(rows))
    return "\n\n".join(parts)
