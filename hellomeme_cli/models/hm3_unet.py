"""HM3ReferenceNet and HM3DenoisingNet: the v3/v4 UNets (official `HM3Denoising3D`,
`HM3DenoisingMotion`) as diffusers' own SD1.5 UNet or AnimateDiff motion UNet with
forward hooks on their blocks, like `unet.py`'s v1/v2 nets, at the v3 points:

- after down block i: the control feature `down3_i` is added (the block's last skip
  connection sees it too), then, with motion pads, `motion_down[i]` (pad `down_i`);
- the mid block: nothing;
- before up block i (all four): `up3_i` is added, then `reference_modules_up[i]`
  (cache `up_i`), then, with motion pads, `motion_up[i]` (pad `up_i`).

The reference net caches the features after every down block (`down_0..3`) and
entering every up block (`up_0..3`), before any control. The same cache of an already
generated frame is a motion pad.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from diffusers import UNet2DConditionModel, UNetMotionModel
from torch import nn

from hellomeme_cli.models.hm3 import HM3MotionAdapter, HM3ReferenceAdapter
from hellomeme_cli.models.unet import ControlFeatures, InjectionPoints, ReferenceCache, _add_control, _batched_timestep, _frames_to_batch

MotionPads = dict[str, torch.Tensor]


@dataclasses.dataclass
class _HM3Call:
    """What the hooks do during one UNet forward."""

    num_frames: int = 1
    reference_adapter: HM3ReferenceAdapter | None = None
    motion_adapter: HM3MotionAdapter | None = None
    reference: ReferenceCache | None = None
    control: ControlFeatures | None = None
    motion_pads: MotionPads | None = None
    capture: ReferenceCache | None = None

    def motion(self, modules: str, idx: int, hidden: torch.Tensor, temb: torch.Tensor, key: str) -> torch.Tensor:
        if self.motion_adapter is None or self.motion_pads is None:
            return hidden
        return getattr(self.motion_adapter, modules)[idx](hidden, self.motion_pads[key], temb, self.num_frames)


class HM3InjectionPoints(InjectionPoints):
    """The v3 hooks (not the v1/v2 ones) on one UNet; inert unless a call is active.
    A UNet shared with the v1/v2 nets carries both sets, each inert outside its calls."""

    _registry: "weakref.WeakKeyDictionary[nn.Module, HM3InjectionPoints]" = weakref.WeakKeyDictionary()

    def __init__(self, unet: UNet2DConditionModel | UNetMotionModel):
        self._call: _HM3Call | None = None
        for idx, block in enumerate(unet.down_blocks):
            block.register_forward_hook(self._after_down_block(idx), with_kwargs=True)
        for idx, block in enumerate(unet.up_blocks):
            block.register_forward_pre_hook(self._before_up_block(idx), with_kwargs=True)

    def _after_down_block(self, idx: int):
        def hook(module, args, kwargs, output):
            call = self._call
            if call is None:
                return None
            hidden, skips = output
            if call.capture is not None:
                call.capture[f"down_{idx}"] = hidden
            controlled = _add_control(hidden, call.control, ("down3_",), idx)
            if controlled is not hidden:
                # The official code adds the control in place, and the block's
                # output is also its last skip connection, so the skip sees it too.
                skips = skips[:-1] + (controlled,)
            hidden = call.motion("motion_down", idx, controlled, kwargs["temb"], f"down_{idx}")
            return hidden, skips

        return hook

    def _before_up_block(self, idx: int):
        def hook(module, args, kwargs):
            call = self._call
            if call is None:
                return None
            entering = kwargs["hidden_states"]
            if call.capture is not None:
                call.capture[f"up_{idx}"] = entering
            hidden = _add_control(entering, call.control, ("up3_",), idx)
            if call.reference_adapter is not None and call.reference and f"up_{idx}" in call.reference:
                hidden = call.reference_adapter.reference_modules_up[idx](hidden, call.reference[f"up_{idx}"], call.num_frames)
            hidden = call.motion("motion_up", idx, hidden, kwargs["temb"], f"up_{idx}")
            return None if hidden is entering else (args, {**kwargs, "hidden_states": hidden})

        return hook


class HM3ReferenceNet(nn.Module):
    """The SD1.5 UNet at t = 0 on one latent frame; returns the features the v3/v4
    reference adapter attends to and the motion modules take as pads (official
    `unet_ref`, `gen_ref_cache`)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self._points = HM3InjectionPoints.of(unet)

    def forward(self, latents: torch.Tensor, text_embeds: torch.Tensor) -> ReferenceCache:
        """latents (b, 4, h, w) or (b, 4, 1, h, w), already scaled; text_embeds (b, 77, C)
        -> {"down_0".."down_3", "up_0".."up_3"}, each (b, c, h', w')."""
        if latents.ndim == 5:
            latents = latents[:, :, 0]
        cache: ReferenceCache = {}
        with self._points.active(_HM3Call(capture=cache)):
            self.unet(latents.to(self.unet.dtype), 0, encoder_hidden_states=text_embeds.to(self.unet.dtype))
        return cache

    def motion_pads(self, first: torch.Tensor, last: torch.Tensor, text_embeds: torch.Tensor) -> MotionPads:
        """The pads of a window from the latents (b, 4, h, w) of its already generated
        first and last frames -> each (b, c, 2, h', w'), as `HM3DenoisingNet` takes them."""
        caches = [self(latent, text_embeds) for latent in (first, last)]
        return {key: torch.stack([caches[0][key], caches[1][key]], dim=2) for key in caches[0]}


