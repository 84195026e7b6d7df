"""The models stage: every network a run needs, loaded once from the weight cache (plus a
user's checkpoint, VAE and LoRAs) onto one device, so a batch of clips reuses them.

Checkpoint swapping follows the official "x1" recipe (`append_pipline_weights`): the
HelloMeme modules were trained against SD1.5, so the reference net, its text encoder and
the reference-image VAE encoder stay base SD1.5; LoRAs go into the stage-1 and stage-2
UNets and the prompt's text encoder; a swapped checkpoint replaces the stage-2 (motion)
UNet, and its VAE (or `--vae`) decodes the frames. With none of these, one SD1.5 UNet
serves the reference net and both stages.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, MotionAdapter
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from .checkpoints import PICKLE_SUFFIXES, load_sd15, load_vae
from .errors import HellomemeError
from .models import FanEncoder, HMControlNet, HMControlNet2, HMDenoisingNet, HMReferenceAdapter, HMReferenceNet, motion_unet
from .models.unet import load_folder
from .tracking import MODEL_FILE
from .progress import ProgressCallback, ProgressEvent, no_progress
from .settings import ModelOptions
from .weights import WeightCache

# The prompt the official v1 scripts give every clip; a user's prompt is put before it.
DEFAULT_PROMPT = (
    "(best quality), highly detailed, ultra-detailed, headshot, person, well-placed five sense organs, "
    "looking at the viewer, centered composition, sharp focus, realistic skin texture"
)
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


@dataclasses.dataclass
class HelloMemeModels:
    tokenizer: CLIPTokenizer
    reference_text_encoder: CLIPTextModel
    text_encoder: CLIPTextModel
    reference_net: HMReferenceNet
    denoiser_2d: HMDenoisingNet
    denoiser_motion: HMDenoisingNet
    control_net: HMControlNet | HMControlNet2
    vae_encoder: AutoencoderKL
    vae_decoder: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection | None
    fan_encoder: FanEncoder | None
    face_model: Path
    control: str
    device: torch.device
    dtype: torch.dtype
    options: ModelOptions  # what was asked for (a batch or app reuses the models while these stay equal)
    cache: WeightCache  # where the weights came from (the face model of later runs too)

    @torch.no_grad()
    def encode_prompt(self, prompt: str = "", negative_prompt: str = "") -> PromptEmbeddings:
        text = f"{prompt}, {DEFAULT_PROMPT}" if prompt else DEFAULT_PROMPT

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


def resolve_checkpoint(value: str, cache: WeightCache) -> Path:
    """A local folder or file as it is; an `owner/name` Hugging Face repo id downloaded (diffusers
    layout, safetensors only) under the cache's `checkpoints/` folder."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    if not _is_repo_id(value):
        raise HellomemeError(f"checkpoint not found: {value} (give a folder, a .safetensors/.ckpt file or a Hugging Face repo id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(value, allow_patterns=_CHECKPOINT_PATTERNS, cache_dir=cache.home / "checkpoints")
        )
    except Exception as err:  # network, auth, missing repo: all end the run the same way
        first_line = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise HellomemeError(f"cannot download checkpoint {value} from Hugging Face: {first_line}") from err


def check_options(options: ModelOptions) -> None:
    """Everything about the options that can be wrong, found before any loading starts."""
    resolve_dtype(options.dtype, resolve_device(options.device))
    local = [(path, "LoRA") for path, _ in options.loras] + ([(options.vae, "VAE")] if options.vae else [])
    if options.checkpoint and (Path(options.checkpoint).expanduser().exists() or not _is_repo_id(options.checkpoint)):
        local.append((Path(options.checkpoint), "checkpoint"))
    for path, what in local:
        path = Path(path).expanduser()
        if not path.exists():
            raise HellomemeError(f"{what} not found: {path}")
        if path.is_file() and path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise HellomemeError(f"{path}: not a weight file for the {what} (expected {', '.join(WEIGHT_SUFFIXES)})")


def load_models(
    options: ModelOptions, cache: WeightCache | None = None, progress: ProgressCallback = no_progress
) -> HelloMemeModels:
    """Check the cache holds everything (before any loading), then load every network."""
    cache = cache or WeightCache()
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    folders = cache.require(options.spec.components(options.control))
    checkpoint = resolve_checkpoint(options.checkpoint, cache) if options.checkpoint else None
    steps = ["SD1.5", "LoRAs" if options.loras else None, "checkpoint" if checkpoint else None, "HelloMeme modules"]
    steps = [step for step in steps if step]

    def loaded(step: str) -> None:
        progress(ProgressEvent("loading models", steps.index(step) + 1, len(steps), unit="parts"))

    def sd15(**swaps):
        return load_sd15(folders["sd15"], dtype=dtype, device=device, **swaps)

    base = sd15()
    loaded("SD1.5")
    styled = sd15(loras=options.loras) if options.loras else base
    if options.loras:
        loaded("LoRAs")
    if checkpoint:
        stage2 = sd15(checkpoint=checkpoint, vae=options.vae, loras=options.loras)
        loaded("checkpoint")
    else:
        stage2 = styled
    vae_decoder = stage2.vae
    if options.vae and not checkpoint:
        vae_decoder = load_vae(Path(options.vae), folders["sd15"], dtype).to(device).eval()

    def component(cls, name: str):
        return load_folder(cls, folders[name], dtype=dtype).to(device).eval()

    adapter = component(HMReferenceAdapter, "hm_reference")
    motion_adapter = load_folder(MotionAdapter, folders["hm_animatediff_frame12"], dtype=dtype)
    blendshapes = options.control_kind.name == "blendshapes"
    models = HelloMemeModels(
        tokenizer=base.tokenizer,
        reference_text_encoder=base.text_encoder,
        text_encoder=styled.text_encoder,
        reference_net=HMReferenceNet(base.unet),
        denoiser_2d=HMDenoisingNet(styled.unet, adapter),
        denoiser_motion=HMDenoisingNet(motion_unet(stage2.unet, motion_adapter).eval(), adapter),
        control_net=component(HMControlNet, "hm_control") if blendshapes else component(HMControlNet2, "hm_control2"),
        vae_encoder=base.vae,
        vae_decoder=vae_decoder,
        image_encoder=_image_encoder(folders["image_encoder"], dtype, device) if blendshapes else None,
        fan_encoder=None if blendshapes else component(FanEncoder, "pd_fgc_motion"),
        face_model=folders["face_landmarker"] / MODEL_FILE,
        control=options.control_kind.name,
        device=device,
        dtype=dtype,
        options=options,
        cache=cache,
    )
    loaded("HelloMeme modules")
    apply_speed_options(models, options)
    return models


