"""A tiny random-weight SD1.5 in the diffusers folder layout, built offline from configs,
so checkpoint loading can be tested in seconds without any download."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

TEXT_DIM = 32
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def tiny_unet(layers_per_block: int = 1, cross_attention_blocks: int = 1) -> UNet2DConditionModel:
    """Cross-attention blocks first, then one plain block, as in SD1.5 (which has 3 + 1)."""
    blocks = cross_attention_blocks + 1
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32,) * (blocks - 1) + (64,),
        layers_per_block=layers_per_block,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * cross_attention_blocks + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * cross_attention_blocks,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def tiny_tokenizer() -> CLIPTokenizer:
    """Byte-level symbols, their end-of-word forms and one merge, like CLIP's files but small."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["h", "hi</w>", BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=[("h", "i</w>")], model_max_length=77)


def tiny_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def write_tiny_sd15(folder: Path, variant: str | None = None, seed: int = 0, **unet_shape: int) -> Path:
    """Write a complete diffusers SD1.5 folder (variant "fp16" writes half weights under the
    `.fp16.` file names of the official repository) and return it."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    for name, model in (
        ("unet", tiny_unet(**unet_shape)),
        ("vae", tiny_vae()),
        ("text_encoder", tiny_text_encoder(len(tokenizer))),
    ):
        if variant == "fp16":
            model.half()
        model.save_pretrained(folder / name, variant=variant, safe_serialization=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return folder
