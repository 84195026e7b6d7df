"""Benchmarks: where the time and memory of `animate` go, measured on the real pipeline.

    python -m benchmarks.bench --json out.json [--full-size]     # from the project root (make bench)

- CPU, tiny random weights (`tiny.make_tiny`) and the real face model, a real clip: seconds per
  output frame of each stage, timed from the pipeline's own progress events (`StageClock`), and
  the peak RSS. Each run is a fresh Python process, so every peak is that run's own.
- The same at growing clip lengths (a real clip looped by ffmpeg): memory must not grow with them.
- GPU (CUDA only), SD1.5-shaped random networks at 512x512: seconds per frame per stage, peak GPU
  memory, and the UNets' matrix-unit utilisation (counted FLOPs / time / the GPU's peak).
- Face tracking frames per second.

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
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, EulerDiscreteScheduler, MotionAdapter, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

from hellomeme_cli import __version__
from hellomeme_cli.versions import get_version
from hellomeme_cli.engine import HelloMemePipeline, apply_speed_options, load_pipeline
from hellomeme_cli.model_options import resolve_device, resolve_dtype
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.models import HMControlNet, HMDenoisingNet, HMReferenceAdapter, HMReferenceNet, motion_unet
from hellomeme_cli.pipeline import AnimateSettings, animate, load_reference
from hellomeme_cli.settings import ModelOptions
from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress
from hellomeme_cli.weights.tiny import make_tiny, write_tokenizer
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


def measure_in_subprocess(run: ClipRun) -> dict:
    """`measure_clip` in a fresh interpreter, so its peak RSS is this run's alone."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, "-m", "benchmarks.bench", "--worker", json.dumps(dataclasses.asdict(run)), str(result)]
        # The checkout first on the path, so the worker measures the same code as this process.
        path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
        if done.returncode != 0:
            raise HellomemeError(f"benchmark run failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
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


V1 = get_version("v1")  # the version these benchmarks measure (full_size_models builds its networks)


def full_size_models(face_model: Path, device: torch.device, dtype: torch.dtype, options=None):
    """A HelloMemePipeline with the real architectures at their released sizes and random weights:
    SD1.5 UNet, text encoder and VAE, the default HelloMeme adapter and control net, an
    AnimateDiff v1.5 (v2 module, with a motion mid block, as
    the tiny cache's) shaped motion adapter, the ViT-H image encoder. Built on the device."""
    with tempfile.TemporaryDirectory() as folder:
        vocab_size = write_tokenizer(Path(folder))
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        ))
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
        )
        motion_adapter = MotionAdapter(
            block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2, motion_num_attention_heads=8,
            motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True,
        )
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32, image_size=224,
            patch_size=14, projection_dim=1024, hidden_act="gelu",
        ))
        adapter, control_net = HMReferenceAdapter(), HMControlNet()
    networks = (unet, text_encoder, vae, motion_adapter, image_encoder, adapter, control_net)
    for network in networks:
        network.to(dtype=dtype).eval()
    models = HelloMemePipeline(
        tokenizer=tokenizer, reference_text_encoder=text_encoder, text_encoder=text_encoder,
        reference_net=HMReferenceNet(unet), denoiser_2d=HMDenoisingNet(unet, adapter),
        denoiser_motion=HMDenoisingNet(motion_unet(unet, motion_adapter).eval(), adapter), control_net=control_net,
        vae_encoder=vae, vae_decoder=vae, image_encoder=image_encoder, fan_encoder=None, face_model=face_model,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        version=V1, control_kind=V1.control("blendshapes"),
    )
    apply_speed_options(models, options or ModelOptions())
    return models


