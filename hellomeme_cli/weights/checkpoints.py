"""The SD1.5 that HelloMeme's adapters plug into: the base diffusers folder, or a community
SD1.5 fine-tune in its place (a diffusers folder or a single civitai-style file), with an
optional replacement VAE and LoRAs fused into the weights.

diffusers does the work: `from_single_file` converts a single file with the base folder's
configs (offline), and its LoRA loader (peft) converts kohya/A1111/peft LoRAs, which are fused
and their peft layers removed. Ours: the one-line refusals of files of another kind, found
before anything loads, and reading pickles only with `torch.load(weights_only=True)` ourselves,
so the refusal names what the file holds.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.models.unet import load_folder

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
CONTEXT_WIDTH_FAMILIES = {2048: "an SDXL", 1280: "an SDXL refiner", 1024: "an SD2"}
IN_CHANNEL_FAMILIES = {9: "an inpainting", 8: "an InstructPix2Pix"}
# Tensor names that only LoRA files have (kohya/civitai, peft, older diffusers).
LORA_KEY_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight")
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
    """diffusers' LoRA loader (kohya, A1111, peft and older diffusers files) puts the LoRA into
    the UNet and text encoder as peft layers; they are fused at `scale` and removed again, so the
    models stay plain diffusers/transformers modules with no runtime LoRA cost."""
    lora = _LoraTarget(components.unet, components.text_encoder)
    try:
        lora.load_lora_weights(_read_tensors(path), adapter_name="style")
        lora.fuse_lora(lora_scale=scale, adapter_names=["style"])
    except (ValueError, RuntimeError, KeyError) as err:  # peft and diffusers report unfitting files in many ways
        raise HellomemeError(
            f"{path.name}: not a LoRA for this SD1.5 UNet or text encoder (another model, SDXL or SD2, "
            f"or another format: LoHa, LoKr): {_joined(err)}"
        ) from err
    finally:
        lora.unload_lora_weights()


class _LoraTarget(StableDiffusionLoraLoaderMixin):
    """The two models a LoRA goes into, seen as the pipeline diffusers' LoRA loader expects
    (the x1 recipe keeps LoRAs out of the reference net, so our pipeline cannot be that one)."""

    hf_device_map = None

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel):
        self.unet, self.text_encoder = unet, text_encoder

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}


def _joined(err: BaseException) -> str:
    """Every line of an error on one line, shortened."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


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
    """diffusers' `from_single_file` with the base folder's configs (offline); a file without a
    VAE or text encoder (UNet-only fine-tunes) takes the base folder's."""
    if path.suffix.lower() == ".safetensors":
        _check_checkpoint(path, _safetensors_shapes(path), base_dir)  # from the header: a wrong 7 GB file is refused at once
    state = _read_tensors(path)
    _check_checkpoint(path, {key: tuple(tensor.shape) for key, tensor in state.items()}, base_dir)
    has_vae = any(key.startswith(VAE_PREFIX) for key in state)
    has_text_encoder = any(key.startswith(TEXT_ENCODER_PREFIX) for key in state)
    return SD15Components(
        unet=_from_single_file(UNet2DConditionModel, state, base_dir, path, dtype),
        vae=_from_single_file(AutoencoderKL, state, base_dir, path, dtype) if has_vae else _from_pretrained(AutoencoderKL, base_dir / "vae", dtype),
        text_encoder=(
            _from_single_file(CLIPTextModel, state, base_dir, path, dtype)
            if has_text_encoder
            else _from_pretrained(CLIPTextModel, base_dir / "text_encoder", dtype)
        ),
        tokenizer=_from_pretrained(CLIPTokenizer, base_dir / "tokenizer", dtype),
    )


_SUBFOLDERS = {UNet2DConditionModel: "unet", AutoencoderKL: "vae", CLIPTextModel: "text_encoder"}


def _from_single_file(cls: type[Loadable], state: dict[str, torch.Tensor], base_dir: Path, source: Path, dtype: torch.dtype) -> Loadable:
    """One model of an original-layout state dict, converted by diffusers with the config in `base_dir`."""
    options = {"config": str(base_dir), "subfolder": _SUBFOLDERS[cls], "local_files_only": True, "torch_dtype": dtype}
    try:
        if cls is CLIPTextModel:
            return create_diffusers_clip_model_from_ldm(cls, state, **options)
        return cls.from_single_file(state, **options)
    except Exception as err:  # diffusers reports tensors that do not fit in many ways (even NotImplementedError)
        raise HellomemeError(f"{source.name}: its {_SUBFOLDERS[cls]} tensors do not fit the SD1.5 {_SUBFOLDERS[cls]}: {_one_line(err)}") from err


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
    return key.startswith(("lora_unet_", "lora_te")) or key.endswith(LORA_KEY_SUFFIXES)


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


def load_vae(path: str | Path, base_dir: Path, dtype: torch.dtype) -> AutoencoderKL:
    """A VAE from a diffusers folder (or a model folder's vae/) or an original-layout file."""
    path = _existing(path, "VAE")
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        return _from_pretrained(AutoencoderKL, folder, dtype)
    return _from_single_file(AutoencoderKL, _read_tensors(path), base_dir, path, dtype)
