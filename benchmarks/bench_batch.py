"""Benchmark: clips per minute of `batch` on Ray with 1, 2, ... workers, and in this process.

    python -m benchmarks.bench_batch [--clips 8] [--workers 1 --workers 2] [--address HOST:PORT] [--json out.json]

Every run makes the same folder of clips (links to the project's test clips, cycled) from scratch:
a fresh output folder and no tracks cached, so each run tracks and loads its models itself (with
`--home`, the tracks the cache holds are kept: the runs after the first find them). The
time is the wall clock of `run_batch`, Ray's start and every worker's model loading included (what
a user waits for); `first ready` says how much of it went to starting the first worker. CPU with
tiny random weights by default (`--home` for a weight cache of real ones; on GPUs Ray gives each
worker one, so `--workers` up to the GPU count). Lives beside the package, not in it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from hellomeme_cli import __version__
from hellomeme_cli.batch.jobs import TRACK_CACHE, ClusterOptions, plan_folder
from hellomeme_cli.batch.run import run_batch
from hellomeme_cli.pipeline import AnimateSettings
from hellomeme_cli.progress import ProgressEvent
from hellomeme_cli.weights.tiny import make_tiny
from hellomeme_cli.weights.cache import WeightCache

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HELLOMEME_SHARED_DIR", ROOT.parent / "shared"))
CLIPS = ("jue.mp4", "qie.mp4", "tndtc.mp4", "ysll.mp4", "nice.mp4")


def clip_folder(folder: Path, count: int, media: Path) -> Path:
    """`count` links named clip01.mp4 ... to the test clips, in turn (nothing copied)."""
    folder.mkdir(parents=True)
    for number in range(count):
        (folder / f"clip{number + 1:02d}.mp4").symlink_to(media / CLIPS[number % len(CLIPS)])
    return folder


def one_run(
    folder: Path, reference: Path, settings: AnimateSettings, cache: WeightCache, workers: int | None, cold: bool, address: str | None = None
) -> dict:
    """One batch from scratch (`cold`: no track cached either); `workers` None runs in this process,
    else on a local Ray runtime or the cluster at `address`."""
    output = folder.parent / f"out-{workers or 'local'}"
    shutil.rmtree(output, ignore_errors=True)
    if cold:
        shutil.rmtree(cache.home / TRACK_CACHE, ignore_errors=True)
    started = time.monotonic()
    ready: list[float] = []

    def progress(event: ProgressEvent) -> None:
        if event.detail == "ready" and not ready:
            ready.append(time.monotonic() - started)

    plan = plan_folder(folder, reference, settings, output_dir=output)
    report = run_batch(plan, cache=cache, progress=progress, cluster=None if workers is None else ClusterOptions(address, workers))
    seconds = time.monotonic() - started
    made = report.count("ok")
    return {
        "workers": workers or "in process",
        "clips": len(report.clips),
        "ok": made,
        "seconds": round(seconds, 1),
        "clips_per_minute": round(made / seconds * 60, 2),
        "first_ready_seconds": round(ready[0], 1) if ready else None,
    }


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=8, help="clips in the folder (default: %(default)s)")
    parser.add_argument("--workers", type=int, action="append", help="Ray workers of a run; repeat (default: 1 and 2)")
    parser.add_argument("--no-local", action="store_true", help="leave out the run in this process")
    parser.add_argument("--address", help="the Ray cluster to run on (HOST:PORT, as `batch --ray`; default: a local runtime per run)")
    parser.add_argument("--home", type=Path, help="weight cache to use (default: tiny random weights made for the run)")
    parser.add_argument("--reference", type=Path, default=SHARED / "media" / "majicmix1.jpg", help="portrait (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="working size (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (default: %(default)s)")
    parser.add_argument("--max-frames", type=int, default=6, help="frames per clip (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    settings = AnimateSettings(size=arguments.size, steps=arguments.steps, max_frames=arguments.max_frames, guidance=1.0, window=4, overlap=0)
    with tempfile.TemporaryDirectory(prefix="hellomeme-bench-batch-") as scratch:
        scratch = Path(scratch)
        if arguments.home:
            cache = WeightCache(arguments.home)
        else:
            cache = make_tiny(scratch / "home")
            cache.import_path(SHARED / "models" / "face_landmarker.task")
        folder = clip_folder(scratch / "clips", arguments.clips, SHARED / "media")
        runs = [None] * (not arguments.no_local) + (arguments.workers or [1, 2])
        cold = arguments.home is None  # a weight cache of the user's keeps its tracks
        results = [one_run(folder, arguments.reference, settings, cache, workers, cold, arguments.address) for workers in runs]
    report = {
        "hellomeme": __version__,
        "machine": {"cpus": os.cpu_count(), "gpus": torch.cuda.device_count(), "python": platform.python_version(), "torch": torch.__version__},
        "cluster": arguments.address or "local",
        "settings": {"size": arguments.size, "steps": arguments.steps, "max_frames": arguments.max_frames, "weights": "given" if arguments.home else "tiny"},
        "runs": results,
    }
    print(f"{arguments.clips} clips, {arguments.max_frames} frames each, size {arguments.size}, {arguments.steps} steps, {os.cpu_count()} CPUs, {torch.cuda.device_count()} GPUs")
    print(f"{'workers':>12} {'ok':>4} {'seconds':>8} {'clips/min':>10} {'first ready s':>14}")
    for run in results:
        ready = "" if run["first_ready_seconds"] is None else f"{run['first_ready_seconds']:.1f}"
        print(f"{run['workers']!s:>12} {run['ok']:>4} {run['seconds']:>8.1f} {run['clips_per_minute']:>10.2f} {ready:>14}")
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