class HM3DenoisingNet(nn.Module):
    """The v3/v4 denoiser: the SD1.5 UNet (frames independent; official `HM3Denoising3D`)
    or the AnimateDiff motion UNet (official `HM3DenoisingMotion`) with the reference
    adapter, the control features and, given motion pads, the motion adapter.
    Inputs and outputs are (b, c, f, h, w)."""

    def __init__(
        self,
        unet: UNet2DConditionModel | UNetMotionModel,
        reference_adapter: HM3ReferenceAdapter | None = None,
        motion_adapter: HM3MotionAdapter | None = None,
    ):
        super().__init__()
        self.unet = unet
        self.reference_adapter = reference_adapter
        self.motion_adapter = motion_adapter
        self._points = HM3InjectionPoints.of(unet)

    @property
    def is_motion(self) -> bool:
        return isinstance(self.unet, UNetMotionModel)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float | int,
        text_embeds: torch.Tensor,
        reference: ReferenceCache | None = None,
        control: ControlFeatures | None = None,
        motion_pads: MotionPads | None = None,
    ) -> torch.Tensor:
        """latents (b, 4, f, h, w); text_embeds (b, 77, C); reference from HM3ReferenceNet
        (batch b); control from HMV3ControlNet or HM4SD15ControlProj (b, c, f, h', w');
        motion_pads from HM3ReferenceNet.motion_pads (the official `use_motion=True`)
        -> noise (b, 4, f, h, w)."""
        if motion_pads is not None and self.motion_adapter is None:
            raise ValueError("HM3DenoisingNet got motion pads but has no motion adapter")
        b, _, frames, h, w = latents.shape
        dtype = self.unet.dtype
        text_embeds = text_embeds.to(dtype).repeat_interleave(frames, dim=0)
        call = _HM3Call(
            num_frames=frames,
            reference_adapter=self.reference_adapter,
            motion_adapter=self.motion_adapter,
            reference=reference,
            control=control,
            motion_pads=motion_pads,
        )
        with self._points.active(call):
            if self.is_motion:
                return self.unet(latents.to(dtype), timestep, encoder_hidden_states=text_embeds).sample
            sample = _frames_to_batch(latents.to(dtype))
            noise = self.unet(sample, _batched_timestep(timestep, b, frames), encoder_hidden_states=text_embeds).sample
        return noise.reshape(b, frames, *noise.shape[1:]).transpose(1, 2)
