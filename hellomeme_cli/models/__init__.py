"""HelloMeme v1 and v2 networks, loadable from the authors' released folders."""

from .blocks import SKCrossAttention, SKReferenceAttention
from .control import HMControlNet, HMControlNet2
from .control_v2 import HMV2ControlNet, HMV2ControlNet2
from .pdfgc import FanEncoder
from .reference import HMReferenceAdapter
from .unet import HMDenoisingNet, HMReferenceNet, motion_unet

__all__ = [
    "FanEncoder",
    "HMControlNet",
    "HMControlNet2",
    "HMDenoisingNet",
    "HMReferenceAdapter",
    "HMReferenceNet",
    "HMV2ControlNet",
    "HMV2ControlNet2",
    "SKCrossAttention",
    "SKReferenceAttention",
    "motion_unet",
]

# v3 and v4
from .hm3 import HM3MotionAdapter, HM3ReferenceAdapter, HMV3ControlNet, SKMotionModule
from .hm3_unet import HM3DenoisingNet, HM3ReferenceNet
from .hm4 import HM4SD15ControlProj, HMControlNetBase

__all__ += [
    "HM3DenoisingNet",
    "HM3MotionAdapter",
    "HM3ReferenceAdapter",
    "HM3ReferenceNet",
    "HM4SD15ControlProj",
    "HMControlNetBase",
    "HMV3ControlNet",
    "SKMotionModule",
]
