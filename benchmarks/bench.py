"""Benchmarks: where the time and memory of `animate` go, measured on the real pipeline.

    python -m benchmarks.bench --json out.json [--full-size]     # from the project root (make bench)

- CPU, tiny random weights (`tiny.make_tiny`) and the real face model, a real clip: seconds per
  output frame of each stage, timed from the pipeline's own progress events (`StageClock`), and
  the peak RSS. Each run is a fresh Python process, so every peak is that run's own.
- The same at growing clip lengths (a real clip looped by ffmpeg): memory must not grow with them.
- GPU (CUDA only), SD1.5-shaped random networks at 512x512: seconds per frame per stage, peak GPU
  memory, and the UNets' matrix-unit utilisation (counted FLOPs / time / the GPU's peak).
- Face tracking frames per second.
- The CPU's float32 and bfloat16 side by side: one guided call of the full-size SD1.5 UNet (random
  weights) in each, at a few sizes, and whether the CPU computes bfloat16 natively (`hellomeme info`).

Timings are wall clock, best of one run. Lives beside the package, not in it: it measures the
checkout it sits in (`ROOT`), with the project's test media as default inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import diffusers
import torch
import transformers
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from hellomeme_cli import __version__
from hellomeme_cli.versions import get_version
from hellomeme_cli.engine import load_pipeline
from hellomeme_cli.model_options import resolve_device
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.pipeline import AnimateSettings, animate, load_reference
from hellomeme_cli.settings import ModelOptions
from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress
from hellomeme_cli.weights.tiny import full_unet, make_tiny
from hellomeme_cli.face.tracking import default_model_path, track_video
from hellomeme_cli.media.files import write_atomically
from hellomeme_cli.media.files import check_destination
from hellomeme_cli.media.video import ffmpeg_exe, probe_video
from hellomeme_cli.weights.cache import WeightCache

ROOT = Path(__file__).resolve().parents[1]
# The project's test media (`../shared` beside the checkout), the default reference and clip.
SHARED_MEDIA = Path(os.environ.get("HELLOMEME_SHARED_DIR", ROOT.parent / "shared")) / "media"
STAGES = ("tracking", "signals", "reference", "stage1", "stage2", "decode", "encode")
# Which stage the time up to a progress event belongs to. The time up to a stage's first event
# (completed 0) belongs to what ran before it: the prompt, the VAE encoding of the reference and
# the reference net run between the driving signals and stage 1.
_TASK_STAGES = {"tracking": "tracking", "driving signals": "signals", "stage 1": "stage1", "stage 2": "stage2", "decode": "decode", "writing": "encode"}
_STARTS = {"stage 1": "reference"}
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
    "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0,
}


class StageClock:
    """A progress callback that attributes the wall time between consecutive events to the stage
    of the later one; `finish()` gives what ran after the last event (ffmpeg finishing the file)
    to `encode`. Decoding reports a batch before handing it to the writer, so the two interleaved
    stages are told apart."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._last = time.perf_counter()

    def __call__(self, event: ProgressEvent) -> None:
        now = time.perf_counter()
        stage = _STARTS.get(event.task) if event.completed == 0 else None
        stage = stage or _TASK_STAGES.get(event.task)
        if stage is not None:
            self.seconds[stage] += now - self._last
        self._last = now

    def finish(self) -> dict[str, float]:
        self.seconds["encode"] += time.perf_counter() - self._last
        return dict(self.seconds)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def current_rss_mb() -> float:
    with contextlib.suppress(OSError):
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return peak_rss_mb()


# FlopCounterMode knows the GPU attention kernels but not the CPU one (torch 2.13), whose FLOPs it
# would leave out.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value)
}


