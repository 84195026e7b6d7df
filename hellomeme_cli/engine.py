"""The models stage: every network a run needs, loaded once from the weight cache (plus a
user's checkpoint, VAE and LoRAs) onto one device, as a diffusers `DiffusionPipeline`, so a
batch of clips reuses them. What to load comes from the version registry (versions.py).

Checkpoint swapping follows the official "x1" recipe (`append_pipline_weights`): the
HelloMeme modules were trained against SD1.5, so the reference net, its text encoder and
the reference-image VAE encoder stay base SD1.5; LoRAs go into the stage-1 and stage-2
UNets and the prompt's text encoder; a swapped checkpoint replaces the stage-2 (motion)
UNet, and its VAE (or `--vae`) decodes the frames. With none of these, one SD1.5 UNet
serves the reference net and both stages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, MotionAdapter
from diffusers.hooks import apply_group_offloading
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.face.driving import DrivingInput, is_template, track_clip, tracking_options
from hellomeme_cli.face.tracking import MODEL_FILE
from hellomeme_cli.media.upscale import COMPONENT as UPSCALER_COMPONENT, Upscaler, load_upscaler
from hellomeme_cli.model_options import resolve_checkpoint, resolve_device, resolve_dtype, resolve_loras
from hellomeme_cli.models import FanEncoder, motion_unet
from hellomeme_cli.models.unet import load_folder
from hellomeme_cli.pipeline import VIDEO_SUFFIXES, AnimateSettings, generate, load_reference
from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress
from hellomeme_cli.samplers.common import DenoisingStep, Sampler
from hellomeme_cli.settings import ModelOptions, from_values
from hellomeme_cli.versions import ControlKind, Version, get_version, resolve
from hellomeme_cli.weights.cache import WeightCache
from hellomeme_cli.weights.checkpoints import load_sd15, load_vae


PROMPTS_KEPT = 16  # text embeddings kept by a pipeline (77 x 768 values each)


@dataclasses.dataclass
class HelloMemePipelineOutput(BaseOutput):
    """What a pipeline call returns. `frames` holds one video, as diffusers' video pipelines do:
    `frames[0]` is a list of PIL images ("pil"), or an array (1, F, H, W, 3) float32 in [0, 1]
    ("np"), or the latents (1, 4, F, h, w) divided by the VAE's scaling factor ("latent"); F is 1
    for a picture. `seed`: the seed of the generator the noise came from."""

    frames: Any
    seed: int


DRIVING_FRAMES_FPS = 25.0  # the rate of driving frames given as a list, unless `fps` says otherwise


@dataclasses.dataclass
class PromptEmbeddings:
    """(1, 77, C) each: the reference net's (base text encoder) and the denoisers' (LoRAs applied)."""

    reference: torch.Tensor
    reference_negative: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor


class HelloMemePipeline(DiffusionPipeline):
    """Every network of one HelloMeme version, registered as diffusers pipeline components
    (`components`, `.to()`, diffusers' offloading hooks work on them). Roles may share
    networks: with no swap the reference net and both denoisers run one SD1.5 UNet, and the
    two text encoders and two VAEs are one each (v5's two denoisers are one network, its motion
    modules used or not). `denoiser_motion` is None for image runs, `image_encoder`/`fan_encoder`
    when the control kind does not use them, `control_proj` for v1-v3; `image_scheduler`
    (default: `scheduler`) is the image runs' where it differs from the video's (v3, v4).

    Not registered (they are no networks): `face_model` (the MediaPipe file), `control_kind`
    (the registry's `ControlKind`), `version` (the registry entry)."""

    # Order in which the networks run, for diffusers' `enable_model_cpu_offload`.
    model_cpu_offload_seq = (
        "reference_text_encoder->text_encoder->image_encoder->vae_encoder->reference_net->control_net->control_proj"
        "->denoiser_2d->denoiser_motion->vae_decoder"
    )
    _optional_components = ["denoiser_motion", "image_encoder", "fan_encoder", "control_proj", "image_scheduler"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        reference_text_encoder: CLIPTextModel,
        text_encoder: CLIPTextModel,
        reference_net: torch.nn.Module,
        denoiser_2d: torch.nn.Module,
        control_net: torch.nn.Module,
        vae_encoder: AutoencoderKL,
        vae_decoder: AutoencoderKL,
        scheduler: SchedulerMixin,
        denoiser_motion: torch.nn.Module | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        fan_encoder: FanEncoder | None = None,
        control_proj: torch.nn.Module | None = None,
        image_scheduler: SchedulerMixin | None = None,
        *,
        face_model: Path | None = None,
        control_kind: ControlKind | None = None,
        version: Version | None = None,
        options: ModelOptions | None = None,
        cache: WeightCache | None = None,
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            reference_text_encoder=reference_text_encoder,
            text_encoder=text_encoder,
            reference_net=reference_net,
            denoiser_2d=denoiser_2d,
            denoiser_motion=denoiser_motion,
            control_net=control_net,
            control_proj=control_proj,
            vae_encoder=vae_encoder,
            vae_decoder=vae_decoder,
            image_encoder=image_encoder,
            fan_encoder=fan_encoder,
            scheduler=scheduler,
            image_scheduler=image_scheduler,
        )
        self.version = version or get_version("v1")
        self.control_kind = control_kind or self.version.control()
        self.face_model = face_model
        self.options = options or ModelOptions(version=self.version.name, control=self.control_kind.name)  # what was asked for: equal options reuse the pipeline
        self.cache = cache or WeightCache()  # where the weights came from
        self._onload_device: torch.device | None = None  # set by `enable_low_memory`
        self._prompt_embeddings: dict[tuple[int, str], torch.Tensor] = {}  # `encode_prompt`'s, oldest first
        self._upscaler: Upscaler | None = None  # loaded by `upscaler` when a run first asks for it

    @property
    def control(self) -> str:
        return self.control_kind.name

    @torch.no_grad()
    def __call__(
        self,
        reference_image: str | Path | PIL.Image.Image | np.ndarray,
        driving: str | Path | PIL.Image.Image | np.ndarray | Sequence[PIL.Image.Image | np.ndarray],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[HelloMemePipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        **settings: Any,
    ) -> HelloMemePipelineOutput | tuple:
        """The reference portrait with the driving input's head motion and expressions, in memory.

        `driving`: a clip (a path), a motion template (`hellomeme track`'s .npz), a list of frames
        (PIL images or RGB uint8 arrays, `fps` apart: 25 unless `fps=` says), or one picture (a PIL
        image, an array or an image file: the official image pipeline, one frame). `height` and
        `width` are the working size (square, a multiple of 64; default 512). `generator`: a CPU
        `torch.Generator` (the noise is drawn on the CPU, so a seed gives the same frames on any
        device); without one a seed is chosen. Every other generation setting by its name
        (`prompt`, `negative_prompt`, `trans_ratio`, `pose`, `motion`, `fps`, `max_frames`,
        `window`, `overlap`, `upscale`, `paste_back`, ...: docs/usage.md). `callback_on_step_end(pipe,
        step, timestep, {"latents": ...})` is called after every denoising step, the step counted
        across the sampler's stages, and may return replaced latents. No audio: `hm.animate` writes
        the mp4 with the clip's sound. Returns `HelloMemePipelineOutput` (or `(frames, seed)`).

            pipe = hm.load_pipeline()
            video = pipe("ref.jpg", "drive.mp4", generator=torch.Generator().manual_seed(1)).frames[0]
        """
        # 1. Check the inputs: the settings on this pipeline's model options, the output type, the callback.
        is_picture = _is_picture(driving) or (self.denoiser_motion is None and isinstance(driving, (str, Path)) and is_template(Path(driving)))
        if self.denoiser_motion is None and not is_picture:
            raise HellomemeError("this pipeline was loaded for pictures (mode='image'): load_pipeline(mode='video') makes clips")
        run = self._call_settings(settings, num_inference_steps, guidance_scale, height, width, generator, is_picture)
        if output_type not in ("pil", "np", "latent"):
            raise HellomemeError(f"output_type must be pil, np or latent (got {output_type!r})")
        unknown = sorted(set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs))
        if unknown:
            raise HellomemeError(f"callback_on_step_end_tensor_inputs: {', '.join(unknown)} (the pipeline gives {self._callback_tensor_inputs})")
        generator = generator or torch.Generator().manual_seed(run.seed)
        on_step = None if callback_on_step_end is None else _step_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 2. The reference picture and its face.
        reference = load_reference(_path_or_pixels(reference_image), run, self.face_model)

        # 3 and 4. The driving signals, the version's sampler, the frames (decoded as they are taken).
        with _ProgressBars(self) as progress:
            source = _path_or_pixels(driving) if is_picture else DrivingInput(self._driving_clip(driving, run, progress))
            made = generate(reference, source, run, self, progress=progress, generator=generator, on_step=on_step)

            # 5. The output type (the frames are decoded only for pil and np).
            if output_type == "latent":
                output = made.latents
            elif output_type == "np":
                output = (np.stack(list(made.frames)).astype(np.float32) / 255)[None]
            else:
                output = [[PIL.Image.fromarray(frame) for frame in made.frames]]
        return HelloMemePipelineOutput(frames=output, seed=generator.initial_seed()) if return_dict else (output, generator.initial_seed())

    def _call_settings(self, values: dict[str, Any], steps, guidance, height, width, generator, is_picture: bool) -> AnimateSettings:
        """The call's settings by name, with diffusers' names for steps, guidance and size."""
        model_values = sorted(set(values) & {field.name for field in dataclasses.fields(ModelOptions)})
        if model_values:
            raise HellomemeError(f"{', '.join(model_values)}: model settings are chosen by load_pipeline, not per call")
        if height is not None and width is not None and height != width:
            raise HellomemeError(f"HelloMeme works on square frames: height {height} and width {width} differ")
        named = {"steps": steps, "guidance": guidance, "size": height or width, "seed": generator.initial_seed() if generator else None}
        values = {**{name: value for name, value in named.items() if value is not None}, **values}
        if is_picture:
            values.pop("fps", None)
        return from_values(values, AnimateSettings(models=self.options)).with_seed()

    def _driving_clip(self, driving, settings: AnimateSettings, progress: ProgressCallback):
        """A path as it is (a clip or a template file); frames tracked now, `fps` apart."""
        if isinstance(driving, (str, Path)):
            return Path(driving)
        frames = [_rgb(frame) for frame in driving]
        return track_clip(frames, fps=settings.fps or DRIVING_FRAMES_FPS, **tracking_options(settings, self.face_model, progress))

    @property
    def device(self) -> torch.device:
        """Where the networks compute, also while low-memory mode keeps their weights on the CPU."""
        return self._onload_device or self.denoiser_2d.unet.device

    @property
    def low_memory(self) -> bool:
        """Whether the run trades speed for memory (`--low-memory`): the samplers keep less between steps too."""
        return self.options.low_memory

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser_2d.unet.dtype

    @torch.no_grad()
    def encode_prompt(self, prompt: str = "", negative_prompt: str = "", mode: str = "video") -> PromptEmbeddings:
        """The user's prompt goes before the version's own for `mode` (the official scripts' prompt)."""
        own = self.version.prompt_for(mode)
        text = f"{prompt}, {own}" if prompt else own

        def encode(encoder: CLIPTextModel, value: str) -> torch.Tensor:
            # Kept per (encoder, text): the reference and denoising encoders are one network unless a LoRA
            # styles the latter, and a batch's clips share their prompts.
            key = (id(encoder), value)
            if key not in self._prompt_embeddings:
                if len(self._prompt_embeddings) >= PROMPTS_KEPT:
                    self._prompt_embeddings.pop(next(iter(self._prompt_embeddings)))
                ids = self.tokenizer(
                    [value], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
                ).input_ids
                self._prompt_embeddings[key] = encoder(ids.to(self.device))[0]
            return self._prompt_embeddings[key]

        return PromptEmbeddings(
            reference=encode(self.reference_text_encoder, text),
            reference_negative=encode(self.reference_text_encoder, negative_prompt),
            positive=encode(self.text_encoder, text),
            negative=encode(self.text_encoder, negative_prompt),
        )

    def sampler(self, scheduler: str | None = None) -> Sampler:
        """The version's sampler on these networks and schedulers; `scheduler` (`--scheduler`) in
        place of the version's own."""
        sampler = resolve(self.version.sampler).from_pipeline(self)
        if scheduler:
            sampler.use_scheduler(scheduler)
        return sampler

    def upscaler(self) -> Upscaler:
        """The official app's Real-ESRGAN x2 (`--upscale 2`) on this pipeline's device and dtype,
        loaded on first use and kept for the next clips."""
        if self._upscaler is None:
            folder = self.cache.require([UPSCALER_COMPONENT])[UPSCALER_COMPONENT]
            self._upscaler = load_upscaler(folder, self.device, self.dtype)
        return self._upscaler

    def enable_low_memory(self, device: torch.device) -> None:
        """diffusers' group offloading, block by block: the weights stay on the CPU (pinned, on
        CUDA) and each block (UNet down/mid/up block, adapter and control-net attention block,
        VAE and text/image encoder stage) comes to `device` only while it runs, the next one
        copied on a side CUDA stream meanwhile. The PD-FGC encoder (8.5 M values) stays on `device`."""
        for network in self.networks():
            if network is self.fan_encoder:
                network.to(device)
                continue
            apply_group_offloading(
                network,
                onload_device=device,
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=device.type == "cuda",
                block_modules=_OFFLOAD_BLOCKS.get(type(network)),
            )
        self._onload_device = device

    def networks(self) -> list[torch.nn.Module]:
        """Every network once (a UNet, VAE or adapter often serves several roles); the reference
        net and the denoisers count as their UNets and reference adapters."""
        roles = [self.reference_text_encoder, self.text_encoder, self.image_encoder, self.fan_encoder, self.control_net]
        roles += [self.control_proj, self.vae_encoder, self.vae_decoder]
        for denoiser in (self.reference_net, self.denoiser_2d, self.denoiser_motion):
            if denoiser is not None:
                roles += [denoiser.unet, getattr(denoiser, "reference_adapter", None), getattr(denoiser, "motion_adapter", None)]
        return _unique(roles)


def _is_picture(driving) -> bool:
    """One picture (a PIL image, an (H, W, 3) array, an image file), not a clip, template or frame list."""
    if isinstance(driving, (str, Path)):
        return not (is_template(Path(driving)) or Path(driving).suffix.lower() in VIDEO_SUFFIXES)
    return isinstance(driving, PIL.Image.Image) or (isinstance(driving, np.ndarray) and driving.ndim == 3)


def _rgb(picture: PIL.Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of a PIL image or an array."""
    pixels = np.asarray(picture.convert("RGB")) if isinstance(picture, PIL.Image.Image) else np.asarray(picture)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise HellomemeError(f"a picture must be RGB uint8 (H, W, 3), got {pixels.dtype} {pixels.shape}")
    return pixels


def _path_or_pixels(picture) -> Path | np.ndarray:
    return Path(picture) if isinstance(picture, (str, Path)) else _rgb(picture)


def _step_callback(pipe: HelloMemePipeline, callback: Callable, names: Sequence[str]):
    """diffusers' `callback_on_step_end` as the samplers' `on_step`: one step count across stages."""
    steps = iter(range(1 << 62))

    def on_step(step: DenoisingStep) -> torch.Tensor | None:
        given = callback(pipe, next(steps), step.timestep, {name: step.latents for name in names})
        return (given or {}).get("latents")

    return on_step


class _ProgressBars:
    """The library's progress events as diffusers' tqdm bars (`set_progress_bar_config` applies), one per task."""

    def __init__(self, pipe: DiffusionPipeline):
        self.pipe, self.bars = pipe, {}

    def __call__(self, event: ProgressEvent) -> None:
        if event.task not in self.bars:
            self.bars[event.task] = self.pipe.progress_bar(total=event.total)
            self.bars[event.task].set_description(event.task)
        bar = self.bars[event.task]
        bar.total = event.total
        bar.update(event.completed - bar.n)

    def __enter__(self) -> _ProgressBars:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for bar in self.bars.values():
            bar.close()


# transformers' CLIP models: their transformer layers are offloaded one by one (diffusers'
# models name their own blocks in `_group_offload_block_modules`).
_OFFLOAD_BLOCKS = {CLIPTextModel: ["encoder"], CLIPVisionModelWithProjection: ["vision_model", "encoder"]}


def load_pipeline(
    version: Version | str,
    options: ModelOptions,
    cache: WeightCache | None = None,
    progress: ProgressCallback = no_progress,
    *,
    mode: str = "video",
) -> HelloMemePipeline:
    """Check the cache holds everything the version needs for `mode` (before any loading),
    then load every network; image runs load no motion module."""
    version = get_version(version, mode) if isinstance(version, str) else version
    kind = version.control(options.control)
    cache = cache or WeightCache()
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    folders = cache.require(version.components(kind.name, mode))
    checkpoint = resolve_checkpoint(options.checkpoint, cache, progress) if options.checkpoint else None
    loras = resolve_loras(options.all_loras, cache, progress)
    steps = ["SD1.5", "LoRAs" if loras else None, "checkpoint" if checkpoint else None, "HelloMeme modules"]
    steps = [step for step in steps if step]
    # Low-memory mode: every network waits on the CPU, the offloading hooks bring it over block by block.
    load_device = torch.device("cpu") if options.low_memory else device
    base_folder = folders[version.base_component]

    def loaded(step: str) -> None:
        progress(ProgressEvent("loading models", steps.index(step) + 1, len(steps), unit="parts"))

    def sd15(**swaps):
        return load_sd15(base_folder, dtype=dtype, device=load_device, **swaps)

    base = sd15()
    loaded("SD1.5")
    styled = sd15(loras=loras) if loras else base
    if loras:
        loaded("LoRAs")
    if checkpoint:
        stage2 = sd15(checkpoint=checkpoint, vae=options.vae, loras=loras)
        loaded("checkpoint")
    else:
        stage2 = styled
    vae_decoder = stage2.vae
    if options.vae and not checkpoint:
        vae_decoder = load_vae(Path(options.vae), base_folder, dtype).to(load_device).eval()

    def component(target: str, name: str):
        return _load_component(resolve(target), folders[name], dtype, name).to(load_device).eval()

    # The networks of the version, on the UNets of the x1 recipe (module docstring).
    adapter = component(version.reference_adapter, version.reference_component)
    denoiser = resolve(version.denoiser)
    denoiser_motion = None
    if mode == "video":
        motion_net = stage2.unet
        if version.motion_component:
            animatediff = _load_component(MotionAdapter, folders[version.motion_component], dtype, version.motion_component)
            motion_net = motion_unet(stage2.unet, animatediff).eval()
        motion_modules = [component(version.motion_adapter, version.motion_adapter_component)] if version.motion_adapter else []
        denoiser_motion = denoiser(motion_net, adapter, *motion_modules)
        denoiser_2d = denoiser(styled.unet, adapter) if version.base_first_pass else denoiser_motion
    else:
        denoiser_2d = denoiser(stage2.unet, adapter)  # official image pipelines: every step on the checkpoint's UNet
    encoder = component(_ENCODERS[kind.encoder], kind.encoder_component)
    pipeline = HelloMemePipeline(
        tokenizer=base.tokenizer,
        reference_text_encoder=base.text_encoder,
        text_encoder=styled.text_encoder,
        reference_net=resolve(version.reference_net)(base.unet),
        denoiser_2d=denoiser_2d,
        denoiser_motion=denoiser_motion,
        control_net=component(kind.control_net, kind.control_component),
        control_proj=component(kind.control_proj, kind.control_proj_component) if kind.control_proj else None,
        vae_encoder=base.vae,
        vae_decoder=vae_decoder,
        image_encoder=encoder if kind.encoder == "face_parts" else None,
        fan_encoder=encoder if kind.encoder == "pdfgc" else None,
        scheduler=_scheduler(version, "video"),
        image_scheduler=_scheduler(version, "image"),
        face_model=folders["face_landmarker"] / MODEL_FILE,
        control_kind=kind,
        version=version,
        options=options,
        cache=cache,
    )
    loaded("HelloMeme modules")
    apply_speed_options(pipeline, options, device)
    return pipeline


# The signal encoder of each `ControlKind.encoder`.
_ENCODERS = {"face_parts": "transformers:CLIPVisionModelWithProjection", "pdfgc": "hellomeme_cli.models:FanEncoder"}


def _scheduler(version: Version, mode: str) -> SchedulerMixin:
    """The version's scheduler for `mode`, on the official noise schedule (not the checkpoint's config)."""
    spec = version.schedulers[mode]
    return resolve(spec.cls).from_config(dict(spec.config))


def _load_component(cls, folder: Path, dtype: torch.dtype, name: str):
    """Weights component `name` from its folder, every tensor matched (else one line naming it)."""
    try:
        return load_folder(cls, folder, dtype=dtype)
    except (OSError, ValueError) as err:
        raise HellomemeError(f"weights component {name}: cannot load {cls.__name__} from {folder}: {err}") from err


def apply_speed_options(pipeline: HelloMemePipeline, options: ModelOptions, device: torch.device | None = None) -> None:
    """The options that change how the networks run, never what they compute (beyond rounding);
    `device` is where low-memory mode runs the networks (default: where they are)."""
    if options.channels_last:
        for network in _convolution_networks(pipeline):
            network.to(memory_format=torch.channels_last)
    if options.low_memory:
        pipeline.enable_low_memory(device or pipeline.device)
    if options.compile:
        compile_blocks(pipeline)


def _unique(modules) -> list[torch.nn.Module]:
    """Each module once (a UNet, VAE or adapter often serves several roles)."""
    return list({id(module): module for module in modules if module is not None}.values())


def _convolution_networks(pipeline: HelloMemePipeline) -> list[torch.nn.Module]:
    unets = [d.unet for d in (pipeline.reference_net, pipeline.denoiser_2d, pipeline.denoiser_motion) if d is not None]
    return _unique([*unets, pipeline.control_net, pipeline.control_proj, pipeline.vae_encoder, pipeline.vae_decoder])


def compile_blocks(pipeline: HelloMemePipeline, **compile_options) -> int:
    """Regional compilation: every transformer and resnet block of the UNets and VAEs is compiled
    in place (`nn.Module.compile`), so the HelloMeme hooks on the UNets' down/up blocks stay in
    eager code and one compiled graph serves every block of a shape. Returns how many were compiled."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    blocks = _unique(
        module
        for network in _convolution_networks(pipeline)
        for module in network.modules()
        if isinstance(module, (BasicTransformerBlock, ResnetBlock2D))
    )
    for block in blocks:
        block.compile(**compile_options)
    return len(blocks)
