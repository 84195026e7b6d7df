"""Test-only: SD1.5 models written as one original-layout (LDM, civitai-style) single file,
the inverse of what diffusers' `from_single_file` converts, to test single-file loading."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

from hellomeme_cli.weights.checkpoints import TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX, SD15Components

# CLIPTextModel has no `text_model` wrapper in transformers >= 5.6, but files keep the name.
TEXT_MODEL = "text_model."


def save_original_layout(components: SD15Components, path: Path) -> None:
    """Write the UNet, VAE and text encoder as one original-layout (LDM, civitai-style)
    .safetensors file: the inverse of what `load_sd15(base, checkpoint=path)` converts."""
    tensors = {
        **{UNET_PREFIX + k: v for k, v in _unet_to_original(components.unet).items()},
        **{VAE_PREFIX + k: v for k, v in _vae_to_original(components.vae).items()},
        **{TEXT_ENCODER_PREFIX + TEXT_MODEL + k: v for k, v in components.text_encoder.state_dict().items()},
    }
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


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
