"""`hellomeme eval`: a made clip scored against its driving clip and reference portrait, frame by
frame and as a summary (docs/eval.md says what each number means).

1. the clips probed; the run's settings (pose mode, motion, trans_ratio, window plan) read from the
   output's metadata, where hellomeme writes them
2. the reference portrait tracked: its pose and expression (targets of the motion controls), its
   identity embedding
3. the driving clip tracked (one decode): pose, expression, frame change
4. the output tracked (one decode): pose, expression, identity of each frame, frame change
5. the metrics, each output frame against the driving frame shown at its time; with
   `self_reenactment`, PSNR and SSIM against the driving frames cropped as the reference was
6. the audio: length and offset against the driving clip's
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from pathlib import Path

import numpy as np

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.face.signals import arkit_coefficients, head_pose, prepare_reference, rotation_to_angles, angles_to_rotation
from hellomeme_cli.face.tracking import MODEL_COMPONENT, MODEL_FILE, FaceTrack, track_image, track_video
from hellomeme_cli.media.files import require_file
from hellomeme_cli.media.formats import parse_loop
from hellomeme_cli.media.video import VideoInfo, ffmpeg_exe, probe_video, read_frames, read_image
from hellomeme_cli.pipeline import RUN_TAG
from hellomeme_cli.progress import ProgressCallback, no_progress
from hellomeme_cli.quality.identity import COMPONENT as IDENTITY_COMPONENT, MODEL_FILE as IDENTITY_FILE, IdentityModel, cosine
from hellomeme_cli.quality.metrics import REGIONS, expression_errors, frame_change, movement_error, rotation_error, seam_frames, seam_score
from hellomeme_cli.weights.cache import WeightCache

AUDIO_RATE = 16_000  # the audio is compared at this rate, mono
ENVELOPE_HOP = 16  # ... as its loudness every millisecond
MAX_AUDIO_OFFSET_MS = 500  # the largest offset looked for
MAX_PSNR = 100.0  # dB; identical frames (infinite PSNR) say so, as a number JSON can hold
NOT_MEASURED = {
    "fid": "FID needs an Inception network through torch-fidelity or torchmetrics, both of which need torchvision",
    "fvd": "FVD needs an I3D network, whose maintained implementations need torchvision",
}


@dataclasses.dataclass
class Evaluation:
    """`summary`: one number per metric (None where it cannot be measured); `frames`: per output
    frame, each metric's value (None where the frame has no face, or no previous frame);
    `notes`: what was not measured, and why."""

    summary: dict[str, float | int | bool | None]
    frames: dict[str, list]
    notes: dict[str, str]
    seams: list[int]

    def to_json(self) -> str:
        return json.dumps({"summary": self.summary, "frames": self.frames, "seams": self.seams, "not_measured": self.notes}, indent=1)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What of the run that made the output the metrics need (defaults: animate's)."""

    pose: str = "absolute"
    motion: str = "all"
    expression_scale: float = 1.0
    trans_ratio: float = 0.0
    windows: tuple[tuple[int, int], ...] | None = None
    loop: str = "off"  # a pingpong output's second half follows the driving clip backwards

    @classmethod
    def of(cls, info: VideoInfo) -> RunSettings:
        """From the output's metadata. A clip hellomeme did not make is scored as a reenactment that
        follows the driving clip in everything, its movement across the frame too."""
        try:
            values = json.loads(info.tags[RUN_TAG])
        except (KeyError, ValueError):
            return cls(trans_ratio=1.0)
        known = {field.name for field in dataclasses.fields(cls)}
        values = {name: value for name, value in values.items() if name in known}
        if values.get("windows") is not None:
            values["windows"] = tuple(tuple(window) for window in values["windows"])
        return cls(**values)