def count_flops(module: torch.nn.Module, *args, **kwargs) -> int:
    """Floating-point operations of one forward call (a multiply-add counts 2), by
    `torch.utils.flop_counter`; the call really runs."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with torch.no_grad(), counter:
        module(*args, **kwargs)
    return counter.get_total_flops()


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "hellomeme": __version__,
    }


# ------------------------------------------------------------------------------------------
# One animate run, measured (in a fresh process for the CPU runs)
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClipRun:
    """One measured `animate` run: which weights, which clip, at which settings."""

    home: str  # the weight cache
    reference: str
    driving: str
    output: str
    size: int = 128
    steps: int = 4
    guidance: float = 2.0
    max_frames: int | None = None
    device: str = "cpu"
    dtype: str = "auto"


def measure_clip(run: ClipRun, models=None) -> dict:
    """Load the models (unless given), then animate once with a `StageClock`; -> stage seconds,
    seconds per output frame, RSS after loading and at peak (this process), GPU peak on CUDA."""
    options = ModelOptions(version="v1", control="blendshapes", device=run.device, dtype=run.dtype)
    started = time.perf_counter()
    models = models or load_pipeline(options.version, options, WeightCache(Path(run.home)))
    loading = time.perf_counter() - started
    settings = AnimateSettings(models=options, steps=run.steps, guidance=run.guidance, seed=0, max_frames=run.max_frames, size=run.size)
    reference = load_reference(Path(run.reference), settings, models.face_model)
    loaded_rss = current_rss_mb()
    if models.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(models.device)
    clock = StageClock()
    result = animate(reference, Path(run.driving), Path(run.output), settings, models, force=True, progress=clock)
    seconds = clock.finish()
    measured = {
        "settings": dataclasses.asdict(run) | {"window": settings.window, "overlap": settings.overlap},
        "frames": result.frames,
        "load_seconds": loading,
        "total_seconds": result.seconds,
        "stage_seconds": seconds,
        "seconds_per_frame": {stage: value / result.frames for stage, value in seconds.items()},
        "rss_after_loading_mb": loaded_rss,
        "peak_rss_mb": peak_rss_mb(),
    }
    if models.device.type == "cuda":
        measured["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(models.device) / 2**20
    return measured


def run_worker(module: str, arguments: Sequence[str], failure: str, cwd: Path | None = None) -> None:
    """`python -m module --worker ARGUMENTS` in a fresh interpreter (its peak RSS is that run's alone),
    the checkout first on the path so the worker measures the same code as this process; a failed run
    is one line: `failure`, then the worker's last line of stderr (or its exit status)."""
    command = [sys.executable, "-m", module, "--worker", *arguments]
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}, cwd=cwd)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        raise HellomemeError(f"{failure}: {tail}")


def measure_in_subprocess(run: ClipRun) -> dict:
    """`measure_clip` in a fresh interpreter, so its peak RSS is this run's alone."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        run_worker("benchmarks.bench", [json.dumps(dataclasses.asdict(run)), str(result)], "benchmark run failed")
        return json.loads(result.read_text())


def loop_clip(source: Path, frames: int, destination: Path) -> Path:
    """`source` repeated until it has `frames` frames (audio too), re-encoded with ffmpeg."""
    info = probe_video(source)
    command = [
        ffmpeg_exe(), "-v", "error", "-y", "-stream_loop", "-1", "-i", str(source), "-t", f"{frames / info.fps:.6f}",
        "-frames:v", str(frames), "-c:v", "libx264", "-preset", "ultrafast", "-crf", "18", "-pix_fmt", "yuv420p",
        "-c:a", "aac", str(destination),
    ]
    subprocess.run(command, check=True, capture_output=True)
    return destination


def tiny_home(folder: Path, face_model: Path) -> Path:
    """A weight cache with tiny random networks and the real face model."""
    make_tiny(folder).import_path(face_model)
    return folder


# ------------------------------------------------------------------------------------------
# Face tracking speed
# ------------------------------------------------------------------------------------------


def tracking_speed(clips: list[Path], face_model: Path) -> dict:
    """Frames per second of `track_video` (decode, MediaPipe, filling, smoothing) per clip, and overall."""
    rows = []
    for clip in clips:
        started = time.perf_counter()
        frames = len(track_video(clip, model_path=face_model))
        rows.append({"clip": clip.name, "frames": frames, "fps": frames / (time.perf_counter() - started)})
    total = sum(row["frames"] for row in rows)
    return {"clips": rows, "overall_fps": total / sum(row["frames"] / row["fps"] for row in rows)}


# ------------------------------------------------------------------------------------------
# Full size on a GPU: SD1.5-shaped random networks
# ------------------------------------------------------------------------------------------


# Every version's runs: (version, mode); v5c makes pictures only.
FULL_SIZE_RUNS = (("v1", "video"), ("v2", "video"), ("v3", "video"), ("v4", "video"), ("v5", "video"), ("v5b", "video"), ("v5c", "image"))


def peak_tflops(gpu_name: str) -> float | None:
    """The GPU's dense bf16 peak from `PEAK_BF16_TFLOPS`, longest matching name first."""
    for name in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if name.lower() in gpu_name.lower():
            return PEAK_BF16_TFLOPS[name]
    return None


