"""HMReferenceAdapter: the Spatial Knitting reference attentions that HMDenoisingNet
inserts into the SD1.5 UNet (HF `songkey/hm_reference`, v2: `songkey/hm2_reference`)."""

from __future__ import annotations

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from hellomeme_cli.models.blocks import SKReferenceAttention


# Which reference attentions each official `version` builds; the denoiser skips the
# injection points whose modules a version lacks.
VERSIONS_WITH_DOWN_AND_MID = ("v1",)
VERSIONS = ("v1", "v2")


class HMReferenceAdapter(ModelMixin, ConfigMixin):
    """v1: one reference attention after every down block, one after the mid block and
    one before every up block but the first. v2: only the up-block ones. The config
    keys are the official ones, so a released `config.json` loads unchanged.
    """

    # diffusers' block-level group offloading: the mid attention is a block of its own, as the lists' entries are.
    _group_offload_block_modules = ["reference_modules_mid"]

    @register_to_config
    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        num_attention_heads: int | tuple[int, ...] = 8,
        version: str = "v1",
    ):
        super().__init__()
        if version not in VERSIONS:
            raise ValueError(f"HMReferenceAdapter version {version!r} is none of {', '.join(VERSIONS)}")
        heads = (num_attention_heads,) * len(down_block_types) if isinstance(num_attention_heads, int) else tuple(num_attention_heads)

        if version in VERSIONS_WITH_DOWN_AND_MID:
            self.reference_modules_down = nn.ModuleList(
                SKReferenceAttention(block_out_channels[i], heads[i]) for i in range(len(down_block_types))
            )
            self.reference_modules_mid = SKReferenceAttention(block_out_channels[-1], heads[-1])

        # Up block i (i >= 1) receives the previous up block's output channels.
        up_channels = list(reversed(block_out_channels))
        up_heads = list(reversed(heads))
        self.reference_modules_up = nn.ModuleList(
            SKReferenceAttention(up_channels[i - 1], up_heads[i]) for i in range(1, len(up_block_types))
        )