class _NetworkTimer:
    """Accumulated seconds (device-synchronised) and calls of a module's forward."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.seconds, self.calls, self._device = 0.0, 0, device
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _sync(self) -> float:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def _start(self, module, args) -> None:
        self._started = self._sync()

    def _stop(self, module, args, output) -> None:
        self.seconds += self._sync() - self._started
        self.calls += 1


# Per-frame shapes of the control inputs (the blendshapes kind's ARKit coefficients and face parts, PD-FGC's embedding).
_INPUT_SHAPES = {"drive_coeff": (51,), "face_parts": (3, 1024), "pd_fpg": (548,)}


def unet_call_flops(models, size: int, window: int, guided: bool) -> dict[str, int]:
    """FLOPs of one stage-1 denoiser call (one frame) and one stage-2 call (one window), with the
    reference features and control in place, as the sampler makes them."""
    batch = 2 if guided else 1
    latent = size // 8
    device, dtype = models.device, models.dtype
    text = torch.zeros(batch, 77, models.denoiser_2d.unet.config.cross_attention_dim, device=device, dtype=dtype)
    with torch.no_grad():
        reference = models.reference_net(torch.zeros(batch, 4, latent, latent, device=device), text)

        def control(frames: int):
            condition = torch.zeros(batch, 3, frames, size, size, device=device)
            inputs = [torch.zeros(batch, frames, *_INPUT_SHAPES[name], device=device) for name in models.control_kind.inputs]
            return models.control_net(condition, *inputs)

        def flops(denoiser, frames: int) -> int:
            latents = torch.zeros(batch, 4, frames, latent, latent, device=device)
            return count_flops(denoiser, latents, torch.tensor(500.0, device=device), text, reference, control(frames))

        return {"stage1_call": flops(models.denoiser_2d, 1), "stage2_call": flops(models.denoiser_motion, window)}


def peak_tflops(gpu_name: str) -> float | None:
    """The GPU's dense bf16 peak from `PEAK_BF16_TFLOPS`, longest matching name first."""
    for name in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if name.lower() in gpu_name.lower():
            return PEAK_BF16_TFLOPS[name]
    return None


def measure_full_size(
    reference: Path,
    driving: Path,
    output_folder: Path,
    face_model: Path,
    frame_counts: tuple[int, ...] = (24, 96),
    *,
    device: str = "cuda",
    dtype: str = "auto",
    steps: int = 25,
    guidance: float = 2.0,
    size: int = 512,
    options=None,
) -> dict:
    """SD1.5-sized random networks, default steps and guidance: stage seconds per frame, peak
    GPU memory and UNet utilisation for each clip length (the clip is looped when too short)."""
    compute = resolve_device(device)
    models = full_size_models(face_model, compute, resolve_dtype(dtype, compute), options)
    timers = {"stage1": _NetworkTimer(models.denoiser_2d, compute), "stage2": _NetworkTimer(models.denoiser_motion, compute)}
    settings = AnimateSettings()
    flops = unet_call_flops(models, size, settings.window, guidance > 1)
    gpu = torch.cuda.get_device_name(compute) if compute.type == "cuda" else None
    peak = peak_tflops(gpu) if gpu else None
    runs = []
    for frames in frame_counts:
        for timer in timers.values():
            timer.seconds, timer.calls = 0.0, 0
        clip = loop_clip(driving, frames, output_folder / f"drive_{frames}.mp4")
        run = ClipRun("", str(reference), str(clip), str(output_folder / f"full_{frames}.mp4"), size, steps, guidance, frames, device, dtype)
        measured = measure_clip(run, models)
        unet_seconds = sum(timer.seconds for timer in timers.values())
        unet_flops = flops["stage1_call"] * timers["stage1"].calls + flops["stage2_call"] * timers["stage2"].calls
        achieved = unet_flops / unet_seconds / 1e12 if unet_seconds else None
        measured["unet"] = {
            "calls": {stage: timer.calls for stage, timer in timers.items()},
            "seconds": {stage: timer.seconds for stage, timer in timers.items()},
            "achieved_tflops": achieved,
            "utilisation": achieved / peak if achieved and peak else None,
        }
        runs.append(measured)
    return {"device": gpu or str(compute), "dtype": str(models.dtype), "flops_per_call": flops, "peak_bf16_tflops": peak, "runs": runs}


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
    full_size_frames: tuple[int, ...] = (24, 96)
    full_size_options: ModelOptions | None = None  # speed flags (compile, channels_last, ...) for the GPU run


