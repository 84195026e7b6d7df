"""The SD1.5 that HelloMeme's adapters plug into: the base diffusers folder, or a community
SD1.5 fine-tune in its place (a diffusers folder or a single civitai-style file), with an
optional replacement VAE and LoRAs fused into the weights.

Everything is offline: single files are converted with the configs of the base folder, and
pickles are read only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .errors import HellomemeError
from .models.unet import load_folder

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
# CLIPTextModel has no `text_model` wrapper in transformers >= 5.6, but files keep the name.
TEXT_MODEL = "text_model."
CONTEXT_WIDTH_FAMILIES = {2048: "an SDXL", 1280: "an SDXL refiner", 1024: "an SD2"}
IN_CHANNEL_FAMILIES = {9: "an inpainting", 8: "an InstructPix2Pix"}
LORA_SUFFIXES = {
    ".lora_down.weight": "down",  # kohya / civitai
    ".lora_up.weight": "up",
    ".alpha": "alpha",
    ".lora_A.weight": "down",  # peft / diffusers
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",  # older diffusers
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down",  # diffusers attention processors (`attn1.processor.to_q_lora`)
    "_lora.up.weight": "up",
}
Loadable = TypeVar("Loadable", UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer)


@dataclass
class SD15Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer


def load_sd15(
    base_dir: Path,
    checkpoint: str | Path | None = None,
    vae: str | Path | None = None,
    loras: Sequence[tuple[Path, float]] = (),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> SD15Components:
    """The base SD1.5 folder's models, with `checkpoint` (a diffusers folder or an original-layout
    .safetensors/.ckpt) and `vae` in their place, and `loras` fused into the weights."""
    base_dir = Path(base_dir)
    if not (base_dir / "model_index.json").is_file():
        raise HellomemeError(f"{base_dir} is not a diffusers SD1.5 folder (it has no model_index.json)")
    if checkpoint is None:
        components = _load_sd15_folder(base_dir, base_dir, dtype)
    else:
        checkpoint = _existing(checkpoint, "checkpoint")
        if checkpoint.is_dir():
            components = _load_sd15_folder(checkpoint, base_dir, dtype)
        else:
            components = _load_single_file(checkpoint, base_dir, dtype)
    if vae is not None:
        components.vae = load_vae(vae, base_dir, dtype)
    for lora, scale in loras:
        fuse_lora(components, _existing(lora, "LoRA"), scale)
    for model in (components.unet, components.vae, components.text_encoder):
        model.to(device).eval()
    return components


def parse_lora_option(value: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` -> (file, scale); a lone drive letter (`C:\\x.safetensors`) is part of
    the file, and so is any colon of a file that exists."""
    if Path(value).is_file():
        return Path(value), 1.0
    file, colon, scale_text = value.rpartition(":")
    if not colon or re.fullmatch(r"[A-Za-z]", file):
        return Path(value), 1.0
    try:
        scale = float(scale_text)
    except ValueError:
        scale = math.nan
    if not file or not math.isfinite(scale):
        raise HellomemeError(f"bad --lora value {value!r}: expected FILE or FILE:SCALE, e.g. style.safetensors:0.8")
    return Path(file), scale


def fuse_lora(components: SD15Components, path: Path, scale: float) -> None:
    """Add scale * alpha / rank * up @ down to each layer the LoRA file names, so the models
    stay plain diffusers/transformers modules with no runtime LoRA cost."""
    targets = dict(_lora_targets(components))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unmatched = []
    for key, tensor in _read_tensors(path).items():
        target, role = _split_lora_key(key)
        if target in targets:
            parts.setdefault(target, {})[role] = tensor
        else:
            unmatched.append(key)
    if not parts:
        raise HellomemeError(
            f"{path.name}: none of its tensors is a LoRA for an SD1.5 UNet or text-encoder layer (e.g. {unmatched[0]!r})"
        )
    if unmatched:
        raise HellomemeError(
            f"{path.name}: {len(unmatched)} tensors fit no SD1.5 layer (e.g. {unmatched[0]!r}); "
            "is it a LoRA for another model (SDXL, SD2) or another format (LoHa, LoKr, DoRA)?"
        )
    for target, lora in parts.items():  # all checked before any weight changes
        if "down" not in lora or "up" not in lora:
            raise HellomemeError(f"{path.name}: layer {target!r} lacks its lora up or down tensor")
        weight = targets[target].weight
        shape = (lora["up"].shape[0], lora["down"][0].numel())
        if shape != weight.flatten(1).shape:
            raise HellomemeError(
                f"{path.name}: layer {target!r} has a LoRA for a {shape[0]}x{shape[1]} weight, but the SD1.5 layer is "
                f"{weight.shape[0]}x{weight[0].numel()}; is it a LoRA for another model (SDXL, SD2)?"
            )
    with torch.no_grad():
        for target, lora in parts.items():
            weight = targets[target].weight
            rank = lora["down"].shape[0]
            alpha = float(lora["alpha"]) if "alpha" in lora else rank
            delta = _lora_product(lora["up"].float(), lora["down"].float())
            weight.copy_(weight.float() + delta.reshape(weight.shape) * (scale * alpha / rank))


