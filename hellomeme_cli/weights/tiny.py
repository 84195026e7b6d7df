"""Tiny random-weight versions of every downloadable network, written in exactly the
layout of a real download, so the real loading code runs offline in tests and CI
(`hellomeme weights make-tiny DIR`, then `HELLOMEME_HOME=DIR hellomeme ...`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, MotionAdapter, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from hellomeme_cli.models import (
    FanEncoder,
    HM3MotionAdapter,
    HM3ReferenceAdapter,
    HM4SD15ControlProj,
    HM5bReferenceAdapter,
    HM5ControlNetBase,
    HM5MotionAdapter,
    HM5ReferenceAdapter,
    HM5SD15ControlProj,
    HMControlNet,
    HMControlNet2,
    HMControlNetBase,
    HMReferenceAdapter,
    HMV2ControlNet,
    HMV2ControlNet2,
    HMV3ControlNet,
)
from hellomeme_cli.logs import libraries_quiet
from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.weights.cache import WeightCache, read_lock

BLOCK_OUT_CHANNELS = (32, 64, 64, 64)
CONTROL_CHANNELS = (16, 32, 64, 64)  # control level i feeds UNet down block i
# v2, v3: a stem, then one level per up block from the last (H/8) to the first (H/64), each the width entering it.
V2_CONTROL_CHANNELS = (16, *BLOCK_OUT_CHANNELS[1:], BLOCK_OUT_CHANNELS[-1])
# The widths entering the UNet's up blocks (SD1.5: 1280, 1280, 1280, 640).
UP_CHANNELS = (BLOCK_OUT_CHANNELS[3], BLOCK_OUT_CHANNELS[3], BLOCK_OUT_CHANNELS[2], BLOCK_OUT_CHANNELS[1])
V5_CONTROL_MID_CHANNELS = BLOCK_OUT_CHANNELS[:3]  # HM5ControlNetBase's levels (SD1.5: 320, 640, 1280)
TEXT_DIM = 32
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised layers (output projections) random values too, so every path contributes."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.02)
    return model


# Randomly initialised attention is nearly uniform, so a tiny control net would ignore the pose
# image (its queries); sharper query/key projections make the pose reach the output (2-15 %).
ATTENTION_GAIN = 16.0


def _control(model: torch.nn.Module) -> torch.nn.Module:
    """A tiny control net: randomised, with its attention's queries and keys sharpened."""
    _randomize(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2 and any(part in name.split(".") for part in ("to_q", "to_k")):
                parameter.mul_(ATTENTION_GAIN)
    return model


def tiny_unet(layers_per_block: int = 2, cross_attention_blocks: int = 3) -> UNet2DConditionModel:
    """Cross-attention blocks first, then one plain block, as in SD1.5 (which has 3 + 1)."""
    return UNet2DConditionModel(
        sample_size=64,
        block_out_channels=BLOCK_OUT_CHANNELS[: cross_attention_blocks + 1],
        layers_per_block=layers_per_block,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * cross_attention_blocks + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * cross_attention_blocks,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    )


def write_tokenizer(folder: Path) -> int:
    """A byte-level CLIP tokenizer with one merge ("h i</w>" -> "hi</w>"), in the four
    files of the SD1.5 tokenizer folder, written locally; returns its vocabulary size."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(symbols + [s + "</w>" for s in symbols] + ["hi</w>", BOS, EOS])}
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nh i</w>\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def _text_encoder(vocab_size: int) -> CLIPTextModel:
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


def _image_encoder() -> CLIPVisionModelWithProjection:
    # projection_dim stays 1024: HMControlNet takes 1024-d face-part embeddings.
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=224, patch_size=32, projection_dim=1024
    )
    return CLIPVisionModelWithProjection(config)


def write_sd15(folder: Path, variant: str | None = None, **unet_shape: int) -> Path:
    """A complete diffusers SD1.5 folder; variant None writes full weights under the plain
    file names the lock lists (diffusers' default files, which the official code loads),
    "fp16" half weights under the repo's `.fp16.` names."""
    dtype = torch.float16 if variant == "fp16" else torch.float32
    vocab_size = write_tokenizer(folder / "tokenizer")
    models = {"unet": _randomize(tiny_unet(**unet_shape)), "vae": tiny_vae(), "text_encoder": _text_encoder(vocab_size)}
    for name, model in models.items():
        if dtype != torch.float32:  # a cast to float32 (a no-op) still warns about modules kept in float32
            model.to(dtype)
        model.save_pretrained(folder / name, variant=variant, safe_serialization=True)
    # The SD1.5 download's scheduler config (PNDM's; the v1 sampler runs Euler on it).
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False
    )
    scheduler.save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder


def _tiny_motion_adapter() -> MotionAdapter:
    return MotionAdapter(
        block_out_channels=BLOCK_OUT_CHANNELS, motion_layers_per_block=2, motion_norm_num_groups=32, motion_num_attention_heads=8,
        motion_max_seq_length=32, use_motion_mid_block=True,
    )


def write_esrgan(folder: Path) -> Path:
    """A tiny x2 RRDBNet saved as the released RealESRGAN_x2plus.pth is: its tensors under `params_ema`."""
    from hellomeme_cli.models.rrdbnet import RRDBNet
    from hellomeme_cli.media.upscale import WEIGHTS_FILE

    folder.mkdir(parents=True, exist_ok=True)
    model = RRDBNet(scale=2, num_feat=8, num_block=1, num_grow_ch=4)
    torch.save({"params_ema": model.state_dict()}, folder / WEIGHTS_FILE)
    return folder / WEIGHTS_FILE


def write_face_recognizer(folder: Path) -> Path:
    """A tiny 112 x 112 -> 128 face embedder as ONNX, under the released SFace file's name, which
    OpenCV's `FaceRecognizerSF` loads as it loads the real one. Writing ONNX takes the onnx package."""
    import warnings

    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise HellomemeError("the tiny face recognition model is written as ONNX, which needs the onnx package: pip install onnx") from None
    network = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, kernel_size=8, stride=8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 128)
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / read_lock()["sface"].files[0].path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, torch.zeros(1, 3, 112, 112), str(path), dynamo=False, input_names=["data"], output_names=["fc1"])
    return path