def evaluate(
    output: Path,
    driving: Path,
    reference: Path,
    *,
    self_reenactment: bool = False,
    windows: tuple[tuple[int, int], ...] | None = None,
    cache: WeightCache | None = None,
    progress: ProgressCallback = no_progress,
) -> Evaluation:
    """The numbers of `output` (a clip hellomeme made, or any clip of a face) against the `driving`
    clip and the `reference` portrait. `windows` (the sampler's, [start, stop) in output frames)
    stand in for the plan the output's metadata holds; `self_reenactment`: the reference is the
    driving clip's first frame (the paper's protocol), so PSNR and SSIM against the driving frames too."""
    output, driving, reference = Path(output), Path(driving), Path(reference)
    for path in (output, driving, reference):
        require_file(path)
    cache = cache or WeightCache()
    folders = cache.require([MODEL_COMPONENT, IDENTITY_COMPONENT])
    face_model, identity = folders[MODEL_COMPONENT] / MODEL_FILE, IdentityModel(folders[IDENTITY_COMPONENT] / IDENTITY_FILE)

    # 1. The clips, the output's timing against the driving clip's, the run's settings.
    out_info, drive_info = probe_video(output), probe_video(driving)
    run = RunSettings.of(out_info)
    made = _made_frames(out_info.frame_count, run.loop)
    if made / out_info.fps > drive_info.duration + 1 / drive_info.fps:
        raise HellomemeError(f"{driving}: {drive_info.duration:.2f} s, shorter than the output {output} ({made / out_info.fps:.2f} s): not its driving clip")
    plan = windows if windows is not None else run.windows
    shown = driving_frame_at(out_info, drive_info, run.loop)

    # 2. The reference: its own pose and expression, its identity.
    picture = read_image(reference)
    own = track_image(picture, name=str(reference), model_path=face_model)
    own_angles, own_coefficients = head_pose(own)[0], arkit_coefficients(own.blendshapes)
    reference_identity = identity.embedding(picture, own.landmarks[0])

    # 3 and 4. Both clips tracked, each decoded once; the output's identity and both clips' change on the way.
    drive_track, drive_changes = _track(drive_info, face_model, progress, "tracking the driving clip", frames=max(shown) + 1)
    embeddings: list[np.ndarray] = []
    out_track, out_changes = _track(out_info, face_model, progress, "tracking the output", embed=(identity, embeddings))
    if drive_track is None:
        raise HellomemeError(f"{driving}: no face found in any of its frames")

    # 5. Each output frame against the driving frame on screen at its time (an output without a face
    # anywhere, as from tiny test weights, has none of the face metrics).
    count = out_info.frame_count if out_track is None else len(out_track)
    target_angles, target_coefficients = _targets(run, head_pose(drive_track)[0][shown], arkit_coefficients(drive_track.blendshapes)[shown], own_angles, own_coefficients)
    if out_track is None:
        faceless, nothing = np.ones(count, bool), np.full(count, np.nan)
        pose, movement, identities = nothing, nothing, nothing
        expression = {region: nothing for region in ("all", *REGIONS)}
    else:
        faceless = out_track.filled
        pose = rotation_error(head_pose(out_track)[0], target_angles)
        movement = movement_error(out_track.landmarks, drive_track.landmarks[shown], run.trans_ratio if run.motion != "expression" else 0.0)
        expression = expression_errors(arkit_coefficients(out_track.blendshapes), target_coefficients)
        identities = np.array([cosine(embedding, reference_identity) for embedding in embeddings])
    changes, drive_changes = np.array(out_changes, dtype=float), np.array(drive_changes, dtype=float)[shown]
    drive_changes[0] = np.nan
    seams = seam_frames(list(plan), len(changes)) if plan else []

    frames = {
        "pose_error_deg": _masked(pose, faceless),
        "movement_error": _masked(movement, faceless),
        "expression_error": _masked(expression["all"], faceless),
        **{f"expression_error_{region}": _masked(values, faceless) for region, values in expression.items() if region != "all"},
        "identity": _masked(identities, faceless),
        "frame_change": _masked(changes, np.zeros(len(changes), bool)),
        "driving_change": _masked(drive_changes, np.zeros(len(changes), bool)),
        "faceless": [bool(value) for value in faceless],
    }
    summary = {
        "frames": int(out_info.frame_count),
        "fps": float(out_info.fps),
        "duration_s": round(out_info.duration, 3),
        "driving_duration_s": round(drive_info.duration, 3),
        "faceless_frames": int(faceless.sum()),
        "pose_error_deg": _mean(frames["pose_error_deg"]),
        "movement_error": _mean(frames["movement_error"]),
        "expression_error": _mean(frames["expression_error"]),
        **{f"expression_error_{region}": _mean(frames[f"expression_error_{region}"]) for region in expression if region != "all"},
        "identity": _mean(frames["identity"]),
        "identity_min": _min(frames["identity"]),
        "flicker": _ratio(np.nanmean(changes[1:]) if len(changes) > 1 else math.nan, np.nanmean(drive_changes[1:]) if len(changes) > 1 else math.nan),
        "seam_score": seam_score(changes, seams),
    }
    notes = dict(NOT_MEASURED)
    if self_reenactment:
        quality = _against_driving(output, out_info, driving, drive_info, shown, picture, own, progress)
        frames.update(quality)
        summary.update(psnr=_mean(quality["psnr"]), ssim=_mean(quality["ssim"]))
    else:
        notes.update(psnr="self-reenactment only (--self): the reference is the driving clip's first frame", ssim="as psnr")

    # 6. The audio.
    summary.update(_audio(output, out_info, driving, drive_info))
    return Evaluation(summary, frames, notes, seams)


