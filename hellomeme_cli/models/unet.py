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
import logging
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from torch import nn

from hellomeme_cli.models.blocks import _batch_to_frames, _frames_to_batch
from hellomeme_cli.models.reference import HMReferenceAdapter

_log = logging.getLogger(__name__)
ReferenceCache = dict[str, torch.Tensor]
ControlFeatures = dict[str, torch.Tensor]

# Control feature keys are `<prefix><block index>`; the prefix says where they are added.
AFTER_DOWN_BLOCK_PREFIXES = ("down_", "down2_")
BEFORE_UP_BLOCK_PREFIXES = ("up_v2_", "up2_v2_")


def _add_control(hidden: torch.Tensor, control: ControlFeatures | None, prefixes: tuple[str, ...], idx: int) -> torch.Tensor:
    """`hidden` plus the control features meant for this point (`hidden` itself when none are)."""
    for key in (f"{prefix}{idx}" for prefix in prefixes):
        if control and key in control:
            hidden = hidden + _frames_to_batch(control[key]).to(hidden.dtype)
    return hidden


@dataclasses.dataclass
class _Call:
    """What the hooks do during one UNet forward (the v3 and v5 calls add their motion modules)."""

    num_frames: int = 1
    adapter: nn.Module | None = None  # the reference adapter
    reference: ReferenceCache | None = None
    control: ControlFeatures | None = None
    capture: ReferenceCache | None = None

    def attend_reference(self, modules: str, idx: int, key: str, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` through the adapter's `modules[idx]` with the cached reference `key`
        (`hidden` itself where the adapter has no such modules or the cache no such entry)."""
        attentions = getattr(self.adapter, modules, None)
        if attentions is None or not self.reference or key not in self.reference:
            return hidden
        return attentions[idx](hidden, self.reference[key], self.num_frames)


class InjectionPoints:
    """Forward hooks on one UNet's blocks; inert unless a call is active.

    One instance per UNet and subclass (see `of`), so a 2D UNet shared by the reference
    net and the stage-1 denoiser carries a single set of hooks per version family.
    After down block i and before up block i, the hooks cache the features (where
    `_caches` says), add the control features of the subclass's prefixes, then run
    the subclass's step (`_after_down_control`, `_before_up_control`).
    """

    _registry: "weakref.WeakKeyDictionary[nn.Module, InjectionPoints]"
    after_down_prefixes: tuple[str, ...]
    before_up_prefixes: tuple[str, ...]

    def __init__(self, unet: UNet2DConditionModel | UNetMotionModel):
        self._call: _Call | None = None
        for idx, block in enumerate(unet.down_blocks):
            block.register_forward_hook(self._after_down_block(idx, _has_cross_attention(block)), with_kwargs=True)
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

    def _caches(self, cross_attention: bool) -> bool:
        """Whether the reference net caches the features at a block's point."""
        raise NotImplementedError

    def _after_down_control(self, call: _Call, idx: int, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _before_up_control(
        self, call: _Call, idx: int, cross_attention: bool, hidden: torch.Tensor, temb: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def _after_mid_block(self, module, args, output):
        return None

    def _after_down_block(self, idx: int, cross_attention: bool):
        def hook(module, args, kwargs, output):
            call = self._call
            if call is None:
                return None
            hidden, skips = output
            if call.capture is not None and self._caches(cross_attention):
                call.capture[f"down_{idx}"] = hidden
            controlled = _add_control(hidden, call.control, self.after_down_prefixes, idx)
            if controlled is not hidden:
                # The official code adds the control in place, and the block's
                # output is also its last skip connection, so the skip sees it too.
                skips = skips[:-1] + (controlled,)
            return self._after_down_control(call, idx, controlled, kwargs["temb"]), skips

        return hook

    def _before_up_block(self, idx: int, cross_attention: bool):
        def hook(module, args, kwargs):
            call = self._call
            if call is None:
                return None
            entering = kwargs["hidden_states"]
            if call.capture is not None and self._caches(cross_attention):
                call.capture[f"up_{idx}"] = entering
            hidden = _add_control(entering, call.control, self.before_up_prefixes, idx)
            hidden = self._before_up_control(call, idx, cross_attention, hidden, kwargs["temb"])
            return None if hidden is entering else (args, {**kwargs, "hidden_states": hidden})

        return hook


class HMInjectionPoints(InjectionPoints):
    """The v1/v2 points (module docstring). The reference net caches, and the adapter
    attends, only at the cross-attention blocks."""

    _registry: "weakref.WeakKeyDictionary[nn.Module, HMInjectionPoints]" = weakref.WeakKeyDictionary()
    after_down_prefixes = AFTER_DOWN_BLOCK_PREFIXES
    before_up_prefixes = BEFORE_UP_BLOCK_PREFIXES

    def _caches(self, cross_attention: bool) -> bool:
        return cross_attention

    def _after_down_control(self, call: _Call, idx: int, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return call.attend_reference("reference_modules_down", idx, f"down_{idx}", hidden)

    def _after_mid_block(self, module, args, output):
        call = self._call
        if call is None:
            return None
        attention = getattr(call.adapter, "reference_modules_mid", None)
        if attention is not None and call.reference and "mid" in call.reference:
            output = attention(output, call.reference["mid"], call.num_frames)
        if call.capture is not None:
            call.capture["mid"] = output
        return output

    def _before_up_control(
        self, call: _Call, idx: int, cross_attention: bool, hidden: torch.Tensor, temb: torch.Tensor
    ) -> torch.Tensor:
        if not cross_attention:
            return hidden
        # up block 0 has no cross-attention, so the adapter's first up module is up block 1's
        return call.attend_reference("reference_modules_up", idx - 1, f"up_{idx}", hidden)


def load_folder(cls, folder: str | Path, **kwargs):
    """`cls.from_pretrained` on a local folder, safetensors only (diffusers would
    otherwise fall back to unpickling a `.bin`), taking the fp16 file where that is
    what the folder holds. As strict as the official code's `from_pretrained` and no more:
    tensors the network lacks are logged and left, as diffusers leaves them."""
    folder = Path(folder)
    fp16_only = not any(folder.glob("*model.safetensors")) and any(folder.glob("*model.fp16.safetensors"))
    model, info = cls.from_pretrained(folder, use_safetensors=True, variant="fp16" if fp16_only else None, output_loading_info=True, **kwargs)
    weights = next(folder.glob("*.fp16.safetensors" if fp16_only else "*.safetensors"), folder)
    unmatched = {kind: list(info.get(f"{kind}_keys") or ()) for kind in ("missing", "unexpected", "mismatched")}
    # diffusers leaves a tensor the file lacks on the meta device: another network's file would load
    # "fine" and fail much later, far from its cause.
    if unmatched["missing"] or unmatched["mismatched"]:
        counts = ", ".join(f"{len(keys)} {kind}" for kind, keys in unmatched.items() if keys)
        raise ValueError(f"{weights} does not hold {cls.__name__}'s tensors ({counts})")
    if unexpected := unmatched["unexpected"]:
        shown = ", ".join(sorted(unexpected)[:3]) + (", ..." if len(unexpected) > 3 else "")
        _log.info("%s: %d tensor(s) %s does not have, left unused: %s", weights, len(unexpected), cls.__name__, shown)
    return model


def _has_cross_attention(block: nn.Module) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


def _batched_timestep(timestep: torch.Tensor | float | int, batch: int, frames: int) -> torch.Tensor | float | int:
    """A per-sample timestep (b,) becomes per-frame (b*f,); a scalar stays a scalar."""
    if torch.is_tensor(timestep) and timestep.ndim == 1 and timestep.numel() == batch and batch > 1:
        return timestep.repeat_interleave(frames)
    return timestep


class HookedUNet(nn.Module):
    """A UNet with the injection points of one version family (`injection_points`), run
    with the settings of one call: the reference nets and denoisers of every version."""

    injection_points: type[InjectionPoints]

    def __init__(self, unet: UNet2DConditionModel | UNetMotionModel):
        super().__init__()
        self.unet = unet
        self._points = self.injection_points.of(unet)

    device = property(lambda self: self.unet.device)
    dtype = property(lambda self: self.unet.dtype)

    @property
    def is_motion(self) -> bool:
        return isinstance(self.unet, UNetMotionModel)

    def _capture(self, latents: torch.Tensor, text_embeds: torch.Tensor, call: _Call) -> ReferenceCache:
        """The UNet at t = 0 on latents (b, 4, h, w) or (b, 4, 1, h, w), already scaled;
        text_embeds (b, 77, C) -> what the hooks cached."""
        if latents.ndim == 5:
            latents = latents[:, :, 0]
        call.capture = {}
        with self._points.active(call):
            self.unet(latents.to(self.unet.dtype), 0, encoder_hidden_states=text_embeds.to(self.unet.dtype))
        return call.capture

    def _denoise(
        self, latents: torch.Tensor, timestep: torch.Tensor | float | int, text_embeds: torch.Tensor, call: _Call
    ) -> torch.Tensor:
        """latents (b, 4, f, h, w); text_embeds (b, 77, C) -> noise (b, 4, f, h, w). A 2D UNet
        sees the frames folded into the batch; a motion UNet sees them as frames."""
        b, _, frames = latents.shape[:3]
        dtype = self.unet.dtype
        text_embeds = text_embeds.to(dtype).repeat_interleave(frames, dim=0)
        with self._points.active(call):
            if self.is_motion:
                return self.unet(latents.to(dtype), timestep, encoder_hidden_states=text_embeds).sample
            sample = _frames_to_batch(latents.to(dtype))
            noise = self.unet(sample, _batched_timestep(timestep, b, frames), encoder_hidden_states=text_embeds).sample
        return _batch_to_frames(noise, frames)


class HMReferenceNet(HookedUNet):
    """The SD1.5 UNet run once per clip at t = 0 on the reference latent; returns the
    features the reference adapter attends to (official `unet_ref`)."""

    injection_points = HMInjectionPoints

    def forward(self, ref_latents: torch.Tensor, text_embeds: torch.Tensor) -> ReferenceCache:
        """ref_latents (b, 4, h, w) or (b, 4, 1, h, w), already scaled; text_embeds (b, 77, C)."""
        return self._capture(ref_latents, text_embeds, _Call())


class DenoiserForward:
    """The one `forward` of every version's denoiser (mixed into a `HookedUNet`); a version says in
    `_call` what a call injects, its motion inputs by keyword."""

    reference_adapter: nn.Module | None

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float | int,
        text_embeds: torch.Tensor,
        reference: ReferenceCache | None = None,
        control: ControlFeatures | None = None,
        **motion,
    ) -> torch.Tensor:
        """latents (b, 4, f, h, w); text_embeds (b, 77, C); reference from the version's reference
        net (batch b); control from its control nets (b, c, f, h', w'); `motion`: the version's
        motion inputs (its `_call`) -> noise (b, 4, f, h, w)."""
        return self._denoise(latents, timestep, text_embeds, self._call(latents.shape[2], reference, control, **motion))

    def _call(self, num_frames: int, reference: ReferenceCache | None, control: ControlFeatures | None) -> _Call:
        return _Call(num_frames=num_frames, adapter=self.reference_adapter, reference=reference, control=control)


class HMDenoisingNet(DenoiserForward, HookedUNet):
    """The denoiser: the SD1.5 UNet (stage 1, frames independent) or the AnimateDiff
    motion UNet (stage 2, frames attend to each other) with the reference adapter
    (HMReferenceNet's cache) and the control features (HMControlNet/HMControlNet2 or
    HMV2ControlNet/HMV2ControlNet2) injected. Inputs and outputs are (b, c, f, h, w).
    """

    injection_points = HMInjectionPoints

    def __init__(self, unet: UNet2DConditionModel | UNetMotionModel, reference_adapter: HMReferenceAdapter | None):
        super().__init__(unet)
        self.reference_adapter = reference_adapter


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
