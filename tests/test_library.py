"""The library API: the example of docs/library.md runs as written (tiny weights, a real clip and portrait)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hellomeme_cli as hm
from hellomeme_cli.media.video import probe_video

from conftest import MEDIA, require

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL)


def test_the_library_example_runs_as_written(tiny_cache, tmp_path):
    (tmp_path / "ref.jpg").symlink_to(require(MEDIA / "majicmix1.jpg", "test portrait"))
    (tmp_path / "drive.mp4").symlink_to(require(MEDIA / "qie.mp4", "test clip"))
    example = _python_blocks(PROJECT_ROOT / "docs" / "library.md")[0]
    environment = {**os.environ, "HELLOMEME_HOME": str(tiny_cache), "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote out.mp4: 2 frames"), done.stdout
    assert "seed 1" in done.stdout
    assert done.stderr == "", "the library printed to stderr"
    assert probe_video(tmp_path / "out.mp4").frame_count == 2


def test_model_settings_belong_to_the_pipeline_not_to_a_call(tiny_cache):
    with pytest.raises(hm.HellomemeError, match="unknown option"):
        hm.load_pipeline(version="v1", steps=3)
    fake_pipe = type("Pipe", (), {"options": None, "cache": None})()
    with pytest.raises(hm.HellomemeError, match="control: model settings are chosen by load_pipeline"):
        hm.animate(fake_pipe, "r.jpg", "d.mp4", "o.mp4", control="pdfgc")
