"""The HelloMeme networks of every released version, loadable from the authors' released folders."""

from .blocks import SKCrossAttention, SKReferenceAttention
from .control import HMControlNet, HMControlNet2
from .control_v2 import HMV2ControlNet, HMV2ControlNet2
from .hm3 import HM3MotionAdapter, HM3ReferenceAdapter, HMV3ControlNet, SKMotionModule
from .hm3_unet import HM3DenoisingNet, HM3ReferenceNet
from .hm4 import HM4SD15ControlProj, HMControlNetBase
from .hm5 import HM5bReferenceAdapter, HM5ControlNetBase, HM5DenoisingNet, HM5MotionAdapter, HM5ReferenceAdapter, HM5ReferenceNet, HM5SD15ControlProj, motion_pad_states
from .pdfgc import FanEncoder
from .reference import HMReferenceAdapter
from .unet import HMDenoisingNet, HMReferenceNet, motion_unet

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
