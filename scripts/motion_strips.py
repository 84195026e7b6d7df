"""Write the still strips docs/usage.md shows for the motion controls: for each control, the
first, middle and last frame's condition image (the pose square the control net sees) with bars
of three ARKit coefficients, from a real clip driving a real portrait (`../shared/media`).

    .venv/bin/python scripts/motion_strips.py [--media ../shared/media] [--out docs/images]

Only the driving signals are drawn (no network runs): they are what the controls change."""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from hellomeme_cli.face import signals as S
from hellomeme_cli.face import tracking
from hellomeme_cli.face.steering import steer
from hellomeme_cli.media.video import read_image, write_image

CONTROLS = {
    "absolute": {},
    "relative": {"pose": "relative"},
    "motion-pose": {"motion": "pose"},
    "motion-expression": {"motion": "expression"},
    "expression-scale-2": {"expression_scale": 2.0},
}
BARS = ("jawOpen", "eyeBlinkLeft", "mouthSmileLeft")
CELL = 192


def cell(signals: S.DrivingSignals, frame: int) -> np.ndarray:
    condition = signals.control_inputs(frame, frame + 1)["condition"][0, :, 0]
    image = ((condition.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    image = cv2.resize(image, (CELL, CELL), interpolation=cv2.INTER_AREA)
    for row, name in enumerate(BARS):
        value = float(signals.drive_coeff[frame, S.ARKIT_BLENDSHAPES.index(name)])
        top = CELL - 14 * (len(BARS) - row)
        cv2.rectangle(image, (4, top), (4 + int(value * 100), top + 9), (255, 255, 255), -1)
        cv2.putText(image, name, (110, top + 9), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (200, 200, 200), 1)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media", type=Path, default=Path("../shared/media"))
    parser.add_argument("--model", type=Path, default=Path("../shared/models/face_landmarker.task"))
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    picture = read_image(args.media / "majicmix1.jpg")
    reference = S.prepare_reference(picture, tracking.track_image(picture, model_path=args.model))
    clip = tracking.track_video(args.media / "ysll.mp4", max_frames=60, model_path=args.model)
    signals = S.build_driving_signals(clip, [], reference)
    own = S.build_driving_signals(tracking.track_image(picture, model_path=args.model), [picture], reference)
    frames = (0, len(signals) // 2, len(signals) - 1)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, controls in CONTROLS.items():
        steered = steer(signals, own, **controls)
        strip = np.concatenate([cell(steered, frame) for frame in frames], axis=1)
        write_image(strip, args.out / f"motion-{name}.png", force=True)


if __name__ == "__main__":
    main()
