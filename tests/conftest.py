"""Shared fixtures: where `../shared` (test media, models, conformance data) lives."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hellomeme_cli.face import tracking
from hellomeme_cli.media.video import ffmpeg_exe

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))  # for `benchmarks` (beside the package, not installed), whatever starts pytest
SHARED = Path(os.environ.get("HELLOMEME_SHARED_DIR", PROJECT_ROOT.parent / "shared"))
CONFORMANCE_DIR = Path(os.environ.get("HELLOMEME_CONFORMANCE_DIR", SHARED / "conformance"))

# Two cores in CI: more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))
# The Ray runtimes the tests start take this token, so Ray does not write one into the user's ~/.ray
# (where a `ray start` of theirs would find it).
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))


def require(path: Path, what: str) -> Path:
    """Skip (with the reason) when test data from ../shared is absent, as in a user's fresh clone."""
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (it ships in ../shared beside the project root)")
    return path


MEDIA = SHARED / "media"


@pytest.fixture(scope="session")
def model() -> Path:
    """The real MediaPipe face model."""
    return require(SHARED / "models" / "face_landmarker.task", "MediaPipe face landmarker model")


class _Tracks:
    """Each clip tracked once per test run; the smoothed track is derived from the raw one."""

    def __init__(self, model: Path):
        self.model = model
        self.raw: dict[str, tracking.FaceTrack] = {}
        self.smoothed: dict[str, tracking.FaceTrack] = {}

    def __call__(self, name: str, smoothed: bool = True) -> tracking.FaceTrack:
        if name not in self.raw:
            clip = require(MEDIA / name, "test clip")
            self.raw[name] = tracking.track_video(clip, smoothing=None, model_path=self.model)
            self.smoothed[name] = tracking.smooth_track(self.raw[name])
        return (self.smoothed if smoothed else self.raw)[name]


@pytest.fixture(scope="session")
def tracks(model: Path) -> _Tracks:
    return _Tracks(model)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, model: Path) -> Path:
    """A weight cache holding tiny random networks and the real face model, as
    `hellomeme weights make-tiny` + `weights import face_landmarker.task` make it."""
    from hellomeme_cli.weights.tiny import make_tiny

    home = tmp_path_factory.mktemp("tiny_cache")
    make_tiny(home).import_path(model)
    return home


def audio_duration(path: Path) -> float:
    """Seconds of decoded audio (what a player plays), not what the container claims."""
    command = [ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "null", "-", "-progress", "pipe:1", "-nostats"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return int(re.findall(r"^out_time_us=(\d+)$", out, re.MULTILINE)[-1]) / 1e6


@pytest.fixture
def workdir(tiny_cache, monkeypatch, tmp_path) -> Path:
    """A fresh current folder, with HELLOMEME_HOME pointing at the tiny cache."""
    monkeypatch.setenv("HELLOMEME_HOME", str(tiny_cache))
    monkeypatch.chdir(tmp_path)
    return tmp_path
