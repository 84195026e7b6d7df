"""The motion controls: which of the driving clip's motion the reference takes, its head pose
absolute or relative to the clip's first frame, and how far the expression moves. They act on
the driving signals (head pose angles, ARKit coefficients, face-part and PD-FGC embeddings)
between the signals stage and the sampler, using the reference picture's own signals, as
LivePortrait's relative motion, region and multiplier options do on its keypoints.

- `--pose relative`: frame t's rotation is R_t R_0^-1 applied on top of the reference's own
  rotation, so frame 0 is the reference's own pose and later frames turn by the driver's change.
- `--motion pose`: every frame keeps the reference's own expression inputs;
  `--motion expression`: every frame keeps the reference's own head pose (no translation).
- `--expression-scale S`: each expression input becomes e_0 + S (e_t - e_0) (ARKit
  coefficients then clipped to [0, 1], their range).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from hellomeme_cli.face.signals import DrivingSignals, angles_to_rotation, rotation_to_angles

def needs_reference_signals(pose: str, motion: str) -> bool:
    """Whether the controls read the reference picture's own signals."""
    return pose == "relative" or motion != "all"


def steer(signals: DrivingSignals, own: DrivingSignals | None, pose: str = "absolute", motion: str = "all", expression_scale: float = 1.0) -> DrivingSignals:
    """The driving signals with the motion controls applied; `own` (one frame: the reference
    picture's own signals, same encoders) is needed when `needs_reference_signals`."""
    if needs_reference_signals(pose, motion) and own is None:
        raise ValueError(f"--pose {pose} --motion {motion} needs the reference picture's own signals")
    n = len(signals)
    changes: dict = {}
    if motion == "expression":
        changes.update(angles=np.repeat(own.angles[:1], n, axis=0), translations=np.repeat(signals.translations[:1], n, axis=0))
    elif pose == "relative":
        rotations = angles_to_rotation(signals.angles)
        relative = rotations @ rotations[0].T @ angles_to_rotation(own.angles[:1])[0]
        changes["angles"] = rotation_to_angles(relative)
    if motion == "pose":
        changes.update(_expression(signals, lambda name, value: _repeat(getattr(own, name), n)))
    elif expression_scale != 1.0:
        changes.update(_expression(signals, lambda name, value: _scaled(name, value, expression_scale)))
    return dataclasses.replace(signals, **changes) if changes else signals


def _expression(signals: DrivingSignals, change) -> dict:
    """`change(name, value)` of each expression input the signals carry (ARKit coefficients always;
    face parts and PD-FGC when computed)."""
    names = ["drive_coeff"] + [name for name in ("face_parts", "pd_fpg") if getattr(signals, name) is not None]
    return {name: change(name, getattr(signals, name)) for name in names}


def _scaled(name: str, value: np.ndarray | torch.Tensor, scale: float):
    """e_0 + scale (e_t - e_0); ARKit coefficients stay in [0, 1]."""
    scaled = value[:1] + scale * (value - value[:1])
    return np.clip(scaled, 0.0, 1.0).astype(np.float32) if name == "drive_coeff" else scaled


def _repeat(value: np.ndarray | torch.Tensor, n: int):
    return np.repeat(value[:1], n, axis=0) if isinstance(value, np.ndarray) else value[:1].repeat(n, *([1] * (value.ndim - 1)))
