"""HelloMeme v4 control stack (HF `songkey/hm_control_base` + `songkey/hm4_control_proj`):
a small U-Net over the condition image whose every level is re-synthesised by
Spatial Knitting cross-attention to the drive tokens, then a projector that maps
its four features to the eight v3 injection points of the SD1.5 UNet.

Parameter and config names are the official ones. The official classes hard-code
SD1.5's widths (320/640/1280); here `unet_block_out_channels` gives them, defaulting
to SD1.5's, which is what a released config (that does not name it) means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import SinusoidalPositionalEmbedding, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from hellomeme_cli.models.blocks import ResidualDownBlock, _attention, _channels_last_tokens
from hellomeme_cli.models.control import BLENDSHAPE_SCALE, PDFGC_SCALE, _batch_to_frames, _frames_to_batch
from hellomeme_cli.models.hm3 import SD15_BLOCK_OUT_CHANNELS

# The drive tokens: each scalar becomes a sinusoid this wide, and a small MLP mixes
# the scalars of one frame (51 ARKit coefficients, 3 face parts, 548 PD-FGC values)
# into this many tokens.
EMBEDDING_WIDTH = 1024
DRIVE_TOKENS = 16
ARKIT_COEFFICIENTS = 51
FACE_PARTS = 3
PDFGC_VALUES = 548


class STKCrossAttention(nn.Module):
    """Spatial Knitting cross-attention that replaces the features (official
    `STKCrossAttention`, no temporal attention): rows, then columns attend to the drive
    tokens, a wide GEGLU feed-forward, one shared LayerNorm throughout.

    The tokens are the same for every row (column) of one image, so all pixels attend
    at once with row-wise (column-wise) positions, without repeating the tokens.
    """

    def __init__(self, channels: int, heads: int = 8, cross_attention_dim: int = 320):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.pos_embed = SinusoidalPositionalEmbedding(channels, max_seq_length=512)
        self.pos_embed_hidden = SinusoidalPositionalEmbedding(cross_attention_dim, max_seq_length=1024)
        self.norm = nn.LayerNorm(channels)
        self.attn1 = _attention(channels, heads, cross_attention_dim)
        self.attn2 = _attention(channels, heads, cross_attention_dim)
        self.ff = FeedForward(
            channels, dropout=0.0, activation_fn="geglu", final_dropout=False, inner_dim=channels * 16, bias=True
        )
        self.proj = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x (n, c, h, w); tokens (n, L, cross_attention_dim) -> (n, c, h, w)."""
        x = _channels_last_tokens(self.conv_in(x))
        n, h, w, c = x.shape
        tokens = self.pos_embed_hidden(tokens)
        positions = self.pos_embed.pe[0]
        # rows: each pixel carries the position of its column
        x = self.attn1(self.norm((x + positions[:w]).reshape(n, h * w, c)), tokens).reshape(n, h, w, c)
        # columns: each pixel carries the position of its row
        x = self.attn2(self.norm((x + positions[:h, None]).reshape(n, h * w, c)), tokens)
        x = self.norm(self.ff(x))
        return self.proj(x.reshape(n, h, w, c).permute(0, 3, 1, 2))


class ControlUNet(nn.Module):
    """Three strided residual blocks, each followed by an `STKCrossAttention`, then three
    upsampling convolutions with skips (official `SmallUnet`, no temporal attention).
    Returns feat_0 (deepest) .. feat_3 (the largest, 1/8 of the condition's input)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: tuple[int, ...], cross_attention_dim: int):
        super().__init__()
        down = (in_channels, *mid_channels)
        up = (*reversed(mid_channels), out_channels)
        self.down_blocks = nn.ModuleList(ResidualDownBlock(down[i - 1], down[i]) for i in range(1, len(down)))
        self.up_blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(up[i - 1], up[i], kernel_size=3, padding=1),
                nn.InstanceNorm2d(up[i]),
                nn.SiLU(),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            )
            for i in range(1, len(up))
        )
        self.attn_blocks = nn.ModuleList(STKCrossAttention(c, cross_attention_dim=cross_attention_dim) for c in mid_channels)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (b, c, f, h, w); tokens (b*f, L, cross_attention_dim) -> feat_i (b, c', f, h', w')."""
        frames = x.shape[2]
        x = _frames_to_batch(x)
        skips = []
        for down_block, attn_block in zip(self.down_blocks, self.attn_blocks):
            x = attn_block(down_block(x), tokens)
            skips.append(x)
        features = {"feat_0": x}
        # every up block but the last adds the skip of the size it reaches
        for i, block in enumerate(self.up_blocks):
            x = block(x)
            if i < len(self.up_blocks) - 1:
                x = x + skips[-2 - i]
            features[f"feat_{i + 1}"] = x
        return {name: _batch_to_frames(value, frames) for name, value in features.items()}