def _saved(build: Callable[[], torch.nn.Module], prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = _randomize):
    """A writer: the network `build` makes, `prepare`d (randomised, by default), saved in its released layout."""
    return lambda folder: (prepare or (lambda model: model))(build()).save_pretrained(folder)


def _writers() -> dict[str, Callable[[Path], object]]:
    """Every component's writer, in the order the random draws are made (a seed gives the same cache)."""
    return {
        "sd15": write_sd15,
        "hm_reference": _saved(lambda: HMReferenceAdapter(block_out_channels=BLOCK_OUT_CHANNELS)),
        "hm_control": _saved(lambda: HMControlNet(cross_attention_dim=TEXT_DIM, block_out_channels=CONTROL_CHANNELS), _control),
        "hm_control2": _saved(lambda: HMControlNet2(cross_attention_dim=TEXT_DIM, block_out_channels=CONTROL_CHANNELS), _control),
        "hm_animatediff_frame12": _saved(_tiny_motion_adapter),
        "hm2_reference": _saved(lambda: HMReferenceAdapter(block_out_channels=BLOCK_OUT_CHANNELS, version="v2")),
        "hm2_control": _saved(lambda: HMV2ControlNet(cross_attention_dim=TEXT_DIM, block_out_channels=V2_CONTROL_CHANNELS), _control),
        "hm2_control2": _saved(lambda: HMV2ControlNet2(cross_attention_dim=TEXT_DIM, block_out_channels=V2_CONTROL_CHANNELS), _control),
        "hm2_animatediff_frame12": _saved(_tiny_motion_adapter),
        "image_encoder": _saved(_image_encoder, None),
        # The PD-FGC encoder's layout is fixed by its 224x224 input; it is small (8.5 M values).
        "pd_fgc_motion": _saved(lambda: FanEncoder().half(), None),
        **_v3_writers("hm3"),
        "hm3_control_mix": _saved(
            lambda: HMV3ControlNet(cross_attention_dim=TEXT_DIM, block_out_channels=V2_CONTROL_CHANNELS, unet_block_out_channels=BLOCK_OUT_CHANNELS),
            _control,
        ),
        **_v3_writers("hm4"),
        "hm_control_base": _saved(lambda: HMControlNetBase(cross_attention_dim=TEXT_DIM, unet_block_out_channels=BLOCK_OUT_CHANNELS), _control),
        "hm4_control_proj": _saved(lambda: HM4SD15ControlProj(unet_block_out_channels=BLOCK_OUT_CHANNELS)),
        "hm5_reference": _saved(lambda: HM5ReferenceAdapter(BLOCK_OUT_CHANNELS, UP_CHANNELS)),
        "hm5b_reference": _saved(lambda: HM5bReferenceAdapter(BLOCK_OUT_CHANNELS, UP_CHANNELS)),
        "hm5c_reference": _saved(lambda: HM5bReferenceAdapter(BLOCK_OUT_CHANNELS, UP_CHANNELS)),
        "hm5_motion": _saved(lambda: HM5MotionAdapter(BLOCK_OUT_CHANNELS, UP_CHANNELS)),
        "hm5_control_base": _saved(
            lambda: HM5ControlNetBase(cross_attention_dim=TEXT_DIM, mid_channels=V5_CONTROL_MID_CHANNELS, out_channels=BLOCK_OUT_CHANNELS[0]), _control
        ),
        "hm5_control_proj": _saved(_v5_control_proj),
        "hm5c_control_proj": _saved(_v5_control_proj),
        "esrgan": write_esrgan,
        "sface": write_face_recognizer,
    }


def _v3_writers(prefix: str) -> dict:
    """The reference and motion adapters and the AnimateDiff module of v3 (prefix hm3) or v4 (hm4)."""
    return {
        f"{prefix}_reference": _saved(lambda: HM3ReferenceAdapter(BLOCK_OUT_CHANNELS, UP_CHANNELS)),
        f"{prefix}_motion": _saved(lambda: HM3MotionAdapter(BLOCK_OUT_CHANNELS, UP_CHANNELS)),
        f"{prefix}_animatediff": _saved(_tiny_motion_adapter),
    }


def _v5_control_proj() -> HM5SD15ControlProj:
    return HM5SD15ControlProj(BLOCK_OUT_CHANNELS, V5_CONTROL_MID_CHANNELS, BLOCK_OUT_CHANNELS[0])


def make_tiny(home: Path, seed: int = 0, progress: ProgressCallback = no_progress) -> WeightCache:
    """Write every tiny component into the cache at `home` and record their hashes."""
    cache = WeightCache(home)
    torch.manual_seed(seed)
    writers = _writers()
    for done, (name, write) in enumerate(writers.items()):
        progress(ProgressEvent("make-tiny", done, len(writers), unit="component"))
        with libraries_quiet():  # diffusers' save_pretrained draws shard bars of its own
            write(cache.path(name))
        cache.mark_tiny(name)
    progress(ProgressEvent("make-tiny", len(writers), len(writers), unit="component"))
    return cache