def save_original_layout(components: SD15Components, path: Path) -> None:
    """Write the UNet, VAE and text encoder as one original-layout (LDM, civitai-style)
    .safetensors file: the inverse of what `load_sd15(base, checkpoint=path)` converts."""
    tensors = {
        **{UNET_PREFIX + k: v for k, v in _unet_to_original(components.unet).items()},
        **{VAE_PREFIX + k: v for k, v in _vae_to_original(components.vae).items()},
        **{TEXT_ENCODER_PREFIX + TEXT_MODEL + k: v for k, v in components.text_encoder.state_dict().items()},
    }
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


# Loading -------------------------------------------------------------------------------------


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise HellomemeError(f"{what} not found: {path}")
    return path


def _one_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _load_sd15_folder(folder: Path, base_dir: Path, dtype: torch.dtype) -> SD15Components:
    """Each model from `folder`, or from `base_dir` where `folder` lacks it (a fine-tune may ship only unet/)."""
    if not ((folder / "model_index.json").is_file() or (folder / "unet" / "config.json").is_file()):
        raise HellomemeError(f"{folder} is not a diffusers model folder (no model_index.json or unet/config.json)")
    if folder != base_dir:
        _check_unet_config(folder / "unet", base_dir)

    def part(name: str) -> Path:
        return folder / name if (folder / name).is_dir() else base_dir / name

    return SD15Components(
        unet=_from_pretrained(UNet2DConditionModel, part("unet"), dtype),
        vae=_from_pretrained(AutoencoderKL, part("vae"), dtype),
        text_encoder=_from_pretrained(CLIPTextModel, part("text_encoder"), dtype),
        tokenizer=_from_pretrained(CLIPTokenizer, part("tokenizer"), dtype),
    )