def driving_frame_at(output: VideoInfo, driving: VideoInfo, loop: str = "off") -> np.ndarray:
    """For each output frame, the driving frame on screen at its time (the output is written at a
    constant rate); a pingpong loop's way back follows its way out backwards."""
    made = _made_frames(output.frame_count, loop)
    times = np.arange(made) / float(output.rate)
    stamps = driving.timestamps if driving.timestamps is not None else np.arange(driving.frame_count) / float(driving.rate)
    shown = np.clip(np.searchsorted(stamps, times + 1e-6, side="right") - 1, 0, len(stamps) - 1)
    return np.concatenate([shown, shown[-2:0:-1]])[: output.frame_count] if made < output.frame_count else shown


def _made_frames(count: int, loop: str) -> int:
    """The frames made before a pingpong loop doubled them (turning frames once)."""
    return (count + 2) // 2 if parse_loop(loop).kind == "pingpong" and count > 2 else count


def _track(info: VideoInfo, face_model: Path, progress: ProgressCallback, task: str, *, frames: int | None = None, embed=None):
    """The clip's face track (None when no frame has a face) and the change into each frame;
    with `embed` (model, list), each frame's identity embedding appended to the list."""
    changes: list[float | None] = []
    previous: list[np.ndarray] = []

    def each_frame(frame: np.ndarray, landmarks: np.ndarray | None) -> None:
        changes.append(frame_change(previous[0] if previous else None, frame))
        previous[:] = [frame]
        if embed is not None:
            model, embeddings = embed
            embeddings.append(model.embedding(frame, landmarks) if landmarks is not None else np.zeros(128))

    def report(event) -> None:
        progress(dataclasses.replace(event, task=task))

    try:
        track = track_video(info, model_path=face_model, smoothing=None, max_frames=frames, progress=report, each_frame=each_frame)
    except HellomemeError as error:
        if "no face found" in str(error):
            return None, changes
        raise
    return track, changes


def _targets(run: RunSettings, angles: np.ndarray, coefficients: np.ndarray, own_angles: np.ndarray, own_coefficients: np.ndarray):
    """The head pose and expression each output frame was asked for, as the motion controls make them
    (face/steering.py) from the driving clip's and the reference's own."""
    if run.motion == "expression":
        angles = np.repeat(own_angles[:1], len(angles), axis=0)
    elif run.pose == "relative":
        rotations = angles_to_rotation(angles)
        angles = rotation_to_angles(rotations @ rotations[0].T @ angles_to_rotation(own_angles[:1])[0])
    if run.motion == "pose":
        coefficients = np.repeat(own_coefficients[:1], len(coefficients), axis=0)
    elif run.expression_scale != 1.0:
        coefficients = np.clip(coefficients[:1] + run.expression_scale * (coefficients - coefficients[:1]), 0.0, 1.0)
    return angles, coefficients