def _text_width(home: Path) -> int:
    """The prompt embeddings' width the cache's SD1.5 text encoder makes (768 at full size)."""
    return json.loads((home / "sd15" / "text_encoder" / "config.json").read_text())["hidden_size"]


def full_size_weights(home: Path, components: Sequence[str]) -> float:
    """Full-size random weights of `components` in the cache at `home`, written where missing (one
    folder serves every version and every run; the sampler reads no face model, a placeholder
    stands in) -> the seconds spent writing."""
    from benchmarks import vs_official
    from hellomeme_cli.weights.tiny import make_full_size

    started = time.perf_counter()
    missing = [name for name in dict.fromkeys(components) if not (home / name).is_dir() or not any((home / name).iterdir())]
    if missing:
        make_full_size(home, missing)
    if not (home / "face_landmarker").is_dir():
        vs_official._face_model_placeholder(home)
    return time.perf_counter() - started


def unet_utilisation(measured: dict, peak: float | None) -> dict:
    """The UNets' achieved rate: FLOPs per frame of each UNet role (its first call, counted) x the
    frames through it, over the seconds spent in it; and that rate over the GPU's peak."""
    flops = measured.get("flops_per_frame") or {}
    calls = measured["calls_per_frame"]
    seconds = sum(calls[role]["seconds"] for role in flops)
    work = sum(flops[role] * calls[role]["frames"] for role in flops)
    achieved = work / seconds / 1e12 if seconds and work else None
    return {"flops_per_frame": flops, "achieved_tflops": achieved, "utilisation": achieved / peak if achieved and peak else None}


