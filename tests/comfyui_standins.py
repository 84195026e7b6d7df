"""Small stand-ins for the ComfyUI modules hellomeme's nodes import (through hellomeme_cli/comfyui/comfy.py),
as ComfyUI v0.3.64 (a125cd84) has them, so the nodes run in CI without ComfyUI:

- `folder_paths`: models/<kind>, input, output and temp folders under one base folder
- `comfy.utils`: ProgressBar, its updates recorded (and sent through json, as ComfyUI sends them)
- `comfy.model_management`: the device, the interrupt flag (Cancel), `current_loaded_models` and
  `unload_all_models`, which runs the same loop over the list as ComfyUI's `free_memory`
- `comfy_api.latest`: InputImpl.VideoFromFile / VideoFromComponents and Types.VideoComponents
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch


class ProgressBar:
    updates: list[tuple[int, int]] = []  # every (value, total) any bar was given, in order

    def __init__(self, total: int, node_id: str | None = None):
        self.total, self.current = total, 0

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        json.dumps({"value": self.current, "max": self.total})  # what ComfyUI sends the page
        ProgressBar.updates.append((self.current, self.total))

    def update(self, value: int) -> None:
        self.update_absolute(self.current + value)


class InterruptProcessingException(Exception):
    pass


def model_management() -> types.ModuleType:
    module = types.ModuleType("comfy.model_management")
    module.InterruptProcessingException = InterruptProcessingException
    module.interrupt_processing = False
    module.current_loaded_models = []
    module.get_torch_device = lambda: torch.device("cpu")

    def interrupt_current_processing(value: bool = True) -> None:
        module.interrupt_processing = value

    def throw_exception_if_processing_interrupted() -> None:
        if module.interrupt_processing:
            module.interrupt_processing = False
            raise InterruptProcessingException()

    def free_memory(memory_required: float, device: torch.device) -> list:
        """ComfyUI's loop (model_management.free_memory), its smart-memory branch with no memory free."""
        listed = module.current_loaded_models
        can_unload = []
        for i in range(len(listed) - 1, -1, -1):
            entry = listed[i]
            if entry.device == device and not entry.is_dead():
                can_unload.append((-entry.model_offloaded_memory(), sys.getrefcount(entry.model), entry.model_memory(), i))
                entry.currently_used = False
        unloaded = []
        for *_, i in sorted(can_unload):
            logged = f"Unloading {listed[i].model.model.__class__.__name__}"  # ComfyUI logs this first
            if logged and listed[i].model_unload(memory_required):
                unloaded.append(i)
        return [listed.pop(i) for i in sorted(unloaded, reverse=True)]

    module.interrupt_current_processing = interrupt_current_processing
    module.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    module.free_memory = free_memory
    module.unload_all_models = lambda: free_memory(1e30, module.get_torch_device())
    return module


@dataclasses.dataclass
class VideoComponents:
    images: torch.Tensor
    frame_rate: Fraction
    audio: dict | None = None
    metadata: dict | None = None


class VideoFromFile:
    def __init__(self, file: str):
        self.file = file

    def get_stream_source(self) -> str:
        return self.file


class VideoFromComponents:
    def __init__(self, components: VideoComponents):
        self.components = components

    def get_components(self) -> VideoComponents:
        return self.components


def folder_paths(base: Path) -> types.ModuleType:
    module = types.ModuleType("folder_paths")
    folders = {name: base / name for name in ("input", "output", "temp")}
    for folder in [*folders.values(), *(base / "models" / kind for kind in ("checkpoints", "loras", "vae"))]:
        folder.mkdir(parents=True, exist_ok=True)

    def annotated(name: str) -> Path:
        for kind in ("output", "temp", "input"):
            if name.endswith(f" [{kind}]"):
                return folders[kind] / name[: -len(kind) - 3]
        return folders["input"] / name

    def save_path(prefix: str, output_dir: str, width: int = 0, height: int = 0):
        folder = Path(output_dir) / os.path.dirname(prefix)
        folder.mkdir(parents=True, exist_ok=True)
        name = os.path.basename(prefix)
        return str(folder), name, len(list(folder.glob(f"{name}_*"))) + 1, os.path.dirname(prefix), prefix

    module.get_filename_list = lambda kind: sorted(p.name for p in (base / "models" / kind).iterdir())
    module.get_full_path = lambda kind, name: str(base / "models" / kind / name) if (base / "models" / kind / name).is_file() else None
    module.get_input_directory = lambda: str(folders["input"])
    module.get_output_directory = lambda: str(folders["output"])
    module.get_temp_directory = lambda: str(folders["temp"])
    module.get_annotated_filepath = lambda name: str(annotated(name))
    module.exists_annotated_filepath = lambda name: annotated(name).exists()
    module.get_save_image_path = save_path
    return module


def modules(base: Path) -> dict[str, types.ModuleType]:
    """Every stand-in by its module name, for `sys.modules`."""
    comfy, utils, api, latest = (types.ModuleType(name) for name in ("comfy", "comfy.utils", "comfy_api", "comfy_api.latest"))
    utils.ProgressBar = ProgressBar
    latest.InputImpl = types.SimpleNamespace(VideoFromFile=VideoFromFile, VideoFromComponents=VideoFromComponents)
    latest.Types = types.SimpleNamespace(VideoComponents=VideoComponents)
    management = model_management()
    comfy.utils, comfy.model_management, api.latest = utils, management, latest
    return {
        "folder_paths": folder_paths(base), "comfy": comfy, "comfy.utils": utils, "comfy.model_management": management,
        "comfy_api": api, "comfy_api.latest": latest,
    }
