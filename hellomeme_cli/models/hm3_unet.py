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
from hellomeme_cli.models.unet import ControlFeatures, DenoiserForward, HookedUNet, InjectionPoints, ReferenceCache, _Call

MotionPads = dict[str, torch.Tensor]


@dataclasses.dataclass
class _HM3Call(_Call):
    """What the hooks do during one UNet forward: `_Call`'s, and the motion modules
    where motion pads are given."""

    motion_adapter: HM3MotionAdapter | None = None
    motion_pads: MotionPads | None = None

    def motion(self, modules: str, idx: int, hidden: torch.Tensor, temb: torch.Tensor, key: str) -> torch.Tensor:
        if self.motion_adapter is None or self.motion_pads is None:
            return hidden
        return getattr(self.motion_adapter, modules)[idx](hidden, self.motion_pads[key], temb, self.num_frames)


class HM3InjectionPoints(InjectionPoints):
    """The v3 points (module docstring), also v5's, whose call brings its own motion
    modules; not the v1/v2 ones. A UNet shared with the v1/v2 nets carries both sets,
    each inert outside its calls. The reference net caches at every block."""

    _registry: "weakref.WeakKeyDictionary[nn.Module, HM3InjectionPoints]" = weakref.WeakKeyDictionary()
    after_down_prefixes = ("down3_",)
    before_up_prefixes = ("up3_",)

    def _caches(self, cross_attention: bool) -> bool:
        return True

    def _after_down_control(self, call: _HM3Call, idx: int, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return call.motion("motion_down", idx, hidden, temb, f"down_{idx}")

    def _before_up_control(
        self, call: _HM3Call, idx: int, cross_attention: bool, hidden: torch.Tensor, temb: torch.Tensor
    ) -> torch.Tensor:
        hidden = call.attend_reference("reference_modules_up", idx, f"up_{idx}", hidden)
        return call.motion("motion_up", idx, hidden, temb, f"up_{idx}")


class HM3ReferenceNet(HookedUNet):
    """The SD1.5 UNet at t = 0 on one latent frame; returns the features the v3/v4
    reference adapter attends to and the motion modules take as pads (official
    `unet_ref`, `gen_ref_cache`)."""

    injection_points = HM3InjectionPoints

    def forward(self, latents: torch.Tensor, text_embeds: torch.Tensor) -> ReferenceCache:
        """latents (b, 4, h, w) or (b, 4, 1, h, w), already scaled; text_embeds (b, 77, C)
        -> {"down_0".."down_3", "up_0".."up_3"}, each (b, c, h', w')."""
        return self._capture(latents, text_embeds, _HM3Call())

    def motion_pads(self, first: torch.Tensor, last: torch.Tensor, text_embeds: torch.Tensor) -> MotionPads:
        """The pads of a window from the latents (b, 4, h, w) of its already generated
        first and last frames -> each (b, c, 2, h', w'), as `HM3DenoisingNet` takes them."""
        caches = [self(latent, text_embeds) for latent in (first, last)]
        return {key: torch.stack([caches[0][key], caches[1][key]], dim=2) for key in caches[0]}


class HM3DenoisingNet(DenoiserForward, HookedUNet):
    """The v3/v4 denoiser: the SD1.5 UNet (frames independent; official `HM3Denoising3D`)
    or the AnimateDiff motion UNet (official `HM3DenoisingMotion`) with the reference
    adapter, the control features and, given motion pads, the motion adapter.
    Inputs and outputs are (b, c, f, h, w)."""

    injection_points = HM3InjectionPoints

    def __init__(
        self,
        unet: UNet2DConditionModel | UNetMotionModel,
        reference_adapter: HM3ReferenceAdapter | None = None,
        motion_adapter: HM3MotionAdapter | None = None,
    ):
        super().__init__(unet)
        self.reference_adapter = reference_adapter
        self.motion_adapter = motion_adapter

    def _call(
        self, num_frames: int, reference: ReferenceCache | None, control: ControlFeatures | None, motion_pads: MotionPads | None = None
    ) -> _HM3Call:
        """`motion_pads` from HM3ReferenceNet.motion_pads (the official `use_motion=True`)."""
        if motion_pads is not None and self.motion_adapter is None:
            raise ValueError("HM3DenoisingNet got motion pads but has no motion adapter")
        return _HM3Call(
            num_frames=num_frames, adapter=self.reference_adapter, reference=reference, control=control,
            motion_adapter=self.motion_adapter, motion_pads=motion_pads,
        )
