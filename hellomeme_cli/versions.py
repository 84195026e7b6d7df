"""The HelloMeme versions as data: which weight components, networks, sampler and defaults each
one uses. Code elsewhere reads an entry; it never asks which version it is running.

Networks are named as "module:Class" strings (resolved with `resolve`) so that reading the
registry, as the command line does for its choices and defaults, does not import torch.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping

from hellomeme_cli.errors import HellomemeError

# The prompt the official v1 scripts give every clip; a user's prompt is put before it.
V1_PROMPT = (
    "(best quality), highly detailed, ultra-detailed, headshot, person, well-placed five sense organs, "
    "looking at the viewer, centered composition, sharp focus, realistic skin texture"
)


# The official v5b/v5c image prompt (model_config.json "prompt_new").
PROMPT_NEW = "best quality, highly detailed, masterpiece, person, portrait, headshot, looking at the viewer, sharp focus."

# The SD1.5 noise schedule every official pipeline builds its schedulers with (they ignore the
# checkpoint's scheduler config, whose timestep spacing can differ).
SD15_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
DPM_SDE = {**SD15_SCHEDULE, "algorithm_type": "sde-dpmsolver++"}


@dataclasses.dataclass(frozen=True)
class ControlKind:
    """One way to drive the expression: the control net (and, v4+, the projector that turns
    its features into the UNet's widths), the weights they and their signal encoder need,
    and which per-frame signals the control net takes besides the pose condition image."""

    name: str
    description: str
    control_net: str  # "module:Class"
    control_component: str
    encoder: str  # which signal encoder builds the inputs: "face_parts" (CLIP image encoder) or "pdfgc" (FanEncoder)
    encoder_component: str
    inputs: tuple[str, ...]  # DrivingFrames fields the control net takes after `condition`
    # (input, SamplerInputs field) pairs: the unconditional value of an input for guidance; other inputs get zeros.
    unconditional: tuple[tuple[str, str], ...] = ()
    control_proj: str | None = None  # "module:Class"
    control_proj_component: str | None = None

    @property
    def components(self) -> tuple[str, ...]:
        """The control net's weights (then the projector's), then the encoder's."""
        proj = (self.control_proj_component,) if self.control_proj_component else ()
        return (self.control_component, *proj, self.encoder_component)


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """A diffusers scheduler class ("module:Class") and its config."""

    cls: str
    config: Mapping[str, object]


@dataclasses.dataclass(frozen=True)
class SchedulerChoice:
    """A `--scheduler` name: a diffusers scheduler class (in `diffusers`) and what it changes in the
    version's own noise schedule, whose betas and training steps it keeps."""

    cls: str
    overrides: Mapping[str, object] = dataclasses.field(default_factory=dict)


