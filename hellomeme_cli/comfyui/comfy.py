"""The one door to ComfyUI's own modules: the nodes run inside ComfyUI's Python, where `folder_paths`,
`comfy.utils`, `comfy.model_management` and `comfy_api` are importable, and reach them only
through here, imported when first needed, so the nodes import without ComfyUI and the tests put
stand-ins for these modules in `sys.modules` (tests/comfyui_standins.py)."""

from __future__ import annotations

import concurrent.futures
import importlib
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch

from hellomeme_cli.front_end import ModelCache
from hellomeme_cli.progress import ProgressEvent


def folder_paths() -> Any:
    """ComfyUI's folder lists: models/checkpoints, loras, vae; the input, output and temp folders."""
    return importlib.import_module("folder_paths")


def _model_management() -> Any:
    return importlib.import_module("comfy.model_management")


def torch_device() -> torch.device:
    """The device ComfyUI computes on (its --cpu, --cuda-device and the like hold)."""
    return _model_management().get_torch_device()


def check_interrupted() -> None:
    """Raises ComfyUI's InterruptProcessingException once Cancel was pressed (the queue goes on)."""
    _model_management().throw_exception_if_processing_interrupted()


def video_from_file(path: Path) -> Any:
    """A VIDEO of a file (SaveVideo copies its streams as they are)."""
    return importlib.import_module("comfy_api.latest").InputImpl.VideoFromFile(str(path))


def video_file(video: Any) -> Path | None:
    """The file a VIDEO reads, where it reads one from disk (LoadVideo's); None for frames in memory."""
    if isinstance(video, importlib.import_module("comfy_api.latest").InputImpl.VideoFromFile):
        source = video.get_stream_source()
        if isinstance(source, str):
            return Path(source)
    return None


class NodeProgress:
    """The library's progress events on the running node's progress bar, a new bar for each stage
    (the sampler's counts its steps), and ComfyUI's Cancel checked at every event and after every
    denoising step (`on_step`): a run stops within one step, between two network calls. Both belong
    to the node's thread: events from other threads (parallel downloads) wait for `wait` to show them."""

    def __init__(self) -> None:
        self.task: str | None = None
        self.bar: Any = None
        self.thread = threading.current_thread()
        self.pending: ProgressEvent | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if threading.current_thread() is not self.thread:
            self.pending = event
            return
        check_interrupted()
        if event.total is None:
            return
        total = int(event.total)  # ComfyUI sends them to the page as JSON, which takes no numpy integer
        if event.task != self.task or self.bar is None:
            self.task, self.bar = event.task, importlib.import_module("comfy.utils").ProgressBar(total)
        self.bar.update_absolute(int(event.completed), total)

    def on_step(self, step: object) -> None:
        """A sampler's `on_step`: Cancel checked, the latents left as they are."""
        check_interrupted()

    def wait(self, work: Callable[[], Any]) -> Any:
        """`work()` done in another thread while this one shows its progress and heeds Cancel (the
        work is then left to end on its own: a download still lands whole, or not at all)."""
        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            future = pool.submit(work)
            while True:
                try:
                    return future.result(timeout=0.25)
                except concurrent.futures.TimeoutError:
                    event, self.pending = self.pending, None
                    self(event) if event is not None else check_interrupted()
        finally:
            pool.shutdown(wait=False)


class HeldPipeline:
    """A loaded pipeline as ComfyUI's model management lists its own models (`current_loaded_models`
    holds `LoadedModel`s; this has the attributes its `free_memory` reads), so its "Unload Models"
    (POST /free) and the room it makes for other models let it go."""

    currently_used = False  # never handed back by `loaded_models(only_currently_used=True)` for reloading

    def __init__(self, key: tuple[str, Hashable], cache: ModelCache, device: torch.device, size: int):
        self.key, self.cache, self.device, self.size = key, cache, device, size
        self.model = self  # free_memory names `model.model`'s class in its log and counts references to `model`

    def is_dead(self) -> bool:
        return False

    def real_model(self) -> Any:
        """The pipeline while it is held (`cleanup_models` drops an entry whose model is gone)."""
        return self.cache.held(self.key)

    def model_memory(self) -> int:
        return self.size if self.real_model() is not None else 0

    def model_loaded_memory(self) -> int:
        return self.model_memory()

    def model_offloaded_memory(self) -> int:
        return 0

    def model_unload(self, memory_to_free: float | None = None, unpatch_weights: bool = True) -> bool:
        self.cache.release(self.key)
        return True


def register(cache: ModelCache) -> None:
    """List in ComfyUI's model management every pipeline `cache` holds, and only those (the
    `ModelCache.on_change` of the nodes' cache: called from a node, never while ComfyUI walks the
    list, which pops the entries it unloads itself)."""
    listed = _model_management().current_loaded_models
    held = cache.keys()
    ours = [entry for entry in listed if isinstance(entry, HeldPipeline)]
    for entry in ours:
        if entry.key not in held:
            listed.remove(entry)
    known = {entry.key for entry in ours}
    for key in held:
        pipe = cache.held(key)
        if key not in known and pipe is not None:
            size = sum(tensor.numel() * tensor.element_size() for network in pipe.networks() for tensor in network.state_dict().values())
            listed.insert(0, HeldPipeline(key, cache, pipe.device, size))
