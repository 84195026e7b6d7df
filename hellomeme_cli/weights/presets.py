"""The official app's checkpoints and LoRAs by name (its hellomeme/model_config.json):
`--checkpoint RealisticVisionV60B1`, `--lora MoreDetails:0.8`, listed by `hellomeme weights presets`;
and the released SD1.5 distillation LoRAs the `--few-step` recipes (versions.FEW_STEP) fuse.

A preset is a weight component made on the fly (the repo and the files of `PRESETS`), so it is
fetched the way the lock's components are: into the Hugging Face cache on first use, checked
against the hub's hash, found there without network afterwards.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hellomeme_cli.progress import ProgressCallback, no_progress
from hellomeme_cli.weights.cache import Component, LockedFile, WeightCache

# What a checkpoint preset's repo (a diffusers SD1.5 folder) gives the run: the networks a
# swapped checkpoint replaces (its UNet, VAE and text encoder), in diffusers' default files.
CHECKPOINT_FILES = (
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
)
LORA_REPO = "songkey/loras_sd_1_5"

# name: (kind, Hugging Face repo, file in it: a LoRA's; "" for a checkpoint's CHECKPOINT_FILES).
# "base" is SD1.5 itself: the run's base model, no swap.
PRESETS: dict[str, tuple[str, str, str]] = {
    "SD1.5": ("base", "songkey/stable-diffusion-v1-5", ""),
    "RealisticVisionV60B1": ("checkpoint", "songkey/realisticVisionV60B1_v51VAE", ""),
    "DisneyPixarCartoonB": ("checkpoint", "songkey/disney-pixar-cartoon-b", ""),
    "toonyou_beta6": ("checkpoint", "songkey/toonyou_beta6", ""),
    "LZ_2DCartoon_V2": ("checkpoint", "songkey/LZ_2DCartoon_V2", ""),
    "meinamix_v12Final": ("checkpoint", "songkey/meinamix_v12Final", ""),
    "animedark_v10": ("checkpoint", "songkey/animedark_v10", ""),
    "absolutereality_v181": ("checkpoint", "songkey/absolutereality_v181", ""),
    "dreamshaper_8": ("checkpoint", "songkey/dreamshaper_8", ""),
    "epicphotogasm_ultimateFidelity": ("checkpoint", "songkey/epicphotogasm_ultimateFidelity", ""),
    "epicrealism_naturalSinRC1VAE": ("checkpoint", "songkey/epicrealism_naturalSinRC1VAE", ""),
    "xxmix9realistic_v40": ("checkpoint", "songkey/xxmix9realistic_v40", ""),
    "cyberrealistic_v80": ("checkpoint", "songkey/cyberrealistic_v80", ""),
    "animeanything_v10": ("checkpoint", "songkey/animeanything_v10", ""),
    "BabyFaceV1": ("lora", LORA_REPO, "baby_face_v1.safetensors"),
    "MoreDetails": ("lora", LORA_REPO, "more_details.safetensors"),
    "PixelPortraitV1": ("lora", LORA_REPO, "pixel-portrait-v1.safetensors"),
    "Drawing": ("lora", LORA_REPO, "Drawing.safetensors"),
    "anime_extract": ("lora", LORA_REPO, "anime_extract.safetensors"),
    "animemix_v3_offset": ("lora", LORA_REPO, "animemix_v3_offset.safetensors"),
    "animeoutlineV4_16": ("lora", LORA_REPO, "animeoutlineV4_16.safetensors"),
    "ghibli_anime_v1": ("lora", LORA_REPO, "ghibli_anime_v1.safetensors"),
    "zyd232_InkStyle_v1_0": ("lora", LORA_REPO, "zyd232_InkStyle_v1_0.safetensors"),
}
# Few-step distillation LoRAs for SD1.5, from their authors' repos (not the official app's).
DISTILLATION_LORAS: dict[str, tuple[str, str, str]] = {
    "LCM-LoRA-SD15": ("lora", "latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors"),
    "TCD-SD15-LoRA": ("lora", "h1t/TCD-SD15-LoRA", "pytorch_lora_weights.safetensors"),
    "Hyper-SD15-8steps": ("lora", "ByteDance/Hyper-SD", "Hyper-SD15-8steps-lora.safetensors"),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    kind: str  # "base", "checkpoint" or "lora"
    repo: str
    files: tuple[str, ...]  # in the repo; none for the base

    @property
    def component(self) -> Component:
        """The preset as a weight component (so the weight cache fetches, checks and finds it)."""
        option = "--lora" if self.kind == "lora" else "--checkpoint"
        return Component(
            name=f"{self.kind}-{self.name}",
            description=f"the few-step distillation LoRA {self.name}" if self.name in DISTILLATION_LORAS else f"the official app's {self.kind} preset {self.name}",
            files=tuple(LockedFile(path) for path in self.files),
            licence="",
            needed_for=(f"{option} {self.name}",),
            repo=self.repo,
            revision="main",
        )


def all_presets() -> list[Preset]:
    """Every preset, in the official app's order (checkpoints, then LoRAs), then the distillation LoRAs."""
    return [
        Preset(name, kind, repo, (file,) if file else CHECKPOINT_FILES if kind == "checkpoint" else ())
        for name, (kind, repo, file) in {**PRESETS, **DISTILLATION_LORAS}.items()
    ]


def find_preset(name: str | Path, kinds: tuple[str, ...]) -> Preset | None:
    """The preset of one of `kinds` called `name` (any letter case), unless `name` is an existing
    file or folder: a user's own file of that name is meant."""
    if Path(name).expanduser().exists():
        return None
    wanted = str(name).casefold()
    return next((preset for preset in all_presets() if preset.kind in kinds and preset.name.casefold() == wanted), None)


def checkpoint_preset(name: str | Path) -> Preset | None:
    return find_preset(name, ("base", "checkpoint"))


def lora_preset(name: str | Path) -> Preset | None:
    return find_preset(name, ("lora",))


def _cache_for(preset: Preset, cache: WeightCache) -> WeightCache:
    component = preset.component
    return WeightCache(cache.home, lock={component.name: component}, hub_cache=cache.hub_cache)


def fetch_preset(preset: Preset, cache: WeightCache, progress: ProgressCallback = no_progress) -> Path:
    """The preset's files, downloaded into the Hugging Face cache when not there yet (hash-checked,
    as `hellomeme weights fetch` does): a checkpoint's folder, a LoRA's file."""
    preset_cache, name = _cache_for(preset, cache), preset.component.name
    preset_cache.fetch([name], progress)
    folder = preset_cache.require([name])[name]
    return folder / preset.files[0] if preset.kind == "lora" else folder


def is_fetched(preset: Preset, cache: WeightCache) -> bool:
    """Whether every file of the preset is in the caches (no network)."""
    return all(state.state == "ok" for state in _cache_for(preset, cache).states())
