"""HelloMeme v1 networks, loadable from the authors' released folders."""

from .blocks import SKCrossAttention, SKReferenceAttention
from .control import HMControlNet, HMControlNet2
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
    "SKCrossAttention",
    "SKReferenceAttention",
    "motion_unet",
]