def _from_pretrained(cls: type[Loadable], folder: Path, dtype: torch.dtype) -> Loadable:
    try:
        if cls is CLIPTokenizer:
            return cls.from_pretrained(str(folder), local_files_only=True)
        return load_folder(cls, folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise HellomemeError(f"cannot load {folder}: {_one_line(err)}") from err


def _check_unet_config(unet_folder: Path, base_dir: Path) -> None:
    config_file = unet_folder / "config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    problem = _architecture_problem(config.get("cross_attention_dim"), config.get("in_channels"), base_dir)
    if problem:
        raise HellomemeError(f"{unet_folder.parent.name} {problem}")


def _architecture_problem(context_width: int | None, in_channels: int | None, base_dir: Path) -> str | None:
    """What a UNet is when its text width or input channels are not those of the base SD1.5 UNet."""
    base = UNet2DConditionModel.load_config(str(base_dir / "unet"))
    if context_width is not None and context_width != base["cross_attention_dim"]:
        family = CONTEXT_WIDTH_FAMILIES.get(context_width, "a non-SD1.5")
        return (
            f"is {family} model ({context_width}-d text context, SD1.5 uses {base['cross_attention_dim']}); "
            "hellomeme needs an SD1.5-family checkpoint"
        )
    if in_channels is not None and in_channels != base["in_channels"]:
        family = IN_CHANNEL_FAMILIES.get(in_channels, "a non-SD1.5")
        return (
            f"is {family} model ({in_channels} input channels, SD1.5 uses {base['in_channels']}); "
            "hellomeme needs a text-to-image SD1.5-family checkpoint"
        )
    return None


def _load_single_file(path: Path, base_dir: Path, dtype: torch.dtype) -> SD15Components:
    """Convert an original-layout checkpoint with the base folder's configs; a file without a
    VAE or text encoder (UNet-only fine-tunes) takes the base folder's."""
    if path.suffix.lower() == ".safetensors":
        _check_checkpoint(path, _safetensors_shapes(path), base_dir)  # from the header: a wrong 7 GB file is refused at once
    state = _read_tensors(path)
    _check_checkpoint(path, {key: tuple(tensor.shape) for key, tensor in state.items()}, base_dir)
    has_vae = any(key.startswith(VAE_PREFIX) for key in state)
    has_text_encoder = any(key.startswith(TEXT_ENCODER_PREFIX) for key in state)
    return SD15Components(
        unet=_unet_from_original(state, base_dir, path, dtype),
        vae=(
            _vae_from_original(state, base_dir, path, dtype)
            if has_vae
            else _from_pretrained(AutoencoderKL, base_dir / "vae", dtype)
        ),
        text_encoder=(
            _text_encoder_from_original(state, base_dir, path, dtype)
            if has_text_encoder
            else _from_pretrained(CLIPTextModel, base_dir / "text_encoder", dtype)
        ),
        tokenizer=_from_pretrained(CLIPTokenizer, base_dir / "tokenizer", dtype),
    )


def _check_checkpoint(path: Path, shapes: Mapping[str, tuple[int, ...]], base_dir: Path) -> None:
    problem = _checkpoint_problem(shapes, base_dir)
    if problem:
        raise HellomemeError(f"{path.name} {problem}")


def _checkpoint_problem(shapes: Mapping[str, tuple[int, ...]], base_dir: Path) -> str | None:
    """Why these tensors are not an original-layout SD1.5-family checkpoint, if they are not."""
    if any(_is_lora_key(key) for key in shapes):
        return "is a LoRA, not a checkpoint; pass it with --lora FILE[:SCALE]"
    if any(key.startswith("conditioner.embedders.") for key in shapes):
        return "is an SDXL checkpoint; hellomeme needs an SD1.5-family checkpoint"
    if any(key.startswith("cond_stage_model.model.") for key in shapes):
        return "is an SD2 checkpoint (OpenCLIP text encoder); hellomeme needs an SD1.5-family checkpoint"
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        if any(key.startswith(("encoder.", VAE_PREFIX + "encoder.")) for key in shapes):
            return "is a VAE, not a full checkpoint; pass it with --vae"
        if "conv_in.weight" in shapes and any(key.startswith("down_blocks.") for key in shapes):
            return "is a UNet in diffusers layout; pass the diffusers model folder it belongs to instead"
        first_key = next(iter(shapes), "none")
        return f"is not an SD1.5 checkpoint: it has no {UNET_PREFIX}input_blocks.* tensors (first key: {first_key!r})"
    context_widths = [
        shape[1] for key, shape in shapes.items() if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight")
    ]
    return _architecture_problem(max(context_widths, default=None), conv_in[1], base_dir)


def _is_lora_key(key: str) -> bool:
    lora_tensor_suffixes = [suffix for suffix, role in LORA_SUFFIXES.items() if role != "alpha"]
    return key.startswith(("lora_unet_", "lora_te")) or key.endswith(tuple(lora_tensor_suffixes))


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except (SafetensorError, OSError) as err:
        raise HellomemeError(f"cannot read {path.name} as safetensors: {_one_line(err)}") from err


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise HellomemeError(f"cannot read {path.name} as safetensors: {_one_line(err)}") from err
    elif suffix in PICKLE_SUFFIXES:
        tensors = _read_pickle(path)
    else:
        raise HellomemeError(f"{path.name}: unknown weight file type; expected .safetensors or {', '.join(PICKLE_SUFFIXES)}")
    if not tensors:
        raise HellomemeError(f"{path.name} holds no tensors")
    return tensors


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch pickle, refusing anything `weights_only` does not allow, since
    unpickling arbitrary objects can run code from the file."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).partition("WeightsUnpickler error:")[2]
        found = re.search(r"Unsupported global: GLOBAL (\S+)", detail)
        if found:
            raise HellomemeError(
                f"{path.name} holds Python objects besides weights ({found.group(1)}), and hellomeme reads pickles only "
                "with torch.load(weights_only=True); use a .safetensors version of it"
            ) from err
        reason = _one_line(detail or err)
        raise HellomemeError(f"cannot read {path.name}: not a PyTorch weights file, or damaged ({reason})") from err
    except Exception as err:  # torch.load reports damaged files with many exception types
        raise HellomemeError(f"cannot read {path.name}: {_one_line(err)}") from err
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, dict):
        raise HellomemeError(f"{path.name} holds a {type(state).__name__}, not a dictionary of tensors")
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _assign(model: nn.Module, state: dict[str, torch.Tensor], source: Path, part: str, dtype: torch.dtype) -> None:
    """Load converted tensors into a model built on the meta device, saying in one line what does not fit."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshapen = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or misshapen:
        details = [
            f"{len(names)} {what} (e.g. {names[0]!r})"
            for names, what in ((missing, "missing"), (unexpected, "unexpected"), (misshapen, "of another shape"))
            if names
        ]
        raise HellomemeError(f"{source.name}: its {part} tensors do not fit the SD1.5 {part}: {', '.join(details)}")
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, assign=True)


def _empty_like_base(cls: type[Loadable], folder: Path) -> tuple[Loadable, dict]:
    """A model with the base folder's config and no weights yet (they come from the converted file)."""
    config = cls.load_config(str(folder))
    with init_empty_weights():
        return cls.from_config(config), config


