"""HMControlNet and HMControlNet2: head-pose condition image + expression tokens ->
features added to the denoiser after down blocks 0..2 (HF `songkey/hm_control`,
`songkey/hm_control2`), and the trunk and drive-token parts the v2 and v3 control
nets share with them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from hellomeme_cli.models.blocks import SKCrossAttention, _batch_to_frames, _frames_to_batch

# The official nets turn every expression coefficient into a sinusoidal "timestep"
# embedding after multiplying it by these factors.
BLENDSHAPE_SCALE = 500.0
PDFGC_SCALE = 20.0
FACE_PART_EMBEDDING_DIM = 1024  # a CLIP image embedding of one face part


def _embed_scalars(embedding: Timesteps, values: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """(b, f, k) scalars -> (b*f, k, d) sinusoidal embeddings, computed in float32."""
    b, f, k = values.shape
    return embedding(values.float().reshape(-1) * scale).reshape(b * f, k, -1).to(dtype)


def _downscaled(condition: torch.Tensor, factor: int, dtype: torch.dtype) -> torch.Tensor:
    """(b, 3, f, H, W) condition image -> (b*f, 3, H/factor, W/factor), bilinear."""
    h, w = condition.shape[-2:]
    return F.interpolate(
        _frames_to_batch(condition.to(dtype)), size=(h // factor, w // factor), mode="bilinear", align_corners=False
    )


class _SKControlNetBase(ModelMixin, ConfigMixin):
    """Shared body: condition image at 1/scale_factor, a 3x3 conv, then one strided
    Spatial Knitting cross-attention block per level, each output returned.

    A drive mixin (`_BlendshapeDrive`, `_PDFGCDrive`) adds the token projections and
    `forward`. `scale_factor` and `block_out_channels` default to the class's released
    values (`released_scale_factor`, `released_block_out_channels`), because the v2
    config.json files name no arguments; the config records the resolved values.
    """

    output_prefix: str
    num_positional_embeddings_hidden: int
    released_scale_factor = 8
    released_block_out_channels: tuple[int, ...] = (128, 320, 640, 1280)

    @register_to_config
    def __init__(
        self,
        embedding_channels: int = 1280,
        input_channels: int = 3,
        scale_factor: int | None = None,
        cross_attention_dim: int = 320,
        block_out_channels: tuple[int, ...] | None = None,
    ):
        super().__init__()
        if scale_factor is None:
            scale_factor = self.released_scale_factor
        if block_out_channels is None:
            block_out_channels = self.released_block_out_channels
        self.register_to_config(scale_factor=scale_factor, block_out_channels=block_out_channels)
        self._build_trunk(input_channels, cross_attention_dim, block_out_channels)
        self._build_token_projections(cross_attention_dim)

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

    def _build_token_projections(self, cross_attention_dim: int) -> None:
        """The end of the drive mixins' chain: each adds its projections, then calls this."""

    def _embed_coefficients(self, coefficients: torch.Tensor, scale: float) -> torch.Tensor:
        """(b, f, k) scalars -> (b*f, k, cross_attention_dim) sinusoidal tokens."""
        return _embed_scalars(self.exp_embedding, coefficients, scale, self.dtype)

    def _features(self, condition: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        frames = condition.shape[2]
        x = self.conv_in(_downscaled(condition, self.config.scale_factor, self.dtype))
        features = {}
        for idx, block in enumerate(self.blocks_down):
            x = block(x, tokens)
            features[self._output_name(idx)] = _batch_to_frames(x, frames)
        return features

    def _output_name(self, block_index: int) -> str:
        """The key of a block's output, which says where the denoiser adds it."""
        return f"{self.output_prefix}{block_index}"


class _BlendshapeDrive:
    """Drive tokens from ARKit blendshape coefficients and 3 face-part CLIP embeddings
    (mixin for `_SKControlNetBase`): 3 face-part tokens, then one token per
    coefficient, all through `exp_proj`."""

    def _build_token_projections(self, cross_attention_dim: int) -> None:
        self.exp_proj = TimestepEmbedding(cross_attention_dim, cross_attention_dim)
        self.face_proj = TimestepEmbedding(FACE_PART_EMBEDDING_DIM, cross_attention_dim)
        super()._build_token_projections(cross_attention_dim)

    def _blendshape_tokens(self, drive_coeff: torch.Tensor, face_parts: torch.Tensor) -> torch.Tensor:
        b, f = drive_coeff.shape[:2]
        face_tokens = self.face_proj(face_parts.to(self.dtype).reshape(b * f, *face_parts.shape[2:]))
        coeff_tokens = self._embed_coefficients(drive_coeff, BLENDSHAPE_SCALE)
        return self.exp_proj(torch.cat([face_tokens, coeff_tokens], dim=1))

    def forward(self, condition: torch.Tensor, drive_coeff: torch.Tensor, face_parts: torch.Tensor) -> dict[str, torch.Tensor]:
        """condition (b, 3, f, H, W) in [-1, 1]; drive_coeff (b, f, k) (k = 51 for ARKit); face_parts (b, f, 3, 1024)."""
        return self._features(condition, self._blendshape_tokens(drive_coeff, face_parts))


class _PDFGCDrive:
    """Drive tokens from the 548-d PD-FGC motion embedding (mixin for
    `_SKControlNetBase`): one token per value, through `emo_proj`."""

    def _build_token_projections(self, cross_attention_dim: int) -> None:
        self.emo_proj = TimestepEmbedding(cross_attention_dim, cross_attention_dim)
        super()._build_token_projections(cross_attention_dim)

    def _pdfgc_tokens(self, emo_embedding: torch.Tensor) -> torch.Tensor:
        return self.emo_proj(self._embed_coefficients(emo_embedding, PDFGC_SCALE))

    def forward(self, condition: torch.Tensor, emo_embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """condition (b, 3, f, H, W) in [-1, 1]; emo_embedding (b, f, 548)."""
        return self._features(condition, self._pdfgc_tokens(emo_embedding))


class _EitherDrive:
    """`forward` for the control nets that take either drive signal (v3, v4, v5): ARKit
    coefficients with face parts, else the PD-FGC embedding. The net gives
    `_blendshape_tokens`, `_pdfgc_tokens` and `_features`."""

    def forward(
        self,
        condition: torch.Tensor,
        drive_coeff: torch.Tensor | None = None,
        face_parts: torch.Tensor | None = None,
        emo_embedding: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """condition (b, 3, f, H, W) in [-1, 1]; ARKit drive_coeff (b, f, 51) with
        face_parts (b, f, 3, 1024), or PD-FGC emo_embedding (b, f, 548)."""
        if drive_coeff is not None:
            if face_parts is None:
                raise ValueError(f"{type(self).__name__}: drive_coeff needs face_parts")
            tokens = self._blendshape_tokens(drive_coeff, face_parts)
        elif emo_embedding is not None:
            tokens = self._pdfgc_tokens(emo_embedding)
        else:
            raise ValueError(f"{type(self).__name__} needs drive_coeff and face_parts, or emo_embedding")
        return self._features(condition, tokens)


class HMControlNet(_BlendshapeDrive, _SKControlNetBase):
    """Condition image + 51 ARKit blendshape coefficients + 3 face-part CLIP embeddings
    -> {"down_0", "down_1", "down_2"}, each (b, c, f, h', w')."""

    output_prefix = "down_"
    num_positional_embeddings_hidden = 64


class HMControlNet2(_PDFGCDrive, _SKControlNetBase):
    """Condition image + the 548-d PD-FGC motion embedding -> {"down2_0", "down2_1", "down2_2"}."""

    output_prefix = "down2_"
    num_positional_embeddings_hidden = 1024