def apply_speed_options(models: HelloMemeModels, options: ModelOptions) -> None:
    """The options that change how the networks run, never what they compute (beyond rounding)."""
    if options.channels_last:
        for network in _convolution_networks(models):
            network.to(memory_format=torch.channels_last)
    if options.low_memory:
        SequentialOffload(_offload_units(models), models.device)
    if options.compile:
        compile_blocks(models)


def _unique(modules) -> list[torch.nn.Module]:
    """Each module once (a UNet, VAE or adapter often serves several roles)."""
    return list({id(module): module for module in modules if module is not None}.values())


def _unets(models: HelloMemeModels) -> list[torch.nn.Module]:
    return _unique([models.reference_net.unet, models.denoiser_2d.unet, models.denoiser_motion.unet])


def _convolution_networks(models: HelloMemeModels) -> list[torch.nn.Module]:
    return _unique([*_unets(models), models.control_net, models.vae_encoder, models.vae_decoder])


def compile_blocks(models: HelloMemeModels, **compile_options) -> int:
    """Regional compilation: every transformer and resnet block of the UNets and VAEs is compiled
    in place (`nn.Module.compile`), so the HelloMeme hooks on the UNets' down/up blocks stay in
    eager code and one compiled graph serves every block of a shape. Returns how many were compiled."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    blocks = _unique(
        module
        for network in _convolution_networks(models)
        for module in network.modules()
        if isinstance(module, (BasicTransformerBlock, ResnetBlock2D))
    )
    for block in blocks:
        block.compile(**compile_options)
    return len(blocks)


def _offload_units(models: HelloMemeModels) -> list[torch.nn.Module]:
    """The blocks low-memory mode moves: the big parts of every network, each of which uses its
    weights only inside its own forward. What stays on the device is small (UNet stems and time
    embeddings, text and patch embeddings, the PD-FGC encoder) and keeps `.device` true."""
    units: list[torch.nn.Module] = []
    for unet in _unets(models):
        units += [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    for adapter in _unique([models.denoiser_2d.reference_adapter, models.denoiser_motion.reference_adapter]):
        units += [*adapter.reference_modules_down, adapter.reference_modules_mid, *adapter.reference_modules_up]
    units += list(models.control_net.blocks_down)
    for vae in _unique([models.vae_encoder, models.vae_decoder]):
        units += [vae.encoder, vae.decoder]
    for encoder in _unique([models.reference_text_encoder, models.text_encoder]):
        units.append(encoder.encoder)
    if models.image_encoder is not None:
        units.append(models.image_encoder.vision_model.encoder)
    return _unique(units)


class SequentialOffload:
    """Low-memory mode: each unit's weights live in (pinned) CPU memory and are copied to the
    device by a forward pre-hook, used, and dropped again by a forward hook; at most one unit's
    weights (plus the small resident parts) occupy the device at a time. Weights are read-only,
    so nothing is ever copied back. A parked weight is an empty tensor: a unit used without its
    hook fails loudly instead of computing with stale weights.

    Units may share parameters (the stage-2 motion UNet reuses the stage-1 UNet's): each weight
    has one stored copy, whichever unit loads it.
    """

    def __init__(self, units: list[torch.nn.Module], device: torch.device):
        self.device = device
        pin = device.type == "cuda"
        stored: dict[int, torch.Tensor] = {}
        self.units: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for unit in units:
            tensors = []
            for tensor in itertools.chain(unit.parameters(), unit.buffers()):
                if id(tensor) not in stored:
                    copy = tensor.data.to("cpu")
                    stored[id(tensor)] = copy.pin_memory() if pin else copy
                tensors.append((tensor, stored[id(tensor)]))
            self.units[id(unit)] = tensors
        for unit in units:
            self._park(unit)
            unit.register_forward_pre_hook(self._load_hook)
            unit.register_forward_hook(self._park_hook)
        if pin:
            torch.cuda.empty_cache()

    def _load_hook(self, unit: torch.nn.Module, args) -> None:
        for tensor, stored in self.units[id(unit)]:
            tensor.data = stored.to(self.device, non_blocking=True)

    def _park_hook(self, unit: torch.nn.Module, args, output) -> None:
        self._park(unit)

    def _park(self, unit: torch.nn.Module) -> None:
        for tensor, stored in self.units[id(unit)]:
            tensor.data = torch.empty(0, dtype=stored.dtype)


def _image_encoder(folder: Path, dtype: torch.dtype, device: torch.device) -> CLIPVisionModelWithProjection:
    try:
        return load_folder(CLIPVisionModelWithProjection, folder, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as err:
        raise HellomemeError(f"cannot load the CLIP image encoder from {folder}: {err}") from err