def _against_driving(output: Path, out_info: VideoInfo, driving: Path, drive_info: VideoInfo, shown: np.ndarray, picture, own: FaceTrack, progress) -> dict:
    """PSNR and SSIM of each output frame against its driving frame, cropped as the reference (the
    driving clip's first frame) was; both clips streamed side by side."""
    try:
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    except ImportError:
        raise HellomemeError('eval --self measures PSNR and SSIM with scikit-image: pip install "hellomeme-cli[eval]"') from None
    crop = None if (out_info.width, out_info.height) == (drive_info.width, drive_info.height) else prepare_reference(picture, own, out_info.width).crop
    psnr, ssim = [], []
    drive_frames = enumerate(read_frames(drive_info, int(shown.max()) + 1))
    index, current = next(drive_frames)
    back = bool(np.any(np.diff(shown) < 0))  # a pingpong loop's way back meets the frames again: kept
    seen = {index: current}
    for number, frame in enumerate(read_frames(out_info)):
        while index < shown[number]:
            index, current = next(drive_frames)
            if back:
                seen[index] = current
        target = seen[int(shown[number])] if back else current
        target = crop.apply(target) if crop is not None else target
        psnr.append(min(float(peak_signal_noise_ratio(target, frame, data_range=255)), MAX_PSNR))
        ssim.append(float(structural_similarity(target, frame, channel_axis=2, data_range=255)))
    return {"psnr": psnr, "ssim": ssim}


def _audio(output: Path, out_info: VideoInfo, driving: Path, drive_info: VideoInfo) -> dict:
    """Whether the output has sound, how long against its picture, and how far it is from the
    driving clip's (the lag of best agreement of their loudness, milliseconds; + is late)."""
    if not out_info.has_audio:
        return {"audio": False, "audio_duration_s": None, "audio_offset_ms": None}
    made = _loudness(output, out_info.duration)
    result = {"audio": True, "audio_duration_s": round(len(made) / 1000, 3), "audio_offset_ms": None}
    if drive_info.has_audio:
        result["audio_offset_ms"] = _offset_ms(made, _loudness(driving, out_info.duration))
    return result


def _loudness(path: Path, seconds: float) -> np.ndarray:
    """The first `seconds` of the file's sound as its mean absolute level per millisecond."""
    command = [ffmpeg_exe(), "-v", "error", "-i", str(path), "-t", f"{seconds:.3f}", "-map", "0:a:0", "-ac", "1", "-ar", str(AUDIO_RATE)]
    command += ["-af", "aresample=async=1:first_pts=0", "-f", "f32le", "-"]
    samples = np.frombuffer(subprocess.run(command, capture_output=True, check=False).stdout, np.float32)
    usable = len(samples) // ENVELOPE_HOP * ENVELOPE_HOP
    return np.abs(samples[:usable]).reshape(-1, ENVELOPE_HOP).mean(axis=1)


def _offset_ms(made: np.ndarray, source: np.ndarray) -> float | None:
    """The lag (ms) at which `made` best agrees with `source`; None where either is silent."""
    length = min(len(made), len(source))
    a, b = made[:length] - made[:length].mean(), source[:length] - source[:length].mean()
    if length < 2 * MAX_AUDIO_OFFSET_MS or a.std() < 1e-6 or b.std() < 1e-6:
        return None
    lags = range(-MAX_AUDIO_OFFSET_MS, MAX_AUDIO_OFFSET_MS + 1)
    scores = [np.mean(a[max(lag, 0): length + min(lag, 0)] * b[max(-lag, 0): length - max(lag, 0)]) for lag in lags]
    return float(lags[int(np.argmax(scores))])


def _masked(values: np.ndarray, faceless: np.ndarray) -> list[float | None]:
    return [None if missing or value is None or not np.isfinite(value) else round(float(value), 6) for value, missing in zip(values, faceless)]


def _mean(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return round(float(np.mean(known)), 6) if known else None


def _min(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return round(float(np.min(known)), 6) if known else None


def _ratio(numerator: float, denominator: float) -> float | None:
    if not (np.isfinite(numerator) and np.isfinite(denominator)) or denominator <= 0:
        return None
    return round(float(numerator / denominator), 6)