def _unet_from_original(
    state: dict[str, torch.Tensor], base_dir: Path, source: Path, dtype: torch.dtype
) -> UNet2DConditionModel:
    unet, config = _empty_like_base(UNet2DConditionModel, base_dir / "unet")
    _assign(unet, convert_ldm_unet_checkpoint(state, config), source, "UNet", dtype)
    return unet


def _vae_from_original(
    state: dict[str, torch.Tensor], base_dir: Path, source: Path, dtype: torch.dtype
) -> AutoencoderKL:
    """Original layout, with or without the `first_stage_model.` prefix, or diffusers layout."""
    vae, config = _empty_like_base(AutoencoderKL, base_dir / "vae")
    if any(".down_blocks." in key or ".up_blocks." in key for key in state):
        converted = state
    else:
        converted = convert_ldm_vae_checkpoint(state, config)
    if not converted:
        raise HellomemeError(f"{source.name} has no VAE tensors (encoder.* / decoder.*)")
    _assign(vae, converted, source, "VAE", dtype)
    return vae


def _text_encoder_from_original(
    state: dict[str, torch.Tensor], base_dir: Path, source: Path, dtype: torch.dtype
) -> CLIPTextModel:
    config = CLIPTextConfig.from_pretrained(str(base_dir / "text_encoder"), local_files_only=True)
    with init_empty_weights():
        text_encoder = CLIPTextModel(config)
    converted = {
        key.removeprefix(TEXT_ENCODER_PREFIX).removeprefix(TEXT_MODEL): tensor
        for key, tensor in state.items()
        if key.startswith(TEXT_ENCODER_PREFIX) and not key.endswith("position_ids")  # a buffer the model makes itself
    }
    _assign(text_encoder, converted, source, "text encoder", dtype)
    return text_encoder


def load_vae(path: str | Path, base_dir: Path, dtype: torch.dtype) -> AutoencoderKL:
    """A VAE from a diffusers folder (or a model folder's vae/) or an original-layout file."""
    path = _existing(path, "VAE")
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        return _from_pretrained(AutoencoderKL, folder, dtype)
    return _vae_from_original(_read_tensors(path), base_dir, path, dtype)


# LoRA ------------------------------------------------------------------------------------------


def _lora_targets(components: SD15Components) -> Iterator[tuple[str, nn.Module]]:
    """Every name a LoRA file may give a UNet or text-encoder layer, with that layer."""
    for name, module in components.unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            yield "lora_unet_" + name.replace(".", "_"), module
            yield "unet." + name, module
            yield name, module
    for name, module in components.text_encoder.named_modules():
        if isinstance(module, nn.Linear):
            yield "lora_te_" + (TEXT_MODEL + name).replace(".", "_"), module
            yield "text_encoder." + TEXT_MODEL + name, module


def _split_lora_key(key: str) -> tuple[str, str]:
    """`<layer><suffix>` -> (layer name as the model spells it, "down" | "up" | "alpha");
    an unknown suffix gives the key itself, which names no layer."""
    for suffix, role in LORA_SUFFIXES.items():
        if key.endswith(suffix):
            layer = key.removesuffix(suffix).replace(".processor.", ".")
            return (layer + ".0" if layer.endswith(".to_out") else layer), role
    return key, ""


