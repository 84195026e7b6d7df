"""The model options, checked and resolved before any network loads: the device and dtype, a
checkpoint or LoRA given as a file, a preset name or a Hugging Face repo id."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.progress import ProgressCallback, no_progress
from hellomeme_cli.settings import ModelOptions
from hellomeme_cli.weights.cache import WeightCache
from hellomeme_cli.weights.checkpoints import PICKLE_SUFFIXES
from hellomeme_cli.weights.presets import checkpoint_preset, fetch_preset, lora_preset

WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CHECKPOINT_PATTERNS = ["model_index.json", "*/*.json", "tokenizer/*.txt", "unet/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors"]


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


# Where Linux lists the CPU's features, and the ones that compute bfloat16 natively: x86's AVX512-BF16
# and AMX tiles, Arm's BF16 extension. Without one bfloat16 is emulated and slower than float32.
CPU_REPORT = Path("/proc/cpuinfo")
BFLOAT16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16")


def native_bfloat16() -> str | None:
    """The CPU feature that computes bfloat16 natively ("" when the CPU has none), read from
    `CPU_REPORT`; None where there is no such report (not Linux)."""
    try:
        report = CPU_REPORT.read_text(errors="replace")
    except OSError:
        return None
    features = {word for line in report.splitlines() if line.split(":")[0].strip() in ("flags", "Features") for word in line.split(":", 1)[-1].split()}
    return next((feature for feature in BFLOAT16_FEATURES if feature in features), "")


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
