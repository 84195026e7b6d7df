"""PD-FGC motion encoder (HF `songkey/pd_fgc_motion`): a 224x224 aligned face ->
the 548-d motion embedding (6 eye + 30 emotion + 512 mouth) that HMControlNet2 takes.

A face-alignment network (FAN, one hourglass) trunk with three heads. Module names
follow the released checkpoint, which is why some read `b2_plus_1` or `conv_last0`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def _conv3x3(in_planes: int, out_planes: int) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)


class ConvBlock(nn.Module):
    """Pre-activation residual block whose three convolutions' outputs are concatenated."""

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, out_planes // 2)
        self.bn2 = nn.BatchNorm2d(out_planes // 2)
        self.conv2 = _conv3x3(out_planes // 2, out_planes // 4)
        self.bn3 = nn.BatchNorm2d(out_planes // 4)
        self.conv3 = _conv3x3(out_planes // 4, out_planes // 4)
        self.downsample = (
            nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU(), nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False))
            if in_planes != out_planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.conv1(F.relu(self.bn1(x)))
        out2 = self.conv2(F.relu(self.bn2(out1)))
        out3 = self.conv3(F.relu(self.bn3(out2)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat([out1, out2, out3], dim=1) + residual


class HourGlass(nn.Module):
    """Recursive hourglass of the given depth on 256 channels."""

    def __init__(self, depth: int, features: int = 256):
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(features, features))
            self.add_module(f"b2_{level}", ConvBlock(features, features))
            self.add_module(f"b3_{level}", ConvBlock(features, features))
        self.add_module("b2_plus_1", ConvBlock(features, features))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        upper = self._modules[f"b1_{level}"](x)
        lower = self._modules[f"b2_{level}"](F.max_pool2d(x, 2, stride=2))
        lower = self._level(level - 1, lower) if level > 1 else self._modules["b2_plus_1"](lower)
        lower = self._modules[f"b3_{level}"](lower)
        return upper + F.interpolate(lower, size=upper.shape[-2:], mode="bilinear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._level(self.depth, x)


class FANFeatures(nn.Module):
    """FAN trunk: 224x224 image -> 68 landmark heatmaps -> a 512-d feature."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = ConvBlock(64, 128)
        self.conv3 = ConvBlock(128, 128)
        self.conv4 = ConvBlock(128, 256)
        self.m0 = HourGlass(depth=4)
        self.top_m_0 = ConvBlock(256, 256)
        self.conv_last0 = nn.Conv2d(256, 256, kernel_size=1)
        self.l0 = nn.Conv2d(256, 68, kernel_size=1)
        self.bn_end0 = nn.BatchNorm2d(256)
        self.conv6 = nn.Conv2d(68, 1, 3, 2, 1)
        self.fc = nn.Linear(28 * 28, 512)
        self.bn5 = nn.BatchNorm2d(68)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(self.conv2(x), 2)
        x = self.conv4(self.conv3(x))
        x = self.bn_end0(self.conv_last0(self.top_m_0(self.m0(x))))
        heatmaps = self.l0(F.relu(x))
        x = self.conv6(F.relu(self.bn5(heatmaps)))
        return self.fc(F.relu(x.flatten(1)))


def _head(out_dim: int) -> tuple[nn.Sequential, nn.Sequential]:
    return (
        nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.BatchNorm1d(512), nn.Linear(512, 512)),
        nn.Sequential(nn.ReLU(), nn.Linear(512, out_dim)),
    )


class FanEncoder(ModelMixin, ConfigMixin):
    """(n, 3, 224, 224) aligned faces in [-1, 1] -> (n, 548) = [eye 6, emotion 30, mouth 512]."""

    @register_to_config
    def __init__(self, pose_dim: int = 6, eye_dim: int = 6):
        super().__init__()
        self.model = FANFeatures()
        self.to_mouth, self.mouth_embed = _head(512 - pose_dim - eye_dim)
        self.to_eye, self.eye_embed = _head(eye_dim)
        self.to_emo, self.emo_embed = _head(30)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        features = self.model(faces.to(self.dtype))
        eye = self.eye_embed(self.to_eye(features))
        emotion = self.emo_embed(self.to_emo(features))
        # The released model feeds the mouth's 512-d feature itself, not `mouth_embed`'s output.
        mouth = self.to_mouth(features)
        return torch.cat([eye, emotion, mouth], dim=1)
