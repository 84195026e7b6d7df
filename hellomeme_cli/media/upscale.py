"""`--upscale 2`: the official app's Real-ESRGAN x2 (`RealESRGAN_x2plus.pth` from `songkey/ESRGAN`)
on the generated frames, one frame at a time as they go to the encoder.

`Upscaler.upscale` computes what the official `RealESRGANer.enhance` does for an 8-bit colour
frame: reflect pre-padding on the right and bottom, reflect padding to a multiple of the
network's fold, the network on the whole frame or tile by tile (each tile read with `tile_pad`
pixels of context, only its own part kept), the padding cut off, clamping, rounding to uint8,
and a Lanczos resize when the output scale is not the network's. Frames are RGB here; the
official code's BGR in and out, with its swap to RGB for the network, is the same computation.
docs/usage.md says how it is used.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from hellomeme_cli.errors import HellomemeError, first_line
from hellomeme_cli.models.rrdbnet import UNSHUFFLE, RRDBNet

COMPONENT = "esrgan"  # its weight component in weights.lock
WEIGHTS_FILE = "RealESRGAN_x2plus.pth"
# The official `RealESRGANer` defaults for padding. `tile=None` (the default): a frame up to
# WHOLE_FRAME pixels a side is processed whole, exactly as the official app does (its 512-pixel
# frames, about 1.5 GB of float32 activations), a larger one in tiles of WHOLE_FRAME input pixels.
WHOLE_FRAME = 512
TILE_PAD = 10
PRE_PAD = 10
# Released Real-ESRGAN files keep the weights under one of these keys, the EMA ones preferred.
STATE_KEYS = ("params_ema", "params")


def components(scale: int) -> list[str]:
    """The weight components `--upscale scale` adds to a run."""
    return [COMPONENT] if scale != 1 else []


def read_rrdbnet_state(path: Path) -> dict[str, torch.Tensor]:
    """The network's tensors from a released .pth (read with `weights_only=True`: a file that
    needs pickle code is refused) or a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise HellomemeError(f"{path}: no such upscaler weights file")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded: object = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise HellomemeError(f"{path}: cannot read the upscaler weights as safetensors: {first_line(err)}") from None
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            what = f"Python objects besides weights ({found.group(1)})" if found else "data torch.load(weights_only=True) refuses"
            raise HellomemeError(f"{path}: the upscaler weights hold {what}; hellomeme loads no pickle code, use a .safetensors copy") from None
        except Exception as err:  # torch.load reports damaged files with many exception types
            raise HellomemeError(f"{path}: cannot read the upscaler weights: {first_line(err)}") from None
    if isinstance(loaded, dict):
        loaded = next((loaded[key] for key in STATE_KEYS if key in loaded), loaded)
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise HellomemeError(f"{path}: not an RRDBNet state dict (expected tensors, or tensors under {' or '.join(STATE_KEYS)})")
    return loaded


def load_rrdbnet(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> RRDBNet:
    """The network of a released file, its shape read from the tensors, every tensor required."""
    state = read_rrdbnet_state(path)
    try:
        model = RRDBNet(**RRDBNet.shape_of(state))
        model.load_state_dict(state, strict=True)
    except (KeyError, ValueError, RuntimeError) as err:
        raise HellomemeError(f"{path}: not an RRDBNet (Real-ESRGAN) state dict: {first_line(err)}") from None
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


class Upscaler:
    """Enlarges (H, W, 3) uint8 RGB frames with `model`, by `outscale` (default: the network's
    scale). `tile` (input pixels, 0: the whole frame at once; None: whole up to WHOLE_FRAME
    pixels a side, else tiles of WHOLE_FRAME), `tile_pad` and `pre_pad` as in the official
    `RealESRGANer`; the network's dtype is the one it computes in (float16 is the official
    `half=True`)."""

    def __init__(
        self, model: RRDBNet, *, tile: int | None = None, tile_pad: int = TILE_PAD, pre_pad: int = PRE_PAD, outscale: float | None = None
    ):
        self.model, self.tile, self.tile_pad, self.pre_pad = model, tile, tile_pad, pre_pad
        self.scale = model.scale
        self.outscale = float(outscale if outscale is not None else model.scale)
        self._parameter = next(model.parameters())

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the frame that a (height, width) frame becomes."""
        return int(height * self.outscale), int(width * self.outscale)

    @torch.no_grad()
    def upscale(self, frame: np.ndarray) -> np.ndarray:
        """One frame, enlarged."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frames to upscale must be (H, W, 3) uint8, not {frame.shape} {frame.dtype}")
        height, width = frame.shape[:2]
        image = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float() / 255.0
        image = image.to(device=self._parameter.device, dtype=self._parameter.dtype)
        if self.pre_pad:
            image = F.pad(image, (0, self.pre_pad, 0, self.pre_pad), "reflect")
        fold = UNSHUFFLE[self.scale]
        mod_h, mod_w = -image.shape[2] % fold, -image.shape[3] % fold
        if mod_h or mod_w:
            image = F.pad(image, (0, mod_w, 0, mod_h), "reflect")
        tile = self.tile if self.tile is not None else (0 if max(height, width) <= WHOLE_FRAME else WHOLE_FRAME)
        output = self._tiled(image, tile) if tile > 0 else self.model(image)
        output = output[:, :, : height * self.scale, : width * self.scale]
        output = (output[0].float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        if self.outscale != self.scale:
            out_h, out_w = self.output_size(height, width)
            output = cv2.resize(output, (out_w, out_h), interpolation=cv2.INTER_LANCZOS4)
        return output

    def _tiled(self, image: torch.Tensor, tile: int) -> torch.Tensor:
        """The network tile by tile: each tile of `tile` pixels read with `self.tile_pad` pixels of its
        neighbours around it, and only the tile's own part of the result kept."""
        _, channels, height, width = image.shape
        output = image.new_zeros((1, channels, height * self.scale, width * self.scale))
        for top in range(0, math.ceil(height / tile) * tile, tile):
            for left in range(0, math.ceil(width / tile) * tile, tile):
                bottom, right = min(top + tile, height), min(left + tile, width)
                pad_top, pad_left = max(top - self.tile_pad, 0), max(left - self.tile_pad, 0)
                pad_bottom, pad_right = min(bottom + self.tile_pad, height), min(right + self.tile_pad, width)
                result = self.model(image[:, :, pad_top:pad_bottom, pad_left:pad_right])
                s = self.scale
                inner_top, inner_left = (top - pad_top) * s, (left - pad_left) * s
                output[:, :, top * s : bottom * s, left * s : right * s] = result[
                    :, :, inner_top : inner_top + (bottom - top) * s, inner_left : inner_left + (right - left) * s
                ]
        return output

    def __call__(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Streams: each frame is enlarged when it is asked for."""
        for frame in frames:
            yield self.upscale(frame)


def load_upscaler(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, **options) -> Upscaler:
    """The official app's upscaler from the `esrgan` component's folder; `options` go to `Upscaler`."""
    return Upscaler(load_rrdbnet(Path(folder) / WEIGHTS_FILE, device, dtype), **options)
