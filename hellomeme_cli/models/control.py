"""HMControlNet and HMControlNet2: head-pose condition image + expression tokens ->
features added to the denoiser after down blocks 0..2 (HF `songkey/hm_control`,
`songkey/hm_control2`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from hellomeme_cli.models.blocks import SKCrossAttention

# The official nets turn every expression coefficient into a sinusoidal "timestep"
# embedding after multiplying it by these factors.
BLENDSHAPE_SCALE = 500.0
PDFGC_SCALE = 20.0


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) -> (b*f, c, h, w), frames of one sample kept together."""
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def _batch_to_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(b*f, c, h, w) -> (b, c, f, h, w)."""
    n, c, h, w = x.shape
    return x.reshape(n // frames, frames, c, h, w).transpose(1, 2)


class _SKControlNetBase(ModelMixin, ConfigMixin):
    """Shared body: condition image at 1/scale_factor, a 3x3 conv, then one strided
    Spatial Knitting cross-attention block per level, each output returned."""

    output_prefix: str
    num_positional_embeddings_hidden: int

    def _build_trunk(self, input_channels: int, cross_attention_dim: int, block_out_channels: tuple[int, ...]) -> None:
        self.conv_in = nn.Conv2d(input_channels, block_out_channels[0], kernel_size=3, padding=1, bias=False)
        self.exp_embedding = Timesteps(cross_attention_dim, True, 0)
        self.blocks_down = nn.ModuleList(
            SKCrossAttention(
                channel_in=block_out_channels[i - 1],
                channel_out=block_out_channels[i],
                cross_attention_dim=cross_attention_dim,
                num_positional_embeddings=64,
                num_positional_embeddings_hidden=self.num_positional_embeddings_hidden,
            )
            for i in range(1, len(block_out_channels))
        )

    def _embed_coefficients(self, coefficients: torch.Tensor, scale: float) -> torch.Tensor:
        """(b, f, k) scalars -> (b*f, k, cross_attention_dim) sinusoidal tokens, computed in float32."""
        b, f, k = coefficients.shape
        tokens = self.exp_embedding(coefficients.float().reshape(-1) * scale)
        return tokens.reshape(b * f, k, -1).to(self.dtype)

    def _run_trunk(self, condition: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        frames, (h, w) = condition.shape[2], condition.shape[-2:]
        x = F.interpolate(
            _frames_to_batch(condition.to(self.dtype)),
            size=(h // self.config.scale_factor, w // self.config.scale_factor),
            mode="bilinear",
            align_corners=False,
        )
        x = self.conv_in(x)
        features = {}
        for idx, block in enumerate(self.blocks_down):
            x = block(x, tokens)
            features[self._output_name(idx)] = _batch_to_frames(x, frames)
        return features

    def _output_name(self, block_index: int) -> str:
        """The key of a block's output, which says where the denoiser adds it."""
        return f"{self.output_prefix}{block_index}"

    def _blendshape_tokens(self, drive_coeff: torch.Tensor, face_parts: torch.Tensor) -> torch.Tensor:
        """3 face-part tokens, then one token per coefficient, all through `exp_proj`."""
        b, f = drive_coeff.shape[:2]
        face_tokens = self.face_proj(face_parts.to(self.dtype).reshape(b * f, *face_parts.shape[2:]))
        coeff_tokens = self._embed_coefficients(drive_coeff, BLENDSHAPE_SCALE)
        return self.exp_proj(torch.cat([face_tokens, coeff_tokens], dim=1))

    def _pdfgc_tokens(self, emo_embedding: torch.Tensor) -> torch.Tensor:
        """One token per PD-FGC value, through `emo_proj`."""
        return self.emo_proj(self._embed_coefficients(emo_embedding, PDFGC_SCALE))


class HMControlNet(_SKControlNetBase):
    """Condition image + 51 ARKit blendshape coefficients + 3 face-part CLIP embeddings
    -> {"down_0", "down_1", "down_2"}, each (b, c, f, h', w')."""

    output_prefix = "down_"
    num_positional_embeddings_hidden = 64

    @register_to_config
    def __init__(
        self,
        embedding_channels: int = 1280,
        input_channels: int = 3,
        scale_factor: int = 8,
        cross_attention_dim: int = 320,
        block_out_channels: tuple[int, ...] = (128, 320, 640, 1280),
    ):
        super().__init__()
        self._build_trunk(input_channels, cross_attention_dim, block_out_channels)
        self.exp_proj = TimestepEmbedding(cross_attention_dim, cross_attention_dim)
        self.face_proj = TimestepEmbedding(1024, cross_attention_dim)

    def forward(self, condition: torch.Tensor, drive_coeff: torch.Tensor, face_parts: torch.Tensor) -> dict[str, torch.Tensor]:
        """condition (b, 3, f, H, W) in [-1, 1]; drive_coeff (b, f, 51); face_parts (b, f, 3, 1024)."""
        return self._run_trunk(condition, self._blendshape_tokens(drive_coeff, face_parts))


class HMControlNet2(_SKControlNetBase):
    """Condition image + the 548-d PD-FGC motion embedding -> {"down2_0", "down2_1", "down2_2"}."""

    output_prefix = "down2_"
    num_positional_embeddings_hidden = 1024

    @register_to_config
    def __init__(
        self,
        embedding_channels: int = 1280,
        input_channels: int = 3,
        scale_factor: int = 8,
        cross_attention_dim: int = 320,
        block_out_channels: tuple[int, ...] = (128, 320, 640, 1280),
    ):
        super().__init__()
        self._build_trunk(input_channels, cross_attention_dim, block_out_channels)
        self.emo_proj = TimestepEmbedding(cross_attention_dim, cross_attention_dim)

    def forward(self, condition: torch.Tensor, emo_embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """condition (b, 3, f, H, W) in [-1, 1]; emo_embedding (b, f, 548)."""
        return self._run_trunk(condition, self._pdfgc_tokens(emo_embedding))
