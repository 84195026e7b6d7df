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
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, MotionAdapter
from diffusers.hooks import apply_group_offloading
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from hellomeme_cli.weights.checkpoints import PICKLE_SUFFIXES, load_sd15, load_vae
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.models import FanEncoder, motion_unet
from hellomeme_cli.models.unet import load_folder
from hellomeme_cli.weights.presets import checkpoint_preset, fetch_preset, lora_preset
from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress
from hellomeme_cli.samplers.two_stage import VideoSampler
from hellomeme_cli.settings import ModelOptions
from hellomeme_cli.face.tracking import MODEL_FILE
from hellomeme_cli.media.upscale import COMPONENT as UPSCALER_COMPONENT, Upscaler, load_upscaler
from hellomeme_cli.versions import ControlKind, Version, get_version, resolve
from hellomeme_cli.weights.cache import WeightCache

WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CHECKPOINT_PATTERNS = ["model_index.json", "*/*.json", "tokenizer/*.txt", "unet/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors"]


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
        self._upscaler: Upscaler | None = None  # loaded by `upscaler` when a run first asks for it

    @property
    def control(self) -> str:
        return self.control_kind.name

    @property
    def device(self) -> torch.device:
        """Where the networks compute, also while low-memory mode keeps their weights on the CPU."""
        return self._onload_device or self.denoiser_2d.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser_2d.unet.dtype

    @torch.no_grad()
    def encode_prompt(self, prompt: str = "", negative_prompt: str = "", mode: str = "video") -> PromptEmbeddings:
        """The user's prompt goes before the version's own for `mode` (the official scripts' prompt)."""
        own = self.version.prompt_for(mode)
        text = f"{prompt}, {own}" if prompt else own

        def encode(encoder: CLIPTextModel, value: str) -> torch.Tensor:
            ids = self.tokenizer(
                [value], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            return encoder(ids.to(self.device))[0]

        return PromptEmbeddings(
            reference=encode(self.reference_text_encoder, text),
            reference_negative=encode(self.reference_text_encoder, negative_prompt),
            positive=encode(self.text_encoder, text),
            negative=encode(self.text_encoder, negative_prompt),
        )

    def sampler(self) -> VideoSampler:
        """The version's sampler on these networks and schedulers."""
        return resolve(self.version.sampler).from_pipeline(self)

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


# transformers' CLIP models: their transformer layers are offloaded one by one (diffusers'
# models name their own blocks in `_group_offload_block_modules`).
_OFFLOAD_BLOCKS = {CLIPTextModel: ["encoder"], CLIPVisionModelWithProjection: ["vision_model", "encoder"]}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: the first CUDA GPU, else Apple's MPS, else the CPU; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise HellomemeError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from err
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise HellomemeError(f"device {name!r} is not available here (CUDA GPUs: {torch.cuda.device_count()})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise HellomemeError("device 'mps' is not available here")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: float16 on a GPU (the released weights are float16), float32 on the CPU."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in _DTYPES:
        raise HellomemeError(f"unknown dtype {name!r} (use auto, {', '.join(_DTYPES)})")
    return _DTYPES[name]


def _is_repo_id(value: str) -> bool:
    """`owner/name`, as Hugging Face names a repository."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", value) is not None


def resolve_checkpoint(value: str, cache: WeightCache, progress: ProgressCallback = no_progress) -> Path | None:
    """A local folder or file as it is; a preset name (presets.py) fetched into the Hugging Face
    cache (None for SD1.5: the base model, no swap); an `owner/name` Hugging Face repo id
    downloaded (diffusers layout, safetensors only) under the cache's `checkpoints/` folder."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    preset = checkpoint_preset(value)
    if preset:
        return None if preset.kind == "base" else fetch_preset(preset, cache, progress)
    if not _is_repo_id(value):
        raise HellomemeError(
            f"checkpoint not found: {value} (give a folder, a .safetensors/.ckpt file, a preset name from "
            "`hellomeme weights presets` or a Hugging Face repo id)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(value, allow_patterns=_CHECKPOINT_PATTERNS, cache_dir=cache.home / "checkpoints")
        )
    except Exception as err:  # network, auth, missing repo: all end the run the same way
        first_line = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise HellomemeError(f"cannot download checkpoint {value} from Hugging Face: {first_line}") from err


def resolve_loras(loras: tuple[tuple[Path, float], ...], cache: WeightCache, progress: ProgressCallback = no_progress) -> tuple[tuple[Path, float], ...]:
    """Each LoRA file as it is; a preset name (presets.py) fetched into the Hugging Face cache."""
    return tuple((fetch_preset(preset, cache, progress) if (preset := lora_preset(path)) else path, scale) for path, scale in loras)


def check_options(options: ModelOptions) -> None:
    """Everything about the options that can be wrong, found before any loading starts."""
    resolve_dtype(options.dtype, resolve_device(options.device))
    local = [(path, "LoRA") for path, _ in options.loras if not lora_preset(path)] + ([(options.vae, "VAE")] if options.vae else [])
    remote = options.checkpoint and (_is_repo_id(options.checkpoint) or checkpoint_preset(options.checkpoint))
    if options.checkpoint and (Path(options.checkpoint).expanduser().exists() or not remote):
        local.append((Path(options.checkpoint), "checkpoint"))
    for path, what in local:
        path = Path(path).expanduser()
        if not path.exists():
            hint = "" if what == "VAE" else " (nor is it a preset name: `hellomeme weights presets` lists them)"
            raise HellomemeError(f"{what} not found: {path}{hint}")
        if path.is_file() and path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise HellomemeError(f"{path}: not a weight file for the {what} (expected {', '.join(WEIGHT_SUFFIXES)})")


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
    loras = resolve_loras(options.loras, cache, progress)
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
        scheduler=_scheduler(version, "video", base_folder),
        image_scheduler=_scheduler(version, "image", base_folder),
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


def _scheduler(version: Version, mode: str, base_folder: Path) -> SchedulerMixin:
    """The version's scheduler for `mode`: its class on its own config, or on the base model's
    `scheduler/scheduler_config.json` (the SD1.5 download holds PNDM's config; the official v1
    code runs Euler on it, as here)."""
    spec = version.schedulers[mode]
    cls = resolve(spec.cls)
    if spec.config is not None:
        return cls.from_config(dict(spec.config))
    folder = base_folder / "scheduler"
    try:
        return cls.from_config(cls.load_config(str(folder)))
    except (OSError, ValueError) as err:
        raise HellomemeError(f"cannot read the scheduler config in {folder}: {err}") from err


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
