"""HelloMeme v4 control stack (HF `songkey/hm_control_base` + `songkey/hm4_control_proj`):
a small U-Net over the condition image whose every level is re-synthesised by
Spatial Knitting cross-attention to the drive tokens, then a projector that maps
its four features to the eight v3 injection points of the SD1.5 UNet.

The v5 control stack (`hm5.py`) is built from the same parts: the token mixer
(`_MixedTokenControlNet`), the small U-Net and its cross-attention.

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

from hellomeme_cli.models.blocks import ResidualDownBlock, _attention, _batch_to_frames, _channels_last_tokens, _frames_to_batch
from hellomeme_cli.models.control import BLENDSHAPE_SCALE, PDFGC_SCALE, _downscaled, _EitherDrive, _embed_scalars
from hellomeme_cli.models.hm3 import SD15_BLOCK_OUT_CHANNELS

# The drive tokens: each scalar becomes a sinusoid this wide, and a small MLP mixes
# the scalars of one frame (51 ARKit coefficients, 3 face parts, 548 PD-FGC values)
# into this many tokens.
EMBEDDING_WIDTH = 1024
DRIVE_TOKENS = 16
ARKIT_COEFFICIENTS = 51
FACE_PARTS = 3
PDFGC_VALUES = 548
CONTROL_HEADS = 8


class _STKCrossAttentionBase(nn.Module):
    """Spatial Knitting cross-attention that replaces the features (official
    `STKCrossAttention` of v4, `STKCrossAttentionV5` of v5, no temporal attention):
    rows, then columns attend to the drive tokens, a wide GEGLU feed-forward, one shared
    LayerNorm throughout. The versions differ in their position embeddings only.

    The tokens are the same for every row (column) of one image, so all pixels attend
    at once with row-wise (column-wise) positions, without repeating the tokens.
    """

    def __init__(self, channels: int, cross_attention_dim: int, heads: int = CONTROL_HEADS):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.norm = nn.LayerNorm(channels)
        self.attn1 = _attention(channels, heads, cross_attention_dim)
        self.attn2 = _attention(channels, heads, cross_attention_dim)
        self.ff = FeedForward(
            channels, dropout=0.0, activation_fn="geglu", final_dropout=False, inner_dim=channels * 16, bias=True
        )
        self.proj = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def _pixel_positions(self, length: int, like: torch.Tensor) -> torch.Tensor:
        """(length, channels) embeddings of the positions 0..length-1 along a row or column."""
        raise NotImplementedError

    def _token_positions(self, length: int, like: torch.Tensor) -> torch.Tensor:
        """(length, cross_attention_dim) embeddings of the token positions."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x (n, c, h, w); tokens (n, L, cross_attention_dim) -> (n, c, h, w)."""
        x = _channels_last_tokens(self.conv_in(x))
        n, h, w, c = x.shape
        tokens = tokens + self._token_positions(tokens.shape[1], tokens)
        # rows: each pixel carries the position of its column
        x = self.attn1(self.norm((x + self._pixel_positions(w, x)).reshape(n, h * w, c)), tokens).reshape(n, h, w, c)
        # columns: each pixel carries the position of its row
        x = self.attn2(self.norm((x + self._pixel_positions(h, x)[:, None]).reshape(n, h * w, c)), tokens)
        x = self.norm(self.ff(x))
        return self.proj(x.reshape(n, h, w, c).permute(0, 3, 1, 2))


class STKCrossAttention(_STKCrossAttentionBase):
    """v4: diffusers' (interleaved sin/cos) position tables, stored in the weights."""

    def __init__(self, channels: int, cross_attention_dim: int, heads: int = CONTROL_HEADS):
        super().__init__(channels, cross_attention_dim, heads)
        self.pos_embed = SinusoidalPositionalEmbedding(channels, max_seq_length=512)
        self.pos_embed_hidden = SinusoidalPositionalEmbedding(cross_attention_dim, max_seq_length=1024)

    def _pixel_positions(self, length: int, like: torch.Tensor) -> torch.Tensor:
        return self.pos_embed.pe[0, :length]

    def _token_positions(self, length: int, like: torch.Tensor) -> torch.Tensor:
        return self.pos_embed_hidden.pe[0, :length]