def _lora_product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up @ down for linear and 1x1 layers; for a k x k convolution LoRA (LoCon) the down
    projection keeps its kernel."""
    if down.dim() == 4 and down.shape[2:] != (1, 1):
        return torch.einsum("or,rikl->oikl", up.flatten(1), down)
    return up.flatten(1) @ down.flatten(1)


# Diffusers -> original layout ----------------------------------------------------------------

UNET_RESNET_NAMES = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
VAE_RESNET_NAMES = {"conv_shortcut.": "nin_shortcut."}
VAE_ATTENTION_NAMES = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def _unet_to_original(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """Diffusers block i, layer j <-> LDM input block 1 + i * (layers + 1) + j, the extra slot
    per block holding the downsampler (upsampler in the output blocks)."""
    slots = unet.config.layers_per_block + 1
    prefixes: dict[str, tuple[str, dict[str, str]]] = {
        "time_embedding.linear_1.": ("time_embed.0.", {}),
        "time_embedding.linear_2.": ("time_embed.2.", {}),
        "conv_in.": ("input_blocks.0.0.", {}),
        "conv_norm_out.": ("out.0.", {}),
        "conv_out.": ("out.2.", {}),
        "mid_block.attentions.0.": ("middle_block.1.", {}),
        "mid_block.resnets.0.": ("middle_block.0.", UNET_RESNET_NAMES),
        "mid_block.resnets.1.": ("middle_block.2.", UNET_RESNET_NAMES),
    }
    for i in range(len(unet.down_blocks)):
        for j in range(slots - 1):
            slot = 1 + i * slots + j
            prefixes[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{slot}.0.", UNET_RESNET_NAMES)
            prefixes[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{slot}.1.", {})
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(i + 1) * slots}.0.op.", {})
    for i, block in enumerate(unet.up_blocks):
        for j in range(slots):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{i * slots + j}.0.", UNET_RESNET_NAMES)
            prefixes[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{i * slots + j}.1.", {})
        upsampler_index = 2 if hasattr(block, "attentions") else 1
        prefixes[f"up_blocks.{i}.upsamplers.0."] = (f"output_blocks.{(i + 1) * slots - 1}.{upsampler_index}.", {})
    return {_original_key(key, prefixes): tensor for key, tensor in unet.state_dict().items()}


def _vae_to_original(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """Diffusers decoder up block i <-> LDM `decoder.up.{n - 1 - i}` (LDM counts from the
    latent side), and the attention's linear layers become 1x1 convolutions."""
    blocks = len(vae.config.down_block_types)
    prefixes: dict[str, tuple[str, dict[str, str]]] = {
        "quant_conv.": ("quant_conv.", {}),
        "post_quant_conv.": ("post_quant_conv.", {}),
    }
    for coder in ("encoder", "decoder"):
        prefixes[f"{coder}.conv_in."] = (f"{coder}.conv_in.", {})
        prefixes[f"{coder}.conv_out."] = (f"{coder}.conv_out.", {})
        prefixes[f"{coder}.conv_norm_out."] = (f"{coder}.norm_out.", {})
        prefixes[f"{coder}.mid_block.attentions.0."] = (f"{coder}.mid.attn_1.", VAE_ATTENTION_NAMES)
        for j in range(2):
            prefixes[f"{coder}.mid_block.resnets.{j}."] = (f"{coder}.mid.block_{j + 1}.", VAE_RESNET_NAMES)
    for i in range(blocks):
        for j in range(vae.config.layers_per_block + 1):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", VAE_RESNET_NAMES)
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{blocks - 1 - i}.block.{j}.", VAE_RESNET_NAMES)
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", {})
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{blocks - 1 - i}.upsample.", {})
    original = {}
    for key, tensor in vae.state_dict().items():
        is_attention_linear = ".mid_block.attentions." in key and key.endswith(".weight") and tensor.dim() == 2
        original[_original_key(key, prefixes)] = tensor[:, :, None, None] if is_attention_linear else tensor
    return original


def _original_key(key: str, prefixes: Mapping[str, tuple[str, Mapping[str, str]]]) -> str:
    for prefix, (original_prefix, inner_names) in prefixes.items():
        if key.startswith(prefix):
            rest = key.removeprefix(prefix)
            for name, original_name in inner_names.items():
                if rest.startswith(name):
                    rest = original_name + rest.removeprefix(name)
                    break
            return original_prefix + rest
    raise ValueError(f"no original-layout name for {key!r}: not an SD1.5-shaped model")
