"""HelloMeme v1 and v2 networks, loadable from the authors' released folders."""

from .blocks import SKCrossAttention, SKReferenceAttention
from .control import HMControlNet, HMControlNet2
from .control_v2 import HMV2ControlNet, HMV2ControlNet2
from .pdfgc import FanEncoder
from .reference import HMReferenceAdapter
from .unet import HMDenoisingNet, HMReferenceNet, motion_unet
from .hm5 import (
    HM5bReferenceAdapter,
    HM5ControlNetBase,
    HM5DenoisingNet,
    HM5MotionAdapter,
    HM5ReferenceAdapter,
    HM5ReferenceNet,
    HM5SD15ControlProj,
    motion_pad_states,
)

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
    "HM5bReferenceAdapter",
    "HM5ControlNetBase",
    "HM5DenoisingNet",
    "HM5MotionAdapter",
    "HM5ReferenceAdapter",
    "HM5ReferenceNet",
    "HM5SD15ControlProj",
    "motion_pad_states",
]
