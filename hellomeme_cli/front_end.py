"""What the front ends that serve many runs share (the Gradio app, the ComfyUI nodes): loaded
pipelines kept by their model options, and the values a setting is offered with."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from hellomeme_cli import api
from hellomeme_cli.progress import ProgressCallback
from hellomeme_cli.settings import DTYPES, MOTIONS, POSES, UPSCALE_CHOICES, WEIGHT_SUFFIXES, from_values
from hellomeme_cli.versions import FEW_STEP, SCHEDULERS, VERSIONS
from hellomeme_cli.weights.cache import WeightCache
from hellomeme_cli.weights.presets import all_presets

BASE_CHECKPOINT = next(preset.name for preset in all_presets() if preset.kind == "base")  # SD1.5 itself: no swap
MODELS_KEPT = 2  # loaded pipelines kept (video and image, or two checkpoints); the oldest is let go
# The values of the settings with a fixed list (a front end may add its own "the default" entry).
FIXED_CHOICES: dict[str, tuple] = {
    "dtype": DTYPES, "pose": POSES, "motion": MOTIONS, "upscale": UPSCALE_CHOICES, "scheduler": tuple(SCHEDULERS), "few_step": tuple(FEW_STEP),
    "control": tuple(sorted({name for version in VERSIONS.values() for name in version.controls})),
}


class ModelCache:
    """Loaded pipelines by (mode, ModelOptions), the least recently used let go beyond `size`, as
    the official app's pipeline_dict keeps one per configuration. `on_change` is told after each
    load, and the oldest let go for it (ComfyUI's nodes tell its model management what is held)."""

    def __init__(self, cache: WeightCache, size: int = MODELS_KEPT, on_change: Callable[[], None] | None = None):
        self.cache, self.size, self.on_change = cache, size, on_change
        self._pipes: OrderedDict[tuple[str, Any], Any] = OrderedDict()
        self._lock = threading.RLock()

    @staticmethod
    def key(mode: str, values: dict[str, Any]) -> tuple[str, Hashable]:
        """What tells pipelines apart: the mode and the model options these settings (by name) make."""
        return mode, from_values(values).models

    def get(self, mode: str, values: dict[str, Any], progress: ProgressCallback):
        """The pipeline for these model settings (by name, as the inputs give them), loaded on first use."""
        key = self.key(mode, values)
        with self._lock:
            if key in self._pipes:
                self._pipes.move_to_end(key)
                return self._pipes[key]
            while len(self._pipes) >= self.size:
                self._pipes.popitem(last=False)
            options_by_name = {name: value for name, value in values.items() if name != "version"}
            if "loras" in options_by_name:
                options_by_name["lora"] = options_by_name.pop("loras")
            try:
                pipe = api.load_pipeline(key[1].version, mode=mode, cache=self.cache, progress=progress, **options_by_name)
                self._pipes[key] = pipe
            finally:
                if self.on_change is not None:
                    self.on_change()
            return pipe

    def release(self, key: tuple[str, Hashable]) -> bool:
        """Let the pipeline of `key` go (its memory is freed once no run holds it); whether it was held."""
        with self._lock:
            return self._pipes.pop(key, None) is not None

    def keys(self) -> list[tuple[str, Hashable]]:
        with self._lock:
            return list(self._pipes)

    def held(self, key: tuple[str, Hashable]) -> Any:
        """The pipeline of `key` if it is loaded (without counting as a use), else None."""
        with self._lock:
            return self._pipes.get(key)

    def __len__(self) -> int:
        return len(self._pipes)


def cached_weights(folder: Path) -> list[str]:
    """What a cache folder holds: weight files put there, and the Hugging Face repos a run
    downloaded into it (`models--OWNER--NAME`, offered as OWNER/NAME)."""
    if not folder.is_dir():
        return []
    files = [str(path) for path in folder.iterdir() if path.is_file() and path.suffix in WEIGHT_SUFFIXES]
    repos = ["/".join(path.name.split("--")[1:]) for path in folder.glob("models--*--*") if path.is_dir()]
    return sorted(files) + sorted(repos)


def checkpoint_choices(cache: WeightCache) -> list[str]:
    """The checkpoint presets (the base, SD1.5, first), then the checkpoints in the cache."""
    presets = [preset.name for preset in all_presets() if preset.kind in ("base", "checkpoint")]
    return presets + cached_weights(cache.home / "checkpoints")


def lora_choices(cache: WeightCache) -> list[str]:
    """The LoRA presets, then the LoRAs in the cache."""
    return [preset.name for preset in all_presets() if preset.kind == "lora"] + cached_weights(cache.home / "loras")
