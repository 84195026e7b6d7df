"""HelloMeme v3 networks (HF `songkey/hm3_reference`, `songkey/hm3_motion`,
`songkey/hm3_control_mix`; v4 reuses the first two): the reference adapter with one
reference attention before every up block, the motion adapter whose temporal
modules see two already generated "motion pad" frames, and the one control net
that takes either ARKit or PD-FGC drive signals.

Parameter and config names are the official ones, so released folders load unchanged.
The official classes hard-code a few SD1.5 widths; here they are constructor
arguments whose defaults are those widths (`unet_block_out_channels`,
`time_embed_dim`), so a released config, which does not name them, gets SD1.5's.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from hellomeme_cli.models.blocks import SKReferenceAttention, _attention, _batch_to_frames, _frames_to_batch
from hellomeme_cli.models.control import _BlendshapeDrive, _EitherDrive, _PDFGCDrive
from hellomeme_cli.models.control_v2 import V2_BLOCK_OUT_CHANNELS, V2_SCALE_FACTOR, _UpPathControlNet

SD15_BLOCK_OUT_CHANNELS = (320, 640, 1280, 1280)
# Widths entering the up blocks: the mid block's output, then each up block's.
SD15_BLOCK_UP_CHANNELS = (1280, 1280, 1280, 640)
MOTION_PAD_POSITIONS = 77 * 2


class SKMotionModule(nn.Module):
    """Temporal attention over [first pad, frame 0 .. f-1, last pad] at every pixel
    (official `SKMotionModule`): the pads are features of frames generated earlier,
    so a window is pulled towards its already known ends. Adds a residual to the frames."""

    def __init__(self, in_channels: int, num_attention_heads: int = 1, blocks_time_embed_dim: int = 1280):
        super().__init__()
        self.pos_embed_t = SinusoidalPositionalEmbedding(in_channels, max_seq_length=MOTION_PAD_POSITIONS)
        self.time_emb_proj = nn.Linear(blocks_time_embed_dim, in_channels)
        self.temp_attn = _attention(in_channels, num_attention_heads, cross_attention_dim=in_channels)
        self.norm = nn.LayerNorm(in_channels)
        self.ff = FeedForward(
            in_channels, dropout=0.0, activation_fn="geglu", final_dropout=False, inner_dim=in_channels * 2, bias=True
        )
        self.proj = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden_states: torch.Tensor, pad_states: torch.Tensor, temb: torch.Tensor, num_frames: int) -> torch.Tensor:
        """hidden_states (b*f, c, h, w); pad_states (b, c, 2, h, w) (first, last);
        temb (b*f, T), the UNet's time embedding repeated per frame."""
        n, c, h, w = hidden_states.shape
        b = n // num_frames
        time = self.time_emb_proj(temb.reshape(b, num_frames, -1)[:, 0])  # b, c: the first frame's
        pads = pad_states.to(hidden_states.dtype).transpose(1, 2)  # b, 2, c, h, w
        frames = hidden_states.reshape(b, num_frames, c, h, w)
        sequence = torch.cat([pads[:, :1], frames, pads[:, -1:]], dim=1) + time[:, None, :, None, None]
        tokens = sequence.permute(0, 3, 4, 1, 2).reshape(b * h * w, num_frames + 2, c)
        tokens = self.ff(self.temp_attn(self.norm(self.pos_embed_t(tokens))))
        tokens = tokens.reshape(b, h, w, num_frames + 2, c)[:, :, :, 1:-1]
        return hidden_states + self.proj(tokens.permute(0, 3, 4, 1, 2).reshape(n, c, h, w))


class _UpBlockReferenceAdapter(ModelMixin, ConfigMixin):
    """One reference attention before every up block, up block 0 included; module i
    works at `block_up_channels[i]` (v3, v4 and v5). The config keys are the official
    ones; `block_down_channels` and `use_3d` are kept though unused."""

    reference_module: type[nn.Module]

    @register_to_config
    def __init__(
        self,
        block_down_channels: tuple[int, ...] = SD15_BLOCK_OUT_CHANNELS,
        block_up_channels: tuple[int, ...] = SD15_BLOCK_UP_CHANNELS,
        num_attention_heads: int = 8,
        use_3d: bool = False,
    ):
        super().__init__()
        self.reference_modules_up = nn.ModuleList(
            self.reference_module(channels, num_attention_heads) for channels in block_up_channels
        )


