"""HMV2ControlNet and HMV2ControlNet2 (HelloMeme v2, HF `songkey/hm2_control`,
`songkey/hm2_control2`): the v1 trunk at 1/4 of the condition's size with one more
Spatial Knitting block, whose outputs are added before the denoiser's up blocks.

The released `config.json` files hold no constructor arguments (the official classes
do not register them), so the released configuration is the default.
"""

from __future__ import annotations

from hellomeme_cli.models.control import _BlendshapeDrive, _PDFGCDrive, _SKControlNetBase

V2_SCALE_FACTOR = 4
V2_BLOCK_OUT_CHANNELS = (128, 640, 1280, 1280, 1280)


class _UpPathControlNet(_SKControlNetBase):
    """Outputs named by the up block they enter: the first (largest) block's output
    enters the last up block, the last (smallest) one up block 0."""

    num_positional_embeddings_hidden = 1024
    released_scale_factor = V2_SCALE_FACTOR
    released_block_out_channels = V2_BLOCK_OUT_CHANNELS

    def _output_name(self, block_index: int) -> str:
        return f"{self.output_prefix}{len(self.blocks_down) - 1 - block_index}"


class HMV2ControlNet(_BlendshapeDrive, _UpPathControlNet):
    """Condition image + ARKit blendshape coefficients + 3 face-part CLIP embeddings
    -> {"up_v2_0", ..., "up_v2_3"}, each (b, c, f, h', w')."""

    output_prefix = "up_v2_"


class HMV2ControlNet2(_PDFGCDrive, _UpPathControlNet):
    """Condition image + the 548-d PD-FGC motion embedding -> {"up2_v2_0", ..., "up2_v2_3"}."""

    output_prefix = "up2_v2_"
