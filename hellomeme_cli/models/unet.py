"""HMReferenceNet and HMDenoisingNet: diffusers' own SD1.5 UNet and AnimateDiff motion
UNet, with HelloMeme's reference and control features read and written at the
official points through forward hooks on the UNet blocks.

The points (official `HMDenoising3D.forward` / `HMDenoisingMotion.forward`):

- after down block i: control features `down_i` / `down2_i` (v1) are added, then the
  reference attention `reference_modules_down[i]` (where `down_i` is cached);
- after the mid block: `reference_modules_mid`;
- before up block i: control features `up_v2_i` / `up2_v2_i` (v2) are added, then,
  for the cross-attention up blocks, `reference_modules_up[i - 1]` (cache `up_i`).

Which control features go where is read from their keys alone, and a reference
attention the adapter does not have (v2 has no down/mid ones) is skipped, so one
set of hooks serves every version.

The reference net caches the features at those same points (`down_i` after the
cross-attention down blocks, `mid`, `up_i` before the cross-attention up blocks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from torch import nn

from hellomeme_cli.models.reference import HMReferenceAdapter

ReferenceCache = dict[str, torch.Tensor]
ControlFeatures = dict[str, torch.Tensor]

# Control feature keys are `<prefix><block index>`; the prefix says where they are added.
AFTER_DOWN_BLOCK_PREFIXES = ("down_", "down2_")
BEFORE_UP_BLOCK_PREFIXES = ("up_v2_", "up2_v2_")


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) -> (b*f, c, h, w)."""
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def _add_control(hidden: torch.Tensor, control: ControlFeatures | None, prefixes: tuple[str, ...], idx: int) -> torch.Tensor:
    """`hidden` plus the control features meant for this point (`hidden` itself when none are)."""
    for key in (f"{prefix}{idx}" for prefix in prefixes):
        if control and key in control:
            hidden = hidden + _frames_to_batch(control[key]).to(hidden.dtype)
    return hidden


@dataclasses.dataclass
class _Call:
    """What the hooks do during one UNet forward."""

    num_frames: int = 1
    adapter: HMReferenceAdapter | None = None
    reference: ReferenceCache | None = None
    control: ControlFeatures | None = None
    capture: ReferenceCache | None = None


class InjectionPoints:
    """Forward hooks on one UNet's blocks; inert unless a call is active.

    One instance per UNet (see `of`), so a 2D UNet shared by the reference net and
    the stage-1 denoiser carries a single set of hooks.
    """

    _registry: "weakref.WeakKeyDictionary[nn.Module, InjectionPoints]" = weakref.WeakKeyDictionary()

    def __init__(self, unet: UNet2DConditionModel | UNetMotionModel):
        self._call: _Call | None = None
        for idx, block in enumerate(unet.down_blocks):
            block.register_forward_hook(self._after_down_block(idx, _has_cross_attention(block)))
        unet.mid_block.register_forward_hook(self._after_mid_block)
        for idx, block in enumerate(unet.up_blocks):
            block.register_forward_pre_hook(self._before_up_block(idx, _has_cross_attention(block)), with_kwargs=True)

    @classmethod
    def of(cls, unet: nn.Module) -> "InjectionPoints":
        if unet not in cls._registry:
            cls._registry[unet] = cls(unet)
        return cls._registry[unet]

    @contextlib.contextmanager
    def active(self, call: _Call) -> Iterator[None]:
        if self._call is not None:
            raise RuntimeError("a UNet with HelloMeme injection points is already running")
        self._call = call
        try:
            yield
        finally:
            self._call = None

    def _after_down_block(self, idx: int, cross_attention: bool):
        def hook(module, args, output):
            call = self._call
            if call is None:
                return None
            hidden, skips = output
            if call.capture is not None and cross_attention:
                call.capture[f"down_{idx}"] = hidden
            controlled = _add_control(hidden, call.control, AFTER_DOWN_BLOCK_PREFIXES, idx)
            if controlled is not hidden:
                # The official code adds the control in place, and the block's
                # output is also its last skip connection, so the skip sees it too.
                hidden = controlled
                skips = skips[:-1] + (hidden,)
            modules = getattr(call.adapter, "reference_modules_down", None)
            if modules is not None and call.reference and f"down_{idx}" in call.reference:
                hidden = modules[idx](hidden, call.reference[f"down_{idx}"], call.num_frames)
            return hidden, skips

        return hook

    def _after_mid_block(self, module, args, output):
        call = self._call
        if call is None:
            return None
        module_ = getattr(call.adapter, "reference_modules_mid", None)
        if module_ is not None and call.reference and "mid" in call.reference:
            output = module_(output, call.reference["mid"], call.num_frames)
        if call.capture is not None:
            call.capture["mid"] = output
        return output

    def _before_up_block(self, idx: int, cross_attention: bool):
        def hook(module, args, kwargs):
            call = self._call
            if call is None:
                return None
            entering = kwargs["hidden_states"]
            if call.capture is not None and cross_attention:
                call.capture[f"up_{idx}"] = entering
            hidden = _add_control(entering, call.control, BEFORE_UP_BLOCK_PREFIXES, idx)
            modules = getattr(call.adapter, "reference_modules_up", None)
            if cross_attention and modules is not None and call.reference and f"up_{idx}" in call.reference:
                hidden = modules[idx - 1](hidden, call.reference[f"up_{idx}"], call.num_frames)
            return None if hidden is entering else (args, {**kwargs, "hidden_states": hidden})

        return hook