class HM3ReferenceAdapter(_UpBlockReferenceAdapter):
    """v3 and v4 (HF `songkey/hm3_reference`): the official `SKReferenceAttentionV3`
    computes v1's `SKReferenceAttention` function, so that block is reused."""

    reference_module = SKReferenceAttention


class HM3MotionAdapter(ModelMixin, ConfigMixin):
    """One `SKMotionModule` after every down block (`motion_down`) and one before every
    up block (`motion_up`). `time_embed_dim` is the UNet's time-embedding width,
    4 x its first block width (official: hard-coded 1280); `use_3d` is unused."""

    # Alike in shape only to _UpBlockReferenceAdapter: the official config keys again (use_3d True here), then time_embed_dim.
    @register_to_config
    def __init__(
        self,
        block_down_channels: tuple[int, ...] = SD15_BLOCK_OUT_CHANNELS,
        block_up_channels: tuple[int, ...] = SD15_BLOCK_UP_CHANNELS,
        num_attention_heads: int = 8,
        use_3d: bool = True,
        time_embed_dim: int | None = None,
    ):
        super().__init__()
        time_embed_dim = time_embed_dim or 4 * block_down_channels[0]
        self.motion_down = nn.ModuleList(
            SKMotionModule(c, num_attention_heads, time_embed_dim) for c in block_down_channels
        )
        self.motion_up = nn.ModuleList(SKMotionModule(c, num_attention_heads, time_embed_dim) for c in block_up_channels)


class HMV3ControlNet(_EitherDrive, _BlendshapeDrive, _PDFGCDrive, _UpPathControlNet):
    """Condition image + either ARKit coefficients and 3 face-part CLIP embeddings or
    the PD-FGC embedding -> {"up3_0".."up3_3", "down3_0".."down3_3"}, each (b, c, f, h', w').

    v2's up-path trunk; two 1x1 convolutions also map the up3_2 and up3_1 features to
    the widths of UNet down blocks 0 and 1, and the deepest feature is used after down
    blocks 2 and 3 too. `unet_block_out_channels` gives those widths (official:
    hard-coded 320 and 640). The released config.json holds no arguments.
    """

    output_prefix = "up3_"

    @register_to_config
    def __init__(
        self,
        embedding_channels: int = 1280,
        input_channels: int = 3,
        scale_factor: int = V2_SCALE_FACTOR,
        cross_attention_dim: int = 320,
        block_out_channels: tuple[int, ...] = V2_BLOCK_OUT_CHANNELS,
        unet_block_out_channels: tuple[int, ...] = SD15_BLOCK_OUT_CHANNELS,
    ):
        # The trunk's arguments again: register_to_config records a signature's own
        # arguments, and this one adds `unet_block_out_channels`.
        super().__init__(
            embedding_channels=embedding_channels,
            input_channels=input_channels,
            scale_factor=scale_factor,
            cross_attention_dim=cross_attention_dim,
            block_out_channels=block_out_channels,
        )

    def _build_trunk(self, input_channels: int, cross_attention_dim: int, block_out_channels: tuple[int, ...]) -> None:
        """The trunk, then the maps to the UNet's down-block widths, before the token
        projections (the order the random initialisation has always followed). The
        config holds `unet_block_out_channels` already: register_to_config records it first."""
        super()._build_trunk(input_channels, cross_attention_dim, block_out_channels)
        unet_block_out_channels = self.config.unet_block_out_channels
        self.conv_up2_down0 = nn.Conv2d(block_out_channels[2], unet_block_out_channels[0], kernel_size=1, bias=False)
        self.conv_up1_down1 = nn.Conv2d(block_out_channels[3], unet_block_out_channels[1], kernel_size=1, bias=False)

    def _features(self, condition: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        features = super()._features(condition, tokens)
        frames = condition.shape[2]
        features["down3_0"] = _batch_to_frames(self.conv_up2_down0(_frames_to_batch(features["up3_2"])), frames)
        features["down3_1"] = _batch_to_frames(self.conv_up1_down1(_frames_to_batch(features["up3_1"])), frames)
        features["down3_2"] = features["down3_3"] = features["up3_0"]
        return features