def measure_full_size(
    runs: Sequence[tuple[str, str]] = FULL_SIZE_RUNS,
    frame_counts: tuple[int, ...] = (24, 96),
    *,
    device: str = "cuda",
    dtype: str = "auto",
    steps: int = 25,
    guidance: float = 1.5,
    size: int = 512,
    control: str = "pdfgc",
    options: ModelOptions | None = None,
    weights: Path | None = None,
) -> dict:
    """Each version's sampler on full-size random weights in the released layout (written once for
    every run, `full_size_weights`, into `weights` when given: kept for the next call, and missing ones
    added), one fresh process per run,
    random driving inputs (no tracking, no ffmpeg: what a borrowed GPU lacks does not matter): seconds
    per output frame, peak memory, network calls per frame and the UNets' utilisation."""
    from benchmarks import vs_official

    options = options or ModelOptions()
    speed = {name: getattr(options, name) for name in ("compile", "channels_last", "low_memory")}
    gpu = torch.cuda.get_device_name(resolve_device(device)) if device.startswith("cuda") else None
    peak = peak_tflops(gpu) if gpu else None
    with tempfile.TemporaryDirectory(prefix="hellomeme-full-size-") as folder:
        home = weights or Path(folder) / "weights"
        needed = [name for version, mode in runs for name in vs_official.weight_components(get_version(version, mode), [mode], control)]
        written = full_size_weights(home, needed)
        rows = []
        for version, mode in runs:
            for frames in frame_counts if mode == "video" else (1,):
                inputs = Path(folder) / f"inputs-{version}-{mode}-{frames}.safetensors"
                save_file(vs_official.draw_inputs(get_version(version, mode), mode, size, frames, control, 0, _text_width(home)), str(inputs))
                run = vs_official.Run(
                    "ours", version, mode, str(home), str(inputs), size, frames, steps, guidance, device, dtype, control, 0,
                    options=speed, flops=not options.compile,  # the FLOP counter's replay would recompile
                )
                _, measured = vs_official.run_side(run)
                rows.append({
                    "version": version, "mode": mode, "frames": frames, "seconds": measured["seconds"],
                    "seconds_per_frame": measured["seconds"] / frames, "peak_memory_gb": measured["peak_memory_gb"],
                    "calls_per_frame": measured["calls_per_frame"], "unet": unet_utilisation(measured, peak),
                })
    return {
        "device": gpu or device, "dtype": dtype, "size": size, "steps": steps, "guidance": guidance, "options": speed,
        "weights_seconds": written, "peak_bf16_tflops": peak, "runs": rows,
    }


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What `run_benchmarks` measures. Clip runs use tiny weights on the CPU at `size`;
    `memory_frames` are the looped clip lengths; `full_size` adds the GPU run (CUDA only)."""

    reference: Path
    driving: Path
    face_model: Path
    size: int = 128
    steps: int = 4
    clip_frames: int | None = None
    memory_frames: tuple[int, ...] = (100, 1000)
    memory_steps: int = 1  # memory does not depend on the step count; time does
    full_size: bool = False
    full_size_runs: tuple[tuple[str, str], ...] = FULL_SIZE_RUNS
    full_size_frames: tuple[int, ...] = (24, 96)
    full_size_steps: int = 25
    full_size_dtype: str = "auto"  # float16 on a GPU
    full_size_options: ModelOptions | None = None  # speed flags (compile, channels_last, low_memory) for the GPU run
    full_size_weights: Path | None = None  # a folder to keep the full-size random weights in (else a temporary one)
    full_size_only: bool = False  # only the full-size runs (a borrowed GPU: no tracking, no ffmpeg needed)
    dtype_sizes: tuple[int, ...] = (128, 512)  # the CPU's float32 against bfloat16 at these sizes (none: not measured)


def run_benchmarks(settings: BenchSettings, progress: ProgressCallback = no_progress) -> dict:
    """Every measurement in `settings`, as one JSON-ready dict (machine and versions included)."""
    cpu = [] if settings.full_size_only else ["tracking", "clip", *(f"memory {n}" for n in settings.memory_frames), *(["dtypes"] if settings.dtype_sizes else [])]
    steps = [*cpu, *(["full size"] if settings.full_size else [])]

    def done(step: str) -> None:
        progress(ProgressEvent("benchmarks", steps.index(step) + 1, len(steps), unit="runs"))

    result: dict = {"machine": machine(), "settings": _jsonable(dataclasses.asdict(settings))}
    if cpu:
        result.update(measure_cpu(settings, done))
    if not settings.full_size:
        result["gpu_full_size"] = {"skipped": "not asked for (--full-size)"}
    elif not torch.cuda.is_available():
        result["gpu_full_size"] = {"skipped": "no CUDA GPU on this machine"}
    else:
        result["gpu_full_size"] = measure_full_size(
            settings.full_size_runs, settings.full_size_frames, steps=settings.full_size_steps, dtype=settings.full_size_dtype,
            options=settings.full_size_options, weights=settings.full_size_weights,
        )
    if settings.full_size:
        done("full size")
    return result


def measure_cpu(settings: BenchSettings, done: Callable[[str], None]) -> dict:
    """Face tracking, the tiny-weight clip run and the memory runs on the CPU."""
    result: dict = {"tracking": tracking_speed([settings.driving], settings.face_model)}
    done("tracking")
    with tempfile.TemporaryDirectory(prefix="hellomeme-bench-") as folder:
        folder = Path(folder)
        home = tiny_home(folder / "weights", settings.face_model)

        def run(driving: Path, name: str, steps: int, max_frames: int | None) -> dict:
            clip_run = ClipRun(str(home), str(settings.reference), str(driving), str(folder / name), settings.size, steps, max_frames=max_frames)
            return measure_in_subprocess(clip_run)

        result["cpu_tiny"] = run(settings.driving, "clip.mp4", settings.steps, settings.clip_frames)
        done("clip")
        result["memory"] = []
        for frames in settings.memory_frames:
            clip = loop_clip(settings.driving, frames, folder / f"drive_{frames}.mp4")
            result["memory"].append(run(clip, f"memory_{frames}.mp4", settings.memory_steps, None))
            done(f"memory {frames}")
    if settings.dtype_sizes:
        result["cpu_dtypes"] = cpu_dtypes(full_unet(), settings.dtype_sizes)
        done("dtypes")
    return result


def cpu_dtypes(unet: torch.nn.Module, sizes: Sequence[int], dtypes: Sequence[str] = ("float32", "bfloat16"), repeats: int = 2) -> dict:
    """Seconds of one guided call of `unet` (batch 2, the unconditional and conditional halves, as the
    samplers call it) on the CPU at each size, in each dtype: the fastest of `repeats` after a first
    call that sets up the kernels. What `--dtype bfloat16` gains or loses on this CPU."""
    from hellomeme_cli.model_options import native_bfloat16, resolve_dtype

    seconds: dict[str, dict[str, float]] = {}
    generator = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        unet.to(resolve_dtype(dtype, torch.device("cpu")))
        for size in sizes:
            latents = torch.randn(2, unet.config.in_channels, size // 8, size // 8, generator=generator).to(unet.dtype)
            text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(unet.dtype)
            with torch.no_grad():
                unet(latents, 999, encoder_hidden_states=text)
                timings = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    unet(latents, 999, encoder_hidden_states=text)
                    timings.append(time.perf_counter() - started)
            seconds.setdefault(str(size), {})[dtype] = min(timings)
    return {"native_bfloat16": native_bfloat16(), "threads": torch.get_num_threads(), "seconds": seconds}


def write_json(result: dict, path: Path) -> None:
    write_atomically(path, json.dumps(result, indent=1) + "\n")


def format_table(result: dict) -> str:
    """The headline numbers as a few aligned lines of text."""
    lines = [f"{result['machine']['cpu']} ({result['machine']['cpu_cores']} cores), torch {result['machine']['torch']}"]
    if "tracking" in result:
        lines.append(f"face tracking: {result['tracking']['overall_fps']:.1f} frames/s")
        clip = result["cpu_tiny"]
        lines.append(f"CPU, tiny weights, {clip['settings']['size']} px, {clip['settings']['steps']} steps, {clip['frames']} frames: s/frame")
        lines.append("  " + "  ".join(f"{stage} {clip['seconds_per_frame'][stage]:.3f}" for stage in STAGES))
        lines.append(f"  peak RSS {clip['peak_rss_mb']:.0f} MB (after loading {clip['rss_after_loading_mb']:.0f} MB)")
        for run in result["memory"]:
            lines.append(f"memory, {run['frames']} frames: peak RSS {run['peak_rss_mb']:.0f} MB (after loading {run['rss_after_loading_mb']:.0f} MB)")
    if "cpu_dtypes" in result:
        lines.extend(cpu_dtype_lines(result["cpu_dtypes"]))
    gpu = result["gpu_full_size"]
    if "skipped" in gpu:
        lines.append(f"GPU full size: skipped ({gpu['skipped']})")
    lines.extend(full_size_lines(gpu))
    return "\n".join(lines)


def cpu_dtype_lines(measured: dict) -> list[str]:
    """float32 and bfloat16 side by side, per size, with bfloat16's speed-up."""
    native = measured["native_bfloat16"]
    said = "unknown" if native is None else native or "no"
    lines = [f"CPU, SD1.5 UNet (full size), one guided call, {measured['threads']} threads; native bfloat16: {said}"]
    for size, by_dtype in measured["seconds"].items():
        cells = ", ".join(f"{dtype} {value:.2f} s" for dtype, value in by_dtype.items())
        ratio = by_dtype["float32"] / by_dtype["bfloat16"] if {"float32", "bfloat16"} <= set(by_dtype) else None
        lines.append(f"  {size} px: {cells}" + (f" (bfloat16 {ratio:.2f}x the float32 speed)" if ratio else ""))
    return lines


