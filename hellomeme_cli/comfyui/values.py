"""What hellomeme's nodes pass between them (a pipeline's handle, the driving motion, LoRAs), and
ComfyUI's IMAGE and AUDIO as the library's pixels and sound files."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.face.driving import MotionTemplate
from hellomeme_cli.media.video import read_audio, write_audio, write_video

PIPELINE = "HELLOMEME_PIPELINE"
MOTION = "HELLOMEME_MOTION"
LORAS = "HELLOMEME_LORAS"


@dataclasses.dataclass(frozen=True)
class PipelineHandle:
    """A HELLOMEME_PIPELINE: which pipeline (its mode and model settings by name). The networks
    stay in the nodes' ModelCache, not in ComfyUI's output cache, so freeing ComfyUI's memory lets
    them go while this stays valid: the next run loads them again."""

    mode: str
    values: dict[str, Any]


@dataclasses.dataclass
class Motion:
    """A HELLOMEME_MOTION: a driving clip tracked (its motion template: the track, the patches
    around the face, the timing, the sound to mux) and, for Evaluate, the clip it came from: a file,
    or the frames it was tracked from (written to a file when first asked for)."""

    template: MotionTemplate
    clip: Path | None = None
    frames: torch.Tensor | None = None
    scratch: tempfile.TemporaryDirectory = dataclasses.field(default_factory=lambda: tempfile.TemporaryDirectory(prefix="hellomeme-motion-"))

    @property
    def folder(self) -> Path:
        """Where this motion's files live (its sound, its clip), for as long as it does."""
        return Path(self.scratch.name)

    def clip_file(self) -> Path:
        """The driving clip as a file, with its sound."""
        if self.clip is None:
            if self.frames is None:
                raise HellomemeError("driving: a motion loaded from a template file has no driving clip to compare with (track a VIDEO or an IMAGE batch)")
            shown = pixels(self.frames)[: len(self.template)]
            self.clip = write_video(shown, self.folder / "driving.mp4", self.template.rate, audio_from=self.template.audio, total=len(shown))
        return self.clip


def pixels(images: torch.Tensor) -> list[np.ndarray]:
    """An IMAGE batch ([B, H, W, C] floats in 0..1) as RGB uint8 pictures (H, W, 3); alpha dropped."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise HellomemeError(f"an IMAGE batch must be [frames, height, width, channels] with a frame (got {list(images.shape)})")
    return list((images[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())


def image_batch(frames: Sequence[np.ndarray]) -> torch.Tensor:
    """RGB uint8 pictures as an IMAGE batch."""
    return torch.from_numpy(np.stack(frames)).float() / 255


def audio_of(path: Path) -> dict | None:
    """A file's sound as ComfyUI's AUDIO ({"waveform": [1, C, T], "sample_rate"}); None when silent."""
    decoded = read_audio(path)
    if decoded is None:
        return None
    samples, rate = decoded
    return {"waveform": torch.from_numpy(samples)[None], "sample_rate": rate}


def audio_file(audio: dict, path: Path) -> Path:
    """ComfyUI's AUDIO (its first clip) written as a WAV file to mux."""
    waveform = audio["waveform"]
    if waveform.ndim != 3 or waveform.shape[-1] == 0:
        raise HellomemeError(f"audio: the waveform must be [batch, channels, samples] with samples (got {list(waveform.shape)})")
    return write_audio(waveform[0].float().cpu().numpy(), int(audio["sample_rate"]), path)