class SmallUnet(nn.Module):
    """Three strided residual blocks, each followed by a cross-attention block (v4's
    `STKCrossAttention` or v5's) that replaces its features, then three
    conv-norm-SiLU-upsample steps with skips (official `SmallUnet`, `SmallUnetV5`, no
    temporal attention). Returns [feat_0 (deepest), .., feat_3 (the input's size)]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mid_channels: tuple[int, ...],
        cross_attention_dim: int,
        attention_block: type[_STKCrossAttentionBase],
    ):
        super().__init__()
        down = (in_channels, *mid_channels)
        up = (*reversed(mid_channels), out_channels)
        self.down_blocks = nn.ModuleList(ResidualDownBlock(down[i - 1], down[i]) for i in range(1, len(down)))
        # Each official up step ends in a bilinear x2 upsample; it is done in forward,
        # to the size of what it is added to, so sizes that are not multiples of 64 work.
        self.up_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(up[i - 1], up[i], kernel_size=3, padding=1), nn.InstanceNorm2d(up[i]), nn.SiLU())
            for i in range(1, len(up))
        )
        self.attn_blocks = nn.ModuleList(attention_block(c, cross_attention_dim) for c in mid_channels)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """x (n, c, h, w) pose map; tokens (n, L, cross_attention_dim)."""
        full_size = x.shape[-2:]
        skips = []
        for down_block, attn_block in zip(self.down_blocks, self.attn_blocks):
            x = attn_block(down_block(x), tokens)
            skips.append(x)
        features = [x]
        # every up step but the last adds the skip of the size it reaches
        targets = [skip.shape[-2:] for skip in reversed(skips[:-1])] + [full_size]
        for idx, (block, size) in enumerate(zip(self.up_blocks, targets)):
            x = F.interpolate(block(x), size=size, mode="bilinear", align_corners=False)
            if idx < len(targets) - 1:
                x = x + skips[-2 - idx]
            features.append(x)
        return features


class _MixedTokenControlNet(_EitherDrive, ModelMixin, ConfigMixin):
    """The v4 / v5 control base: condition image + ARKit coefficients and 3 face-part
    CLIP embeddings, or the PD-FGC embedding -> {"feat_0".."feat_3"}, each
    (b, c, f, h', w'), from 1/64 to 1/8 of the condition's size.

    Unlike v1-v3, a small MLP mixes a frame's scalars (not their embeddings) into 16
    tokens, and the ARKit and face-part tokens are summed, not concatenated. A subclass
    builds `ctrl_attn`, a `SmallUnet`, after `_build_token_projections`.
    """

    # the condition's sides must be multiples of this
    condition_multiple: int

    def _build_token_projections(self, cross_attention_dim: int) -> None:
        self.coefficient_embedding = Timesteps(EMBEDDING_WIDTH, True, 0)
        self.emo_pre_proj = TimestepEmbedding(PDFGC_VALUES, DRIVE_TOKENS)
        self.emo_proj = TimestepEmbedding(EMBEDDING_WIDTH, cross_attention_dim)
        self.exp_pre_proj = TimestepEmbedding(ARKIT_COEFFICIENTS, DRIVE_TOKENS)
        self.face_pre_proj = TimestepEmbedding(FACE_PARTS, DRIVE_TOKENS)
        self.exp_proj = TimestepEmbedding(EMBEDDING_WIDTH, cross_attention_dim)
        self.face_proj = TimestepEmbedding(EMBEDDING_WIDTH, cross_attention_dim)

    @staticmethod
    def _mix(embedding: torch.Tensor, pre_proj: TimestepEmbedding, proj: TimestepEmbedding) -> torch.Tensor:
        """(n, k, 1024) embeddings of k scalars -> (n, 16, D): `pre_proj` runs across the k scalars."""
        return proj(pre_proj(embedding.transpose(1, 2)).transpose(1, 2))

    def _blendshape_tokens(self, drive_coeff: torch.Tensor, face_parts: torch.Tensor) -> torch.Tensor:
        if drive_coeff.shape[-1] != ARKIT_COEFFICIENTS:
            raise ValueError(
                f"{type(self).__name__}: ARKit control needs {ARKIT_COEFFICIENTS} coefficients, got {drive_coeff.shape[-1]}"
            )
        coefficients = _embed_scalars(self.coefficient_embedding, drive_coeff, BLENDSHAPE_SCALE, self.dtype)
        parts = face_parts.to(self.dtype).flatten(0, 1)
        return self._mix(coefficients, self.exp_pre_proj, self.exp_proj) + self._mix(
            parts, self.face_pre_proj, self.face_proj
        )

    def _pdfgc_tokens(self, emo_embedding: torch.Tensor) -> torch.Tensor:
        values = _embed_scalars(self.coefficient_embedding, emo_embedding, PDFGC_SCALE, self.dtype)
        return self._mix(values, self.emo_pre_proj, self.emo_proj)

    def _features(self, condition: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        frames, (h, w) = condition.shape[2], condition.shape[-2:]
        if h % self.condition_multiple or w % self.condition_multiple:
            raise ValueError(
                f"{type(self).__name__} needs a condition whose sides are multiples of {self.condition_multiple}, not {h}x{w}"
            )
        features = self.ctrl_attn(_downscaled(condition, 8, self.dtype), tokens)
        return {f"feat_{idx}": _batch_to_frames(x, frames) for idx, x in enumerate(features)}


class HMControlNetBase(_MixedTokenControlNet):
    """v4 (HF `songkey/hm_control_base`): the features for `HM4SD15ControlProj`."""

    # The official v4 U-Net upsamples by exactly 2; the shared U-Net, which upsamples to
    # each skip's size, computes the same only where the sides are multiples of 64.
    condition_multiple = 64

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        cross_attention_dim: int = 2048,
        unet_block_out_channels: tuple[int, ...] = SD15_BLOCK_OUT_CHANNELS,
    ):
        super().__init__()
        self._build_token_projections(cross_attention_dim)
        u = unet_block_out_channels
        self.ctrl_attn = SmallUnet(in_channels, u[0], (u[0], u[1], u[-1]), cross_attention_dim, STKCrossAttention)


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


def _projector_widths(feature_widths: dict[str, int], unet_block_out_channels: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """Each projector's (in, out) widths: its feature map's and its injection point's,
    which is the UNet's width after down block i (`down3_i`) or entering up block i (`up3_i`)."""
    u = unet_block_out_channels
    point_widths = {"up3_0": u[3], "up3_1": u[3], "up3_2": u[2], "up3_3": u[1], **{f"down3_{i}": u[i] for i in range(4)}}
    return {name: (feature_widths[source], point_widths[point]) for name, (source, point) in PROJECTIONS.items()}


class HM4SD15ControlProj(ModelMixin, ConfigMixin):
    """`HMControlNetBase` features -> the v3 control dict {"up3_0".."up3_3",
    "down3_0".."down3_3"}: one bias-free 3x3 convolution per injection point."""

    @register_to_config
    def __init__(self, unet_block_out_channels: tuple[int, ...] = SD15_BLOCK_OUT_CHANNELS):
        super().__init__()
        u = unet_block_out_channels
        feature_widths = {"feat_0": u[-1], "feat_1": u[1], "feat_2": u[0], "feat_3": u[0]}  # HMControlNetBase's
        for name, (in_width, out_width) in _projector_widths(feature_widths, u).items():
            self.add_module(name, nn.Conv2d(in_width, out_width, kernel_size=3, padding=1, bias=False))

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """feat_i (b, c, f, h', w') -> up3_i / down3_i (b, c', f, h', w')."""
        frames = features["feat_0"].shape[2]
        return {
            point: _batch_to_frames(getattr(self, name)(_frames_to_batch(features[source])), frames)
            for name, (source, point) in PROJECTIONS.items()
        }