def full_size_lines(gpu: dict) -> list[str]:
    """One line per full-size run: seconds per output frame, peak memory, the UNets' rate."""
    lines = []
    if gpu.get("runs"):
        lines.append(f"full size on {gpu['device']} ({gpu['dtype']}, {gpu['size']} px, {gpu['steps']} steps, options {gpu['options']}):")
    for run in gpu.get("runs", []):
        unet = run["unet"]
        rate = f"; UNet {unet['achieved_tflops']:.1f} TFLOP/s" if unet["achieved_tflops"] else ""
        lines.append(
            f"  {run['version']} {run['mode']}, {run['frames']} frames: {run['seconds_per_frame']:.3f} s/frame; peak {run['peak_memory_gb']:.2f} GB"
            + rate + (f" = {unet['utilisation']:.1%} of peak" if unet["utilisation"] else "")
        )
    return lines


def _jsonable(value):
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def quiet_libraries() -> None:
    """diffusers and transformers warn about random weights and draw their own bars; not here."""
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _print_progress(event: ProgressEvent) -> None:
    print(f"{event.task} {event.completed}/{event.total} {event.unit}", file=sys.stderr, flush=True)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Measure speed and memory: stage times and peak RSS with tiny weights on the CPU, "
        "face tracking fps, full size on a GPU.",
    )
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument("--full-size", action="store_true", help="add the full-size runs: every version's networks at their released sizes, random weights, 512x512 (CUDA GPU only)")
    parser.add_argument("--versions", nargs="+", help="full-size runs: v1 ... v5b (video), v5c or VERSION:image (default: every version)")
    parser.add_argument("--full-size-steps", type=int, default=25, help="denoising steps of the full-size runs (default: %(default)s)")
    parser.add_argument("--full-size-dtype", default="auto", help="dtype of the full-size runs (default: auto = float16 on a GPU)")
    parser.add_argument("--full-size-only", action="store_true", help="only the full-size runs (no tracking, clip or memory runs on the CPU)")
    parser.add_argument("--full-size-weights", type=Path, help="keep the full-size random weights in this folder for the next run (default: a temporary one)")
    parser.add_argument("--frames", type=int, action="append", help="looped clip lengths for the memory runs; repeat (default: 100 and 1000)")
    parser.add_argument("--full-size-frames", type=int, action="append", help="clip lengths of the full-size run; repeat (default: 24 and 96)")
    parser.add_argument("--reference", type=Path, default=SHARED_MEDIA / "majicmix1.jpg", help="portrait (default: %(default)s)")
    parser.add_argument("--drive", type=Path, default=SHARED_MEDIA / "qie.mp4", help="driving clip (default: %(default)s)")
    parser.add_argument("--face-model", type=Path, help="MediaPipe face_landmarker.task (default: the weight cache's)")
    parser.add_argument("--size", type=int, default=128, help="working size of the CPU runs with tiny weights (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the CPU clip run; memory runs use 1 (default: %(default)s)")
    parser.add_argument("--max-frames", type=int, help="use only the first N frames of the clip in the CPU clip run")
    parser.add_argument("--compile", action="store_true", help="full-size run: torch.compile the UNet and VAE blocks")
    parser.add_argument("--channels-last", action="store_true", help="full-size run: channels-last memory format")
    parser.add_argument("--low-memory", action="store_true", help="full-size run: block-level offloading, no kept control features")
    parser.add_argument("--dtype-sizes", nargs="*", type=int, default=[128, 512], help="sizes of the CPU's float32-against-bfloat16 UNet calls; none to skip (default: 128 512)")
    parser.add_argument("--worker", nargs=2, metavar=("RUN_JSON", "RESULT_JSON"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _parse_run(text: str) -> tuple[str, str]:
    """`v2` (video where the version makes video) or `v5:image` -> (version, mode)."""
    from benchmarks.vs_official import parse_run

    return parse_run(text)


def settings_from(arguments: argparse.Namespace) -> BenchSettings:
    """The settings the options ask for, the inputs checked first."""
    for path, option in ((arguments.reference, "--reference"), (arguments.drive, "--drive")):
        if not path.is_file() and not arguments.full_size_only:  # the full-size runs draw their inputs
            raise HellomemeError(f"{path}: not found (give it with {option})")
    if arguments.json:
        check_destination(arguments.json, True, [arguments.reference, arguments.drive])
    return BenchSettings(
        reference=arguments.reference, driving=arguments.drive,
        face_model=arguments.face_model or (Path() if arguments.full_size_only else default_model_path()),
        size=arguments.size, steps=arguments.steps, clip_frames=arguments.max_frames,
        memory_frames=tuple(arguments.frames or (100, 1000)), full_size=arguments.full_size or arguments.full_size_only,
        full_size_frames=tuple(arguments.full_size_frames or (24, 96)), full_size_steps=arguments.full_size_steps,
        full_size_dtype=arguments.full_size_dtype, full_size_only=arguments.full_size_only, full_size_weights=arguments.full_size_weights,
        dtype_sizes=tuple(arguments.dtype_sizes),
        full_size_runs=tuple(_parse_run(name) for name in arguments.versions) if arguments.versions else FULL_SIZE_RUNS,
        full_size_options=ModelOptions(
            device="cuda", compile=arguments.compile, channels_last=arguments.channels_last, low_memory=arguments.low_memory
        ),
    )


def main(argv: list[str] | None = None) -> int:
    """Every measurement, its table on stdout and, with --json, the file; a bad input is one line."""
    arguments = parse_arguments(argv)
    quiet_libraries()
    if arguments.worker:  # one measured run in this fresh process (`measure_in_subprocess`)
        run_json, result_json = arguments.worker
        Path(result_json).write_text(json.dumps(measure_clip(ClipRun(**json.loads(run_json)))))
        return 0
    return run_and_report(lambda: run_benchmarks(settings_from(arguments), progress=_print_progress), format_table, arguments.json)


def run_and_report(measure: Callable[[], dict], table: Callable[[dict], str], json_path: Path | None) -> int:
    """A benchmark's end: its table on stdout and, with --json, the file; a bad input or a failed run is one line."""
    try:
        result = measure()
    except HellomemeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(table(result))
    if json_path:
        write_json(result, json_path)
        print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
