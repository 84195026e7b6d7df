"""Random-weight versions of every downloadable network, written in exactly the layout of a
real download, so the real loading code runs offline: tiny ones for tests and CI
(`hellomeme weights make-tiny DIR`, then `HELLOMEME_HOME=DIR hellomeme ...`), and, for the
benchmarks, the released full-size shapes of the components a version needs (`make_full_size`:
SD1.5, the ViT-H image encoder and the adapters' default configs, float16 on disk as released)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
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


SIZES = ("tiny", "full")
# The SD1.5 text encoder's vocabulary (CLIP ViT-L/14); the full-size encoder keeps it, with the tiny tokenizer's ids.
SD15_VOCAB_SIZE = 49408


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


def full_unet() -> UNet2DConditionModel:
    """The SD1.5 UNet's configuration (diffusers' defaults are SD1.5's, with 768-wide text)."""
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)


def full_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
    )


def full_text_encoder(vocab_size: int) -> CLIPTextModel:
    """SD1.5's CLIP ViT-L/14 text encoder, its 49408-token table kept; the special ids are the
    tiny tokenizer's (`vocab_size` is its vocabulary), which the weights are written with."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=SD15_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    ))


def full_image_encoder() -> CLIPVisionModelWithProjection:
    """The IP-Adapter ViT-H/14 image encoder (`songkey/IP-Adapter` models/image_encoder)."""
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32, image_size=224,
        patch_size=14, projection_dim=1024, hidden_act="gelu",
    ))


def full_motion_adapter() -> MotionAdapter:
    """An AnimateDiff v1.5-v2 shaped motion module with a mid block (the released hm*_animatediff
    configs are not known from the official code; this is the tiny cache's layout at SD1.5 widths)."""
    return MotionAdapter(
        block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2, motion_num_attention_heads=8,
        motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True,
    )


def sd15_networks(size: str, vocab_size: int, **unet_shape: int) -> dict[str, torch.nn.Module]:
    """The UNet, VAE and text encoder of an SD1.5 folder of `size`, in the order their random draws are made."""
    if size == "full":
        return {"unet": _randomize(full_unet()), "vae": full_vae(), "text_encoder": full_text_encoder(vocab_size)}
    return {"unet": _randomize(tiny_unet(**unet_shape)), "vae": tiny_vae(), "text_encoder": _text_encoder(vocab_size)}


def write_sd15(folder: Path, variant: str | None = None, size: str = "tiny", **unet_shape: int) -> Path:
    """A complete diffusers SD1.5 folder; variant None writes full weights under the plain
    file names the lock lists (diffusers' default files, which the official code loads),
    "fp16" half weights under the repo's `.fp16.` names. Full size is written in float16
    under the plain names (the networks alone are 2 GB so)."""
    dtype = torch.float16 if variant == "fp16" or size == "full" else torch.float32
    vocab_size = write_tokenizer(folder / "tokenizer")
    models = sd15_networks(size, vocab_size, **unet_shape)
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


def _saved(build: Callable[[], torch.nn.Module], prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = _randomize, half: bool = False):
    """A writer: the network `build` makes, `prepare`d (randomised, by default), saved in its released
    layout (in float16 with `half`, as the released files are)."""

    def write(folder: Path) -> None:
        model = (prepare or (lambda model: model))(build())
        (model.half() if half else model).save_pretrained(folder)

    return write


def _builders(size: str = "tiny") -> dict[str, tuple[Callable[[], torch.nn.Module], Callable | None]]:
    """Every HelloMeme network component's (build, prepare) at `size`, in the order the random draws
    are made (a seed gives the same cache). Tiny: the test widths; full: the classes' defaults,
    which are the released configs (conformance/*/manifest_full.json)."""
    if size not in SIZES:
        raise HellomemeError(f"weights size must be one of {', '.join(SIZES)}, got {size!r}")
    tiny = size == "tiny"

    def pick(small: Callable[[], torch.nn.Module], full: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
        return small if tiny else full

    def v3_builders(prefix: str) -> dict:
        """The reference and motion adapters and the AnimateDiff module of v3 (prefix hm3) or v4 (hm4)."""
        return {
            f"{prefix}_reference": (pick(lambda: HM3ReferenceAdapter(BLOCK_OUT_CHANNELS, UP_CHANNELS), HM3ReferenceAdapter), _randomize),
            f"{prefix}_motion": (pick(lambda: HM3MotionAdapter(BLOCK_OUT_CHANNELS, UP_CHANNELS), HM3MotionAdapter), _randomize),
            f"{prefix}_animatediff": (pick(_tiny_motion_adapter, full_motion_adapter), _randomize),
        }

    text = {"cross_attention_dim": TEXT_DIM} if tiny else {}
    motion_adapter = pick(_tiny_motion_adapter, full_motion_adapter)
    return {
        "hm_reference": (pick(lambda: HMReferenceAdapter(block_out_channels=BLOCK_OUT_CHANNELS), HMReferenceAdapter), _randomize),
        "hm_control": (pick(lambda: HMControlNet(block_out_channels=CONTROL_CHANNELS, **text), HMControlNet), _control),
        "hm_control2": (pick(lambda: HMControlNet2(block_out_channels=CONTROL_CHANNELS, **text), HMControlNet2), _control),
        "hm_animatediff_frame12": (motion_adapter, _randomize),
        "hm2_reference": (
            pick(lambda: HMReferenceAdapter(block_out_channels=BLOCK_OUT_CHANNELS, version="v2"), lambda: HMReferenceAdapter(version="v2")),
            _randomize,
        ),
        "hm2_control": (pick(lambda: HMV2ControlNet(block_out_channels=V2_CONTROL_CHANNELS, **text), HMV2ControlNet), _control),
        "hm2_control2": (pick(lambda: HMV2ControlNet2(block_out_channels=V2_CONTROL_CHANNELS, **text), HMV2ControlNet2), _control),
        "hm2_animatediff_frame12": (motion_adapter, _randomize),
        "image_encoder": (pick(_image_encoder, full_image_encoder), None),
        # The PD-FGC encoder's layout is fixed by its 224x224 input; it is small (8.5 M values).
        "pd_fgc_motion": (lambda: FanEncoder().half(), None),
        **v3_builders("hm3"),
        "hm3_control_mix": (
            pick(
                lambda: HMV3ControlNet(block_out_channels=V2_CONTROL_CHANNELS, unet_block_out_channels=BLOCK_OUT_CHANNELS, **text),
                HMV3ControlNet,
            ),
            _control,
        ),
        **v3_builders("hm4"),
        "hm_control_base": (pick(lambda: HMControlNetBase(unet_block_out_channels=BLOCK_OUT_CHANNELS, **text), HMControlNetBase), _control),
        "hm4_control_proj": (pick(lambda: HM4SD15ControlProj(unet_block_out_channels=BLOCK_OUT_CHANNELS), HM4SD15ControlProj), _randomize),
        "hm5_reference": (pick(lambda: HM5ReferenceAdapter(BLOCK_OUT_CHANNELS, UP_CHANNELS), HM5ReferenceAdapter), _randomize),
        "hm5b_reference": (pick(lambda: HM5bReferenceAdapter(BLOCK_OUT_CHANNELS, UP_CHANNELS), HM5bReferenceAdapter), _randomize),
        "hm5c_reference": (pick(lambda: HM5bReferenceAdapter(BLOCK_OUT_CHANNELS, UP_CHANNELS), HM5bReferenceAdapter), _randomize),
        "hm5_motion": (pick(lambda: HM5MotionAdapter(BLOCK_OUT_CHANNELS, UP_CHANNELS), HM5MotionAdapter), _randomize),
        "hm5_control_base": (
            pick(
                lambda: HM5ControlNetBase(mid_channels=V5_CONTROL_MID_CHANNELS, out_channels=BLOCK_OUT_CHANNELS[0], **text),
                HM5ControlNetBase,
            ),
            _control,
        ),
        "hm5_control_proj": (pick(_v5_control_proj, HM5SD15ControlProj), _randomize),
        "hm5c_control_proj": (pick(_v5_control_proj, HM5SD15ControlProj), _randomize),
    }


def build_network(name: str, size: str = "tiny") -> torch.nn.Module:
    """Component `name`'s network as its writer builds it at `size`, before randomising (on the
    meta device under `torch.device("meta")`: shapes without memory)."""
    return _builders(size)[name][0]()


def _writers(size: str = "tiny") -> dict[str, Callable[[Path], object]]:
    """Every component's writer at `size`, in the order the random draws are made (a seed gives the same cache)."""
    half = size == "full"
    networks = {name: _saved(build, prepare, half) for name, (build, prepare) in _builders(size).items()}
    writers = {"sd15": lambda folder: write_sd15(folder, size=size), **networks}
    if size == "tiny":
        writers.update({"esrgan": write_esrgan, "sface": write_face_recognizer})
    return writers


def _v5_control_proj() -> HM5SD15ControlProj:
    return HM5SD15ControlProj(BLOCK_OUT_CHANNELS, V5_CONTROL_MID_CHANNELS, BLOCK_OUT_CHANNELS[0])


def make_tiny(home: Path, seed: int = 0, progress: ProgressCallback = no_progress) -> WeightCache:
    """Write every tiny component into the cache at `home` and record their hashes."""
    return _write(home, _writers("tiny"), seed, progress, "make-tiny")


def make_full_size(home: Path, components: Sequence[str], seed: int = 0, progress: ProgressCallback = no_progress) -> WeightCache:
    """Write full-size random weights of `components` (e.g. `Version.components(...)`; the face
    model, which is no network, is left out) into the cache at `home`, float16 on disk, and
    record their hashes; `load_pipeline` loads them as it loads the released ones. About 2 GB
    for SD1.5, 0.1 to 1.3 GB per adapter."""
    writers = _writers("full")
    unknown = [name for name in components if name not in writers and name != "face_landmarker"]
    if unknown:
        raise HellomemeError(f"no full-size writer for {', '.join(unknown)}")
    return _write(home, {name: write for name, write in writers.items() if name in components}, seed, progress, "full-size weights")


def _write(home: Path, writers: dict[str, Callable[[Path], object]], seed: int, progress: ProgressCallback, task: str) -> WeightCache:
    """Each writer into its component's folder (draws in the writers' order, from `seed`), hashes recorded."""
    cache = WeightCache(home)
    torch.manual_seed(seed)
    for done, (name, write) in enumerate(writers.items()):
        progress(ProgressEvent(task, done, len(writers), unit="component"))
        with libraries_quiet():  # diffusers' save_pretrained draws shard bars of its own
            write(cache.path(name))
        cache.mark_tiny(name)  # "tiny" in the record: random weights written here, checked by their own hashes
    progress(ProgressEvent(task, len(writers), len(writers), unit="component"))
    return cache
