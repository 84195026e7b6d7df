"""Frames per second of face tracking on the test clips, and where the time goes.

    PYTHONPATH=. python benchmarks/bench_tracking.py --json tracking.json

For each clip: decoding alone (read_frames), then track_video end to end (probe, decode, MediaPipe,
filling) without and with smoothing. The model is loaded once per track_video call, so its start-up
is measured once apart and counted in the end-to-end numbers as a user sees them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from hellomeme_cli.face import tracking

from hellomeme_cli.media import video

SHARED = Path(os.environ.get("HELLOMEME_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
CLIPS = ("jue.mp4", "nice.mp4", "qie.mp4", "ysll.mp4", "tndtc.mp4")


def seconds(run) -> tuple[float, object]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--media", type=Path, default=SHARED / "media")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "face_landmarker.task")
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs per measurement")
    args = parser.parse_args()

    startup, _ = seconds(lambda: tracking.track_video([video.read_image(args.media / "majicmix1.jpg")], fps=15, model_path=args.model))
    rows = []
    for name in CLIPS:
        clip = args.media / name
        frames = video.probe_video(clip).frame_count
        decode = min(seconds(lambda: sum(1 for _ in video.read_frames(clip)))[0] for _ in range(args.repeat))
        raw = min(seconds(lambda: tracking.track_video(clip, smoothing=None, model_path=args.model))[0] for _ in range(args.repeat))
        smoothed = min(seconds(lambda: tracking.track_video(clip, model_path=args.model))[0] for _ in range(args.repeat))
        rows.append({"clip": name, "frames": frames, "decode_fps": frames / decode, "track_fps": frames / raw, "track_smoothed_fps": frames / smoothed})

    total_frames = sum(row["frames"] for row in rows)
    overall = total_frames / sum(row["frames"] / row["track_smoothed_fps"] for row in rows)
    print(f"{'clip':<10} {'frames':>6} {'decode fps':>11} {'track fps':>10} {'+smoothing':>11}")
    for row in rows:
        print(f"{row['clip']:<10} {row['frames']:>6} {row['decode_fps']:>11.0f} {row['track_fps']:>10.1f} {row['track_smoothed_fps']:>11.1f}")
    print(f"all {total_frames} frames: {overall:.1f} fps end to end, model loading included; first call (import + load) {startup:.2f} s")
    if args.json:
        result = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
            "model_startup_s": startup,
            "overall_fps": overall,
            "clips": rows,
        }
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
