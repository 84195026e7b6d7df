"""HMV2ControlNet and HMV2ControlNet2 (HelloMeme v2, HF `songkey/hm2_control`,
`songkey/hm2_control2`): the v1 trunk at 1/4 of the condition's size with one more
Spatial Knitting block, whose outputs are added before the denoiser's up blocks.

The released `config.json` files hold no constructor arguments (the official classes
do not register them), so the defaults below are the released configuration.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding

from hellomeme_cli.models.control import _SKControlNetBase

V2_BLOCK_OUT_CHANNELS = (128, 640, 1280, 1280, 1280)


class _UpPathControlNet(_SKControlNetBase):
    """Outputs named by the up block they enter: the first (largest) block's output
    enters the last up block, the last (smallest) one up block 0."""

    num_positional_embeddings_hidden = 1024

    def _output_name(self, block_index: int) -> str:
        return f"{self.output_prefix}{len(self.blocks_down) - 1 - block_index}"


class HMV2ControlNet(_UpPathControlNet):
    """Condition image + ARKit blendshape coefficients + 3 face-part CLIP embeddings
    -> {"up_v2_0", ..., "up_v2_3"}, each (b, c, f, h', w')."""

    output_prefix = "up_v2_"

    @register_to_config
    def __init__(
        self,
        embedding_channels: int = 1280,
        input_channels: int = 3,
        scale_factor: int = 4,
        cross_attention_dim: int = 320,
        block_out_channels: tuple[int, ...] = V2_BLOCK_OUT_CHANNELS,
    ):
        super().__init__()
        self._build_trunk(input_channels, cross_attention_dim, block_out_channels)
        self.exp_proj = TimestepEmbedding(cross_attention_dim, cross_attention_dim)
        self.face_proj = TimestepEmbedding(1024, cross_attention_dim)

    def forward(self, condition: torch.Tensor, drive_coeff: torch.Tensor, face_parts: torch.Tensor) -> dict[str, torch.Tensor]:
        """condition (b, 3, f, H, W) in [-1, 1]; drive_coeff (b, f, k) (k = 51 for ARKit); face_parts (b, f, 3, 1024)."""
        return self._run_trunk(condition, self._blendshape_tokens(drive_coeff, face_parts))


class HMV2ControlNet2(_UpPathControlNet):
    """Condition image + the 548-d PD-FGC motion embedding -> {"up2_v2_0", ..., "up2_v2_3"}."""

    output_prefix = "up2_v2_"

    @register_to_config
    def __init__(
        self,
        embedding_channels: int = 1280,
        input_channels: int = 3,
        scale_factor: int = 4,
        cross_attention_dim: int = 320,
        block_out_channels: tuple[int, ...] = V2_BLOCK_OUT_CHANNELS,
    ):
        super().__init__()
        self._build_trunk(input_channels, cross_attention_dim, block_out_channels)
        self.emo_proj = TimestepEmbedding(cross_attention_dim, cross_attention_dim)

    def forward(self, condition: torch.Tensor, emo_embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """condition (b, 3, f, H, W) in [-1, 1]; emo_embedding (b, f, 548)."""
        return self._run_trunk(condition, self._pdfgc_tokens(emo_embedding))
