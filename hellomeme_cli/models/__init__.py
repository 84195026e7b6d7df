"""Models: the HelloMeme networks of every released version (and the upscaler's), loadable from the authors' released folders.

May import: torch, diffusers and the room's own modules; nothing else of the package (every other room builds on this one).
"""

from hellomeme_cli.models.blocks import SKCrossAttention, SKReferenceAttention
from hellomeme_cli.models.control import HMControlNet, HMControlNet2
from hellomeme_cli.models.control_v2 import HMV2ControlNet, HMV2ControlNet2
from hellomeme_cli.models.hm3 import HM3MotionAdapter, HM3ReferenceAdapter, HMV3ControlNet, SKMotionModule
from hellomeme_cli.models.hm3_unet import HM3DenoisingNet, HM3ReferenceNet
from hellomeme_cli.models.hm4 import HM4SD15ControlProj, HMControlNetBase
from hellomeme_cli.models.hm5 import HM5bReferenceAdapter, HM5ControlNetBase, HM5DenoisingNet, HM5MotionAdapter, HM5ReferenceAdapter, HM5ReferenceNet, HM5SD15ControlProj, motion_pad_states
from hellomeme_cli.models.pdfgc import FanEncoder
from hellomeme_cli.models.reference import HMReferenceAdapter
from hellomeme_cli.models.unet import HMDenoisingNet, HMReferenceNet, motion_unet

__all__ = [
    "FanEncoder",
    "HM3DenoisingNet",
    "HM3MotionAdapter",
    "HM3ReferenceAdapter",
    "HM3ReferenceNet",
    "HM4SD15ControlProj",
    "HM5bReferenceAdapter",
    "HM5ControlNetBase",
    "HM5DenoisingNet",
    "HM5MotionAdapter",
    "HM5ReferenceAdapter",
    "HM5ReferenceNet",
    "HM5SD15ControlProj",
    "HMControlNet",
    "HMControlNet2",
    "HMControlNetBase",
    "HMDenoisingNet",
    "HMReferenceAdapter",
    "HMReferenceNet",
    "HMV2ControlNet",
    "HMV2ControlNet2",
    "HMV3ControlNet",
    "motion_pad_states",
    "motion_unet",
    "SKCrossAttention",
    "SKMotionModule",
    "SKReferenceAttention",
]
