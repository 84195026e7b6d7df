"""The HelloMeme versions as data: which weight components, networks, sampler and defaults each
one uses. Code elsewhere reads an entry; it never asks which version it is running.

Networks are named as "module:Class" strings (resolved with `resolve`) so that reading the
registry, as the command line does for its choices and defaults, does not import torch.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping

from .errors import HellomemeError

# The prompt the official v1 scripts give every clip; a user's prompt is put before it.
V1_PROMPT = (
    "(best quality), highly detailed, ultra-detailed, headshot, person, well-placed five sense organs, "
    "looking at the viewer, centered composition, sharp focus, realistic skin texture"
)


@dataclasses.dataclass(frozen=True)
class ControlKind:
    """One way to drive the expression: the control net, the weights it and its signal encoder
    need, and which per-frame signals it takes besides the pose condition image."""

    name: str
    description: str
    control_net: str  # "module:Class"
    components: tuple[str, ...]  # the control net's weights, then the encoder's
    inputs: tuple[str, ...]  # DrivingFrames fields the control net takes after `condition`
    encoder: str  # which signal encoder builds them: "face_parts" (CLIP image encoder) or "pdfgc" (FanEncoder)
    # (input, SamplerInputs field) pairs: the unconditional value of an input for guidance; other inputs get zeros.
    unconditional: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The generation defaults of a version (official scripts' values)."""

    steps: int = 25
    guidance: float = 2.0
    window: int = 12
    overlap: int = 4
    stage1_steps: int = 10
    control: str = "blendshapes"


@dataclasses.dataclass(frozen=True)
class Version:
    name: str
    description: str
    modes: tuple[str, ...]  # "video" (animate, batch) and/or "image"
    base_component: str  # the SD1.5 weights the networks were trained on
    reference_adapter: str  # "module:Class" of the reference adapter
    reference_component: str
    motion_component: str | None  # AnimateDiff motion module (video only)
    controls: Mapping[str, ControlKind]
    sampler: str  # "module:Class"
    prompt: str
    scheduler: str = "diffusers:EulerDiscreteScheduler"  # run on the base component's scheduler_config.json
    defaults: Defaults = Defaults()

    def control(self, name: str | None = None) -> ControlKind:
        name = name or self.defaults.control
        if name not in self.controls:
            raise HellomemeError(f"HelloMeme {self.name} has no control {name!r} (use {' or '.join(self.controls)})")
        return self.controls[name]

    def components(self, control: str | None = None, mode: str = "video") -> list[str]:
        """Every weight component a run of this version needs, the face model included."""
        motion = [self.motion_component] if mode == "video" and self.motion_component else []
        return [self.base_component, self.reference_component, *motion, *self.control(control).components, "face_landmarker"]

    def all_components(self) -> list[str]:
        """Every weight component some run of this version needs (any control, any mode), once each."""
        return list(dict.fromkeys(n for mode in self.modes for control in self.controls for n in self.components(control, mode)))


_V1_CONTROLS = {
    "blendshapes": ControlKind(
        "blendshapes",
        "head pose + ARKit blendshape coefficients + CLIP face-part embeddings (HMControlNet)",
        control_net="hellomeme_cli.models:HMControlNet",
        components=("hm_control", "image_encoder"),
        inputs=("drive_coeff", "face_parts"),
        encoder="face_parts",
    ),
    "pdfgc": ControlKind(
        "pdfgc",
        "head pose + PD-FGC motion embedding (HMControlNet2)",
        control_net="hellomeme_cli.models:HMControlNet2",
        components=("hm_control2", "pd_fgc_motion"),
        inputs=("pd_fpg",),
        encoder="pdfgc",
        unconditional=(("pd_fpg", "neg_pd_fpg"),),
    ),
}

# v2's control nets take the same signals as v1's and feed the denoiser's up path instead.
_V2_CONTROLS = {
    "blendshapes": dataclasses.replace(
        _V1_CONTROLS["blendshapes"],
        description="head pose + ARKit blendshape coefficients + CLIP face-part embeddings (HMV2ControlNet)",
        control_net="hellomeme_cli.models:HMV2ControlNet",
        components=("hm2_control", "image_encoder"),
    ),
    "pdfgc": dataclasses.replace(
        _V1_CONTROLS["pdfgc"],
        description="head pose + PD-FGC motion embedding (HMV2ControlNet2)",
        control_net="hellomeme_cli.models:HMV2ControlNet2",
        components=("hm2_control2", "pd_fgc_motion"),
    ),
}

VERSIONS: dict[str, Version] = {
    "v1": Version(
        name="v1",
        description="the paper: reference adapter (down, mid, up), control after down blocks, AnimateDiff, two-stage sampler",
        modes=("video", "image"),
        base_component="sd15",
        reference_adapter="hellomeme_cli.models:HMReferenceAdapter",
        reference_component="hm_reference",
        motion_component="hm_animatediff_frame12",
        controls=_V1_CONTROLS,
        sampler="hellomeme_cli.sampler:VideoSampler",
        prompt=V1_PROMPT,
    ),
    "v2": Version(
        name="v2",
        description="reference adapter on the up blocks only, control added before the up blocks, same sampler as v1",
        modes=("video", "image"),
        base_component="sd15",
        reference_adapter="hellomeme_cli.models:HMReferenceAdapter",  # its config.json says version "v2"
        reference_component="hm2_reference",
        motion_component="hm2_animatediff_frame12",
        controls=_V2_CONTROLS,
        sampler="hellomeme_cli.sampler:VideoSampler",
        prompt=V1_PROMPT,  # generator.py's DEFAULT_PROMPT (model_config.json "prompt"), as v1's
        # The official app's sliders (25 steps, guidance 1.5, overlap 4) and control (HMControlNet2).
        defaults=Defaults(steps=25, guidance=1.5, window=12, overlap=4, stage1_steps=10, control="pdfgc"),
    ),
}
DEFAULT_VIDEO_VERSION = "v1"
DEFAULT_IMAGE_VERSION = "v1"


def get_version(name: str, mode: str = "video") -> Version:
    """The registry entry, or a one-line error listing the versions that can do `mode`."""
    version = VERSIONS.get(name)
    if version is None or mode not in version.modes:
        known = ", ".join(v.name for v in VERSIONS.values() if mode in v.modes)
        raise HellomemeError(f"unknown HelloMeme version {name!r} for {mode} (use {known})")
    return version


def any_version(name: str) -> Version:
    """The registry entry whatever it can do, or a one-line error listing every version."""
    if name not in VERSIONS:
        raise HellomemeError(f"unknown HelloMeme version {name!r} (use {', '.join(VERSIONS)})")
    return VERSIONS[name]


def version_names(mode: str) -> tuple[str, ...]:
    return tuple(v.name for v in VERSIONS.values() if mode in v.modes)


def resolve(target: str) -> type:
    """A "module:Class" name of the registry as the class."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