# `--scheduler` short names; any other diffusers scheduler class name is taken as it is.
SCHEDULERS: dict[str, SchedulerChoice] = {
    "euler": SchedulerChoice("EulerDiscreteScheduler"),
    "euler-a": SchedulerChoice("EulerAncestralDiscreteScheduler"),
    "ddim": SchedulerChoice("DDIMScheduler"),
    "ddim-trailing": SchedulerChoice("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "dpm++": SchedulerChoice("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++-karras": SchedulerChoice("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++-sde": SchedulerChoice("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": SchedulerChoice("UniPCMultistepScheduler"),
    "lcm": SchedulerChoice("LCMScheduler"),
    "tcd": SchedulerChoice("TCDScheduler"),
}


@dataclasses.dataclass(frozen=True)
class FewStep:
    """A `--few-step` recipe: a released distillation LoRA for SD1.5 (a preset name, fetched like
    the others) with the scheduler, steps and guidance its authors give. Unproven on HelloMeme's
    adapters: `hellomeme compare` on real weights measures what it costs (docs/performance.md)."""

    lora: str
    scheduler: str
    steps: int
    guidance: float
    lora_scale: float = 1.0

    @property
    def defaults(self) -> dict[str, object]:
        """The generation settings it sets where the user gave none."""
        return {"scheduler": self.scheduler, "steps": self.steps, "guidance": self.guidance}


FEW_STEP: dict[str, FewStep] = {
    "lcm": FewStep("LCM-LoRA-SD15", "lcm", steps=6, guidance=1.5),
    "tcd": FewStep("TCD-SD15-LoRA", "tcd", steps=4, guidance=1.0),
    "hyper-sd": FewStep("Hyper-SD15-8steps", "ddim-trailing", steps=8, guidance=1.0),
}


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The generation defaults of a version (official scripts' values), and the settings it
    does not let a user change, with the reason (`fixed`: setting name -> why)."""

    steps: int = 25
    guidance: float = 2.0
    window: int = 12
    overlap: int = 4
    stage1_steps: int = 10
    control: str = "pdfgc"
    fixed: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Version:
    """One HelloMeme release. Its networks are built on SD1.5 UNets (the x1 recipe, engine.py):
    the reference net on the base UNet, the denoiser as `denoiser(unet, reference_adapter[,
    motion_adapter])`, the motion denoiser on diffusers' AnimateDiff motion UNet when the version
    has an AnimateDiff module (`motion_component`), else on the 2D UNet with its own motion modules."""

    name: str
    description: str
    modes: tuple[str, ...]  # "video" (animate, batch) and/or "image"
    base_component: str  # the SD1.5 weights the networks were trained on
    reference_adapter: str  # "module:Class" of the reference adapter
    reference_component: str
    motion_component: str | None  # AnimateDiff motion module (video only)
    controls: Mapping[str, ControlKind]
    sampler: str  # "module:Class" with a `from_pipeline(pipeline)` constructor
    prompt: str
    image_prompt: str | None = None  # the image runs' prompt, where it is not `prompt`
    reference_net: str = "hellomeme_cli.models:HMReferenceNet"
    denoiser: str = "hellomeme_cli.models:HMDenoisingNet"
    motion_adapter: str | None = None  # HelloMeme's own motion modules (v3+), "module:Class"
    motion_adapter_component: str | None = None
    # The video's first pass (v1/v2 stage 1, v3/v4 margin frames) runs on its own copy of SD1.5
    # (+ LoRAs; official `unet_pre`), not on the checkpoint's UNet; v5 runs every pass on the latter.
    base_first_pass: bool = True
    reference_control: bool = False  # v5c: the reference net also gets the reference's own control
    schedulers: Mapping[str, Scheduler] = dataclasses.field(
        default_factory=lambda: {mode: Scheduler("diffusers:EulerDiscreteScheduler", SD15_SCHEDULE) for mode in ("video", "image")}
    )
    defaults: Defaults = Defaults()

    def control(self, name: str | None = None) -> ControlKind:
        name = name or self.defaults.control
        if name not in self.controls:
            raise HellomemeError(f"HelloMeme {self.name} has no control {name!r} (use {' or '.join(self.controls)})")
        return self.controls[name]

    def prompt_for(self, mode: str) -> str:
        return self.image_prompt if mode == "image" and self.image_prompt else self.prompt

    def components(self, control: str | None = None, mode: str = "video") -> list[str]:
        """Every weight component a run of this version needs, the face model included."""
        motion = [self.motion_component, self.motion_adapter_component] if mode == "video" else []
        names = [self.base_component, self.reference_component, *motion, *self.control(control).components, "face_landmarker"]
        return [name for name in names if name]

    def all_components(self) -> list[str]:
        """Every weight component some run of this version needs (any control, any mode), once each."""
        return list(dict.fromkeys(n for mode in self.modes for control in self.controls for n in self.components(control, mode)))


def _controls(face_parts_net: str, face_parts_component: str, pdfgc_net: str, pdfgc_component: str, **more) -> dict[str, ControlKind]:
    """A version's two control kinds: ARKit blendshapes + CLIP face parts, and PD-FGC."""
    return {
        "blendshapes": ControlKind(
            "blendshapes",
            f"head pose + 51 ARKit blendshape coefficients + CLIP face-part embeddings ({face_parts_net.rpartition(':')[2]})",
            control_net=face_parts_net,
            control_component=face_parts_component,
            encoder="face_parts",
            encoder_component="image_encoder",
            inputs=("drive_coeff", "face_parts"),
            **more,
        ),
        "pdfgc": ControlKind(
            "pdfgc",
            f"head pose + PD-FGC motion embedding ({pdfgc_net.rpartition(':')[2]})",
            control_net=pdfgc_net,
            control_component=pdfgc_component,
            encoder="pdfgc",
            encoder_component="pd_fgc_motion",
            inputs=("pd_fpg",),
            **more,
        ),
    }


# v1 and v2 have a control net per signal; their PD-FGC guidance takes the encoder's output for a blank face.
_NEGATIVE_PDFGC = (("pd_fpg", "neg_pd_fpg"),)
_V1_CONTROLS = _controls("hellomeme_cli.models:HMControlNet", "hm_control", "hellomeme_cli.models:HMControlNet2", "hm_control2")
_V1_CONTROLS["pdfgc"] = dataclasses.replace(_V1_CONTROLS["pdfgc"], unconditional=_NEGATIVE_PDFGC)
# v2's control nets take the same signals as v1's and feed the denoiser's up path instead.
_V2_CONTROLS = _controls("hellomeme_cli.models:HMV2ControlNet", "hm2_control", "hellomeme_cli.models:HMV2ControlNet2", "hm2_control2")
_V2_CONTROLS["pdfgc"] = dataclasses.replace(_V2_CONTROLS["pdfgc"], unconditional=_NEGATIVE_PDFGC)
# From v3 on one control net takes either expression signal; v4+ project its features to the UNet's widths.
_V3_CONTROLS = _controls(*("hellomeme_cli.models:HMV3ControlNet", "hm3_control_mix") * 2)
_V4_CONTROLS = _controls(
    *("hellomeme_cli.models:HMControlNetBase", "hm_control_base") * 2,
    control_proj="hellomeme_cli.models:HM4SD15ControlProj", control_proj_component="hm4_control_proj",
)
_V5_CONTROLS = _controls(
    *("hellomeme_cli.models:HM5ControlNetBase", "hm5_control_base") * 2,
    control_proj="hellomeme_cli.models:HM5SD15ControlProj", control_proj_component="hm5_control_proj",
)
_V5C_CONTROLS = {name: dataclasses.replace(kind, control_proj_component="hm5c_control_proj") for name, kind in _V5_CONTROLS.items()}

# The official app's sliders: 25 steps, guidance 1.5; its control: HMControlNet2 (PD-FGC).
_APP_DEFAULTS = Defaults(steps=25, guidance=1.5, control="pdfgc")
# v3+ cut a clip into 12-frame windows sharing one frame, with no stage 1 (the official
# pipelines take `chunk_overlap` and ignore it: we refuse it).
_RECURSIVE_FIXED = {
    "overlap": "its windows always share exactly one frame",
}
_V3_DEFAULTS = dataclasses.replace(_APP_DEFAULTS, overlap=1, fixed=_RECURSIVE_FIXED)
_V5_DEFAULTS = dataclasses.replace(
    _APP_DEFAULTS, overlap=1, fixed={**_RECURSIVE_FIXED, "window": "its windows are always 12 frames"}
)
_V3_SCHEDULERS = {
    "video": Scheduler("diffusers:EulerDiscreteScheduler", SD15_SCHEDULE),
    "image": Scheduler("diffusers:DPMSolverMultistepScheduler", DPM_SDE),
}
_V5_SCHEDULERS = {mode: Scheduler("diffusers:DPMSolverMultistepScheduler", DPM_SDE) for mode in ("video", "image")}
_V3_FAMILY = dict(
    modes=("video", "image"),
    base_component="sd15",
    reference_net="hellomeme_cli.models:HM3ReferenceNet",
    denoiser="hellomeme_cli.models:HM3DenoisingNet",
    reference_adapter="hellomeme_cli.models:HM3ReferenceAdapter",
    motion_adapter="hellomeme_cli.models:HM3MotionAdapter",
    sampler="hellomeme_cli.samplers.recursive:HM3VideoSampler",
    prompt=V1_PROMPT,
    schedulers=_V3_SCHEDULERS,
    defaults=_V3_DEFAULTS,
)
_V5_FAMILY = dict(
    base_component="sd15",
    reference_net="hellomeme_cli.models:HM5ReferenceNet",
    denoiser="hellomeme_cli.models:HM5DenoisingNet",
    motion_component=None,
    motion_adapter="hellomeme_cli.models:HM5MotionAdapter",
    motion_adapter_component="hm5_motion",
    base_first_pass=False,
    sampler="hellomeme_cli.samplers.hm5:HM5VideoSampler",
    prompt=V1_PROMPT,
    schedulers=_V5_SCHEDULERS,
    defaults=_V5_DEFAULTS,
)

# The entries are alike in shape only: each is one release's data, what differs between them is the point.
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
        sampler="hellomeme_cli.samplers.two_stage:VideoSampler",
        prompt=V1_PROMPT,
        defaults=Defaults(),  # the v1 scripts' 25 steps and guidance 2; the app's control, PD-FGC
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
        sampler="hellomeme_cli.samplers.two_stage:VideoSampler",
        prompt=V1_PROMPT,  # generator.py's DEFAULT_PROMPT (model_config.json "prompt"), as v1's
        defaults=_APP_DEFAULTS,
    ),
    "v3": Version(
        name="v3",
        description="reference and motion modules on the up blocks, one control net for both signals, recursive coarse-to-fine sampler",
        reference_component="hm3_reference",
        motion_component="hm3_animatediff",
        motion_adapter_component="hm3_motion",
        controls=_V3_CONTROLS,
        **_V3_FAMILY,
    ),
    "v4": Version(
        name="v4",
        description="v3 with a control net of its own design (HMControlNetBase) and a projector to the UNet's widths",
        reference_component="hm4_reference",
        motion_component="hm4_animatediff",
        motion_adapter_component="hm4_motion",
        controls=_V4_CONTROLS,
        **_V3_FAMILY,
    ),
    "v5": Version(
        name="v5",
        description="reference attention and motion modules inside the 2D UNet (no AnimateDiff), DPM-Solver++ SDE",
        modes=("video", "image"),
        reference_adapter="hellomeme_cli.models:HM5ReferenceAdapter",
        reference_component="hm5_reference",
        controls=_V5_CONTROLS,
        **_V5_FAMILY,
    ),
    "v5b": Version(
        name="v5b",
        description="v5 with a retrained reference adapter (HM5bReferenceAdapter); images use the newer prompt",
        modes=("video", "image"),
        reference_adapter="hellomeme_cli.models:HM5bReferenceAdapter",
        reference_component="hm5b_reference",
        controls=_V5_CONTROLS,
        image_prompt=PROMPT_NEW,
        **_V5_FAMILY,
    ),
    "v5c": Version(
        name="v5c",
        description="images only: v5b's design with its own weights; the reference net also sees the reference's own pose and expression",
        modes=("image",),
        reference_adapter="hellomeme_cli.models:HM5bReferenceAdapter",
        reference_component="hm5c_reference",
        controls=_V5C_CONTROLS,
        image_prompt=PROMPT_NEW,
        reference_control=True,
        **_V5_FAMILY,
    ),
}
# The official app's defaults.
DEFAULT_VIDEO_VERSION = "v2"
DEFAULT_IMAGE_VERSION = "v5"
DEFAULT_VERSIONS = {"video": DEFAULT_VIDEO_VERSION, "image": DEFAULT_IMAGE_VERSION}


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


def users(component: str) -> list[str]:
    """The versions that need a weight component, each with the modes or controls that need it
    when not all do: e.g. ["v1 (blendshapes)", "v2 (blendshapes)"] for the CLIP image encoder."""
    found = []
    for version in VERSIONS.values():
        runs = [(mode, c) for mode in version.modes for c in version.controls if component in version.components(c, mode)]
        if not runs:
            continue
        detail = sorted({mode for mode, _ in runs}) if len({mode for mode, _ in runs}) < len(version.modes) else []
        detail += sorted({c for _, c in runs}) if len({c for _, c in runs}) < len(version.controls) else []
        found.append(version.name + (f" ({' '.join(detail)})" if detail else ""))
    return found


def resolve(target: str) -> type:
    """A "module:Class" name of the registry as the class."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