class HMControlNetBase(ModelMixin, ConfigMixin):
    """Condition image + ARKit coefficients and 3 face-part CLIP embeddings, or the
    PD-FGC embedding -> {"feat_0".."feat_3"} for `HM4SD15ControlProj`.

    Unlike v1-v3, a small MLP mixes a frame's scalars (not their embeddings) into 16
    tokens, and the ARKit and face-part tokens are summed, not concatenated.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        cross_attention_dim: int = 2048,
        unet_block_out_channels: tuple[int, ...] = SD15_BLOCK_OUT_CHANNELS,
    ):
        super().__init__()
        self.emo_embedding = Timesteps(EMBEDDING_WIDTH, True, 0)
        self.emo_pre_proj = TimestepEmbedding(PDFGC_VALUES, DRIVE_TOKENS)
        self.emo_proj = TimestepEmbedding(EMBEDDING_WIDTH, cross_attention_dim)
        self.exp_embedding = Timesteps(EMBEDDING_WIDTH, True, 0)
        self.exp_pre_proj = TimestepEmbedding(ARKIT_COEFFICIENTS, DRIVE_TOKENS)
        self.face_pre_proj = TimestepEmbedding(FACE_PARTS, DRIVE_TOKENS)
        self.exp_proj = TimestepEmbedding(EMBEDDING_WIDTH, cross_attention_dim)
        self.face_proj = TimestepEmbedding(EMBEDDING_WIDTH, cross_attention_dim)
        u = unet_block_out_channels
        self.ctrl_attn = ControlUNet(in_channels, u[0], (u[0], u[1], u[-1]), cross_attention_dim)

    @staticmethod
    def _mix(embedding: torch.Tensor, mixer: TimestepEmbedding) -> torch.Tensor:
        """(n, k, d) embeddings of k scalars -> (n, 16, d): `mixer` runs across the k scalars."""
        return mixer(embedding.transpose(1, 2)).transpose(1, 2)

    def _sinusoids(self, values: torch.Tensor, scale: float, embedding: Timesteps) -> torch.Tensor:
        """(b, f, k) scalars -> (b*f, k, 1024), computed in float32."""
        b, f, k = values.shape
        return embedding(values.float().reshape(-1) * scale).reshape(b * f, k, -1).to(self.dtype)

    def forward(
        self,
        condition: torch.Tensor,
        drive_coeff: torch.Tensor | None = None,
        face_parts: torch.Tensor | None = None,
        emo_embedding: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """condition (b, 3, f, H, W) in [-1, 1], H and W multiples of 64; ARKit when
        drive_coeff (b, f, 51) is given (face_parts (b, f, 3, 1024) then required), else
        PD-FGC emo_embedding (b, f, 548)."""
        b, _, f, h, w = condition.shape
        if h % 64 or w % 64:
            # its U-Net adds each upsampled feature to a skip of the rounded-up size
            raise ValueError(f"HMControlNetBase needs a condition whose sides are multiples of 64, not {h}x{w}")
        if drive_coeff is not None:
            if face_parts is None:
                raise ValueError("HMControlNetBase: drive_coeff needs face_parts")
            coefficients = self._sinusoids(drive_coeff, BLENDSHAPE_SCALE, self.exp_embedding)
            parts = face_parts.to(self.dtype).reshape(b * f, *face_parts.shape[2:])
            tokens = self.exp_proj(self._mix(coefficients, self.exp_pre_proj)) + self.face_proj(
                self._mix(parts, self.face_pre_proj)
            )
        elif emo_embedding is not None:
            values = self._sinusoids(emo_embedding, PDFGC_SCALE, self.emo_embedding)
            tokens = self.emo_proj(self._mix(values, self.emo_pre_proj))
        else:
            raise ValueError("HMControlNetBase needs drive_coeff and face_parts, or emo_embedding")
        x = F.interpolate(
            _frames_to_batch(condition.to(self.dtype)), size=(h // 8, w // 8), mode="bilinear", align_corners=False
        )
        return self.ctrl_attn(_batch_to_frames(x, f), tokens)


# Projector convolution -> (the feature it reads, the injection point it writes).
PROJECTIONS = {
    "map1280_to_1280": ("feat_0", "up3_0"),
    "map640_to_1280": ("feat_1", "up3_1"),
    "map320_to_1280": ("feat_2", "up3_2"),
    "map320_to_640": ("feat_3", "up3_3"),
    "map320_to_320": ("feat_2", "down3_0"),
    "map640_to_640": ("feat_1", "down3_1"),
    "map1280_to_1280_2": ("feat_0", "down3_2"),
    "map1280_to_1280_3": ("feat_0", "down3_3"),
}


class HM4SD15ControlProj(ModelMixin, ConfigMixin):
    """`HMControlNetBase` features -> the v3 control dict {"up3_0".."up3_3",
    "down3_0".."down3_3"}: one bias-free 3x3 convolution per injection point."""

    @register_to_config
    def __init__(self, unet_block_out_channels: tuple[int, ...] = SD15_BLOCK_OUT_CHANNELS):
        super().__init__()
        u = unet_block_out_channels
        # feature widths of HMControlNetBase and the width each injection point needs
        feature = {"feat_0": u[-1], "feat_1": u[1], "feat_2": u[0], "feat_3": u[0]}
        target = {"up3_0": u[3], "up3_1": u[3], "up3_2": u[2], "up3_3": u[1]}
        target.update({f"down3_{i}": u[i] for i in range(4)})
        for name, (source, point) in PROJECTIONS.items():
            self.add_module(name, nn.Conv2d(feature[source], target[point], kernel_size=3, padding=1, bias=False))

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """feat_i (b, c, f, h', w') -> up3_i / down3_i (b, c', f, h', w')."""
        frames = features["feat_0"].shape[2]
        return {
            point: _batch_to_frames(getattr(self, name)(_frames_to_batch(features[source])), frames)
            for name, (source, point) in PROJECTIONS.items()
        }
