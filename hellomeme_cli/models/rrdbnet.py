"""RRDBNet, the ESRGAN generator Real-ESRGAN x2plus uses, with the released state-dict names
(`conv_first`, `body.N.rdbK.convJ`, `conv_body`, `conv_up1`, `conv_up2`, `conv_hr`, `conv_last`).

Written here because the loaders that know it (spandrel, basicsr) need torchvision, which has
no CPU build beside our torch; the network is small. Scales 2 and 1 fold the picture into
channels first (pixel unshuffle by 2 or 4), so every scale ends with the same two 2x upsamplings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

# Real-ESRGAN scales each residual before adding it back.
RESIDUAL_SCALE = 0.2
LEAK = 0.2
# Input channels are folded by this factor per side at each scale (x4 takes the picture as it is).
UNSHUFFLE = {1: 4, 2: 2, 4: 1}


def _conv(channels_in: int, channels_out: int) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, 1, 1)


class ResidualDenseBlock(nn.Module):
    """Five convolutions, each seeing the block's input and every earlier output."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        for index in range(1, 5):
            setattr(self, f"conv{index}", _conv(num_feat + (index - 1) * num_grow_ch, num_grow_ch))
        self.conv5 = _conv(num_feat + 4 * num_grow_ch, num_feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), LEAK))
        return self.conv5(torch.cat(features, 1)) * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Three dense blocks in a residual."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """(B, num_in_ch, H, W) in [0, 1] -> (B, num_out_ch, H * scale, W * scale); H and W must be
    multiples of the unshuffle factor (2 for x2, 4 for x1)."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, scale: int = 4, num_feat: int = 64, num_block: int = 23, num_grow_ch: int = 32):
        super().__init__()
        if scale not in UNSHUFFLE:
            raise ValueError(f"RRDBNet scale must be one of {sorted(UNSHUFFLE)}, not {scale}")
        self.scale = scale
        self.conv_first = _conv(num_in_ch * UNSHUFFLE[scale] ** 2, num_feat)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = _conv(num_feat, num_feat)
        self.conv_up1 = _conv(num_feat, num_feat)
        self.conv_up2 = _conv(num_feat, num_feat)
        self.conv_hr = _conv(num_feat, num_feat)
        self.conv_last = _conv(num_feat, num_out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(F.pixel_unshuffle(x, UNSHUFFLE[self.scale]) if UNSHUFFLE[self.scale] > 1 else x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in (self.conv_up1, self.conv_up2):
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), LEAK)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), LEAK))

    @classmethod
    def shape_of(cls, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """The constructor arguments a released state dict was made with (read from its tensor
        shapes; the input is taken to have as many channels as the output, as in every release)."""
        num_feat, folded = state["conv_first.weight"].shape[:2]
        num_out_ch = state["conv_last.weight"].shape[0]
        blocks = {int(key.split(".")[1]) for key in state if key.startswith("body.")}
        unshuffle = math.isqrt(folded // num_out_ch)
        scale = {factor: scale for scale, factor in UNSHUFFLE.items()}.get(unshuffle)
        if scale is None or unshuffle**2 * num_out_ch != folded:
            raise ValueError(f"conv_first takes {folded} channels, which no RRDBNet scale makes from {num_out_ch}")
        return {
            "num_in_ch": num_out_ch,
            "num_out_ch": num_out_ch,
            "scale": scale,
            "num_feat": num_feat,
            "num_block": len(blocks),
            "num_grow_ch": state["body.0.rdb1.conv1.weight"].shape[0] if blocks else 32,
        }