def run_benchmarks(settings: BenchSettings, progress: ProgressCallback = no_progress) -> dict:
    """Every measurement in `settings`, as one JSON-ready dict (machine and versions included)."""
    steps = ["tracking", "clip", *(f"memory {n}" for n in settings.memory_frames), *(["full size"] if settings.full_size else [])]

    def done(step: str) -> None:
        progress(ProgressEvent("benchmarks", steps.index(step) + 1, len(steps), unit="runs"))

    result: dict = {"machine": machine(), "settings": _jsonable(dataclasses.asdict(settings))}
    result["tracking"] = tracking_speed([settings.driving], settings.face_model)
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
        if not settings.full_size:
            result["gpu_full_size"] = {"skipped": "not asked for (--full-size)"}
        elif not torch.cuda.is_available():
            result["gpu_full_size"] = {"skipped": "no CUDA GPU on this machine"}
        else:
            result["gpu_full_size"] = measure_full_size(
                settings.reference, settings.driving, folder, settings.face_model, settings.full_size_frames,
                options=settings.full_size_options,
            )
        if settings.full_size:
            done("full size")
    return result


def write_json(result: dict, path: Path) -> None:
    write_atomically(path, json.dumps(result, indent=1) + "\n")


def format_table(result: dict) -> str:
    """The headline numbers as a few aligned lines of text."""
    lines = [f"{result['machine']['cpu']} ({result['machine']['cpu_cores']} cores), torch {result['machine']['torch']}"]
    lines.append(f"face tracking: {result['tracking']['overall_fps']:.1f} frames/s")
    clip = result["cpu_tiny"]
    lines.append(f"CPU, tiny weights, {clip['settings']['size']} px, {clip['settings']['steps']} steps, {clip['frames']} frames: s/frame")
    lines.append("  " + "  ".join(f"{stage} {clip['seconds_per_frame'][stage]:.3f}" for stage in STAGES))
    lines.append(f"  peak RSS {clip['peak_rss_mb']:.0f} MB (after loading {clip['rss_after_loading_mb']:.0f} MB)")
    for run in result["memory"]:
        lines.append(f"memory, {run['frames']} frames: peak RSS {run['peak_rss_mb']:.0f} MB (after loading {run['rss_after_loading_mb']:.0f} MB)")
    gpu = result["gpu_full_size"]
    if "skipped" in gpu:
        lines.append(f"GPU full size: skipped ({gpu['skipped']})")
    for run in gpu.get("runs", []):
        per_frame = "  ".join(f"{stage} {run['seconds_per_frame'][stage]:.3f}" for stage in STAGES)
        utilisation = run["unet"]["utilisation"]
        lines.append(
            f"GPU full size ({gpu['device']}, {gpu['dtype']}), {run['frames']} frames: s/frame {per_frame}; "
            f"peak {run['peak_gpu_memory_mb']:.0f} MB; UNet {run['unet']['achieved_tflops']:.1f} TFLOP/s"
            + (f" = {utilisation:.1%} of peak" if utilisation else "")
        )
    return "\n".join(lines)


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
    parser.add_argument("--full-size", action="store_true", help="add the full-size run: SD1.5-sized random networks at 512x512 (CUDA GPU only)")
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
    parser.add_argument("--low-memory", action="store_true", help="full-size run: sequential CPU offload")
    parser.add_argument("--worker", nargs=2, metavar=("RUN_JSON", "RESULT_JSON"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(arguments: argparse.Namespace) -> BenchSettings:
    """The settings the options ask for, the inputs checked first."""
    for path, option in ((arguments.reference, "--reference"), (arguments.drive, "--drive")):
        if not path.is_file():
            raise HellomemeError(f"{path}: not found (give it with {option})")
    if arguments.json:
        check_destination(arguments.json, True, [arguments.reference, arguments.drive])
    return BenchSettings(
        reference=arguments.reference, driving=arguments.drive, face_model=arguments.face_model or default_model_path(),
        size=arguments.size, steps=arguments.steps, clip_frames=arguments.max_frames,
        memory_frames=tuple(arguments.frames or (100, 1000)), full_size=arguments.full_size,
        full_size_frames=tuple(arguments.full_size_frames or (24, 96)),
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
    try:
        result = run_benchmarks(settings_from(arguments), progress=_print_progress)
    except HellomemeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_table(result))
    if arguments.json:
        write_json(result, arguments.json)
        print(f"wrote {arguments.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