def load_folder(cls, folder: str | Path, **kwargs):
    """`cls.from_pretrained` on a local folder, safetensors only (diffusers would
    otherwise fall back to unpickling a `.bin`), taking the fp16 file where that is
    what the folder holds."""
    folder = Path(folder)
    fp16_only = not any(folder.glob("*model.safetensors")) and any(folder.glob("*model.fp16.safetensors"))
    model, info = cls.from_pretrained(folder, use_safetensors=True, variant="fp16" if fp16_only else None, output_loading_info=True, **kwargs)
    # diffusers leaves a tensor the file lacks on the meta device and ignores the file's others:
    # another network's file would load "fine" and fail much later, far from its cause.
    unmatched = {kind: len(info.get(f"{kind}_keys") or ()) for kind in ("missing", "unexpected", "mismatched")}
    if any(unmatched.values()):
        counts = ", ".join(f"{count} {kind}" for kind, count in unmatched.items() if count)
        weights = next(folder.glob("*.fp16.safetensors" if fp16_only else "*.safetensors"), folder)
        raise ValueError(f"{weights} does not hold {cls.__name__}'s tensors ({counts})")
    return model


def _has_cross_attention(block: nn.Module) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


def _batched_timestep(timestep: torch.Tensor | float | int, batch: int, frames: int) -> torch.Tensor | float | int:
    """A per-sample timestep (b,) becomes per-frame (b*f,); a scalar stays a scalar."""
    if torch.is_tensor(timestep) and timestep.ndim == 1 and timestep.numel() == batch and batch > 1:
        return timestep.repeat_interleave(frames)
    return timestep


class HMReferenceNet(nn.Module):
    """The SD1.5 UNet run once per clip at t = 0 on the reference latent; returns the
    features the reference adapter attends to (official `unet_ref`)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self._points = InjectionPoints.of(unet)

    device = property(lambda self: self.unet.device)
    dtype = property(lambda self: self.unet.dtype)

    def forward(self, ref_latents: torch.Tensor, text_embeds: torch.Tensor) -> ReferenceCache:
        """ref_latents (b, 4, h, w) or (b, 4, 1, h, w), already scaled; text_embeds (b, 77, C)."""
        if ref_latents.ndim == 5:
            ref_latents = ref_latents[:, :, 0]
        cache: ReferenceCache = {}
        with self._points.active(_Call(capture=cache)):
            self.unet(ref_latents.to(self.unet.dtype), 0, encoder_hidden_states=text_embeds.to(self.unet.dtype))
        return cache


class HMDenoisingNet(nn.Module):
    """The denoiser: the SD1.5 UNet (stage 1, frames independent) or the AnimateDiff
    motion UNet (stage 2, frames attend to each other) with the reference adapter
    and the control features injected. Inputs and outputs are (b, c, f, h, w).
    """

    def __init__(self, unet: UNet2DConditionModel | UNetMotionModel, reference_adapter: HMReferenceAdapter | None):
        super().__init__()
        self.unet = unet
        self.reference_adapter = reference_adapter
        self._points = InjectionPoints.of(unet)

    @property
    def is_motion(self) -> bool:
        return isinstance(self.unet, UNetMotionModel)

    device = property(lambda self: self.unet.device)
    dtype = property(lambda self: self.unet.dtype)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float | int,
        text_embeds: torch.Tensor,
        reference: ReferenceCache | None = None,
        control: ControlFeatures | None = None,
    ) -> torch.Tensor:
        """latents (b, 4, f, h, w); text_embeds (b, 77, C); reference from HMReferenceNet
        (batch b); control from the control nets of one version, e.g. HMControlNet/HMControlNet2
        or HMV2ControlNet/HMV2ControlNet2 (b, c, f, h', w') -> noise (b, 4, f, h, w)."""
        b, _, frames, h, w = latents.shape
        dtype = self.unet.dtype
        text_embeds = text_embeds.to(dtype).repeat_interleave(frames, dim=0)
        call = _Call(num_frames=frames, adapter=self.reference_adapter, reference=reference, control=control)
        with self._points.active(call):
            if self.is_motion:
                noise = self.unet(latents.to(dtype), timestep, encoder_hidden_states=text_embeds).sample
            else:
                sample = _frames_to_batch(latents.to(dtype))
                timestep = _batched_timestep(timestep, b, frames)
                noise = self.unet(sample, timestep, encoder_hidden_states=text_embeds).sample
                noise = noise.reshape(b, frames, *noise.shape[1:]).transpose(1, 2)
        return noise


def motion_unet(unet: UNet2DConditionModel, motion_adapter: MotionAdapter) -> UNetMotionModel:
    """The AnimateDiff motion UNet built around `unet`'s own parameters and the
    adapter's motion modules: nothing is copied, so stage 1 and stage 2 share one
    set of SD1.5 weights in memory (the official code keeps three copies)."""
    motion_adapter.to(device=unet.device, dtype=unet.dtype)
    with init_empty_weights(include_buffers=False):
        model = UNetMotionModel.from_unet2d(unet, motion_adapter, load_weights=False)
    shared = itertools.chain(
        unet.named_parameters(), unet.named_buffers(), motion_adapter.named_parameters(), motion_adapter.named_buffers()
    )
    target = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    for name, tensor in shared:
        if name not in target:
            raise ValueError(f"motion UNet has no tensor {name!r}; the motion adapter does not fit this UNet")
        if target[name].shape != tensor.shape:
            raise ValueError(
                f"motion UNet tensor {name!r} has shape {tuple(target[name].shape)}, "
                f"the weights {tuple(tensor.shape)}; the motion adapter does not fit this UNet"
            )
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(tensor, nn.Parameter):
            owner._parameters[leaf] = tensor
        else:
            owner._buffers[leaf] = tensor
        del target[name]
    missing = [name for name, tensor in target.items() if tensor.is_meta]
    if missing:
        raise ValueError(f"motion UNet tensors not found in the UNet or motion adapter: {', '.join(missing[:5])}")
    return model.to(unet.device)
