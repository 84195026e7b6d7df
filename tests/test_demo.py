"""`hellomeme demo` (what `make demo` runs): the weights and the example portrait and clip come
through the real download code from local servers, the run writes the mp4 and says where; with
the network unreachable it is one line naming the hosts and `hellomeme weights import`."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from typer.testing import CliRunner

from conftest import MEDIA, SHARED, require
from hellomeme_cli.weights import cache as weights
from hellomeme_cli.cli import app
from hellomeme_cli.media.video import probe_video
from hellomeme_cli.weights.cache import read_lock, write_lock
from test_weights import _sha256, serve_hub

EXAMPLES = {"demo_portrait": "chillout.jpg", "demo_clip": "jue.mp4", "face_landmarker": None}


def test_demo_fetches_and_animates_the_examples(tiny_cache, tmp_path, monkeypatch):
    served, lock = {}, {}
    for name, component in read_lock().items():
        files = []
        for locked in component.files:
            source = tiny_cache / name / locked.path
            if name in EXAMPLES:
                source = require(MEDIA / EXAMPLES[name], "demo example") if EXAMPLES[name] else require(SHARED / "models" / "face_landmarker.task", "face model")
            if not source.is_file():
                continue  # a component make-tiny does not write is not needed here
            content = source.read_bytes()
            key = f"{component.repo}/{component.remote_path(locked)}" if component.repo else f"files/{name}/{locked.path}"
            served[key] = content
            files.append(dataclasses.replace(locked, sha256=_sha256(content), size=len(content)))
        if files:
            url = {} if component.repo else {"url": f"{{endpoint}}/files/{name}/{component.files[0].path}"}
            lock[name] = dataclasses.replace(component, files=tuple(files), **url)
    hub = serve_hub(served, tmp_path, monkeypatch)
    lock = {name: dataclasses.replace(c, url=c.url.format(endpoint=hub.endpoint)) if c.url else c for name, c in lock.items()}
    write_lock(lock, tmp_path / "weights.lock")
    monkeypatch.setattr(weights, "LOCK_PATH", tmp_path / "weights.lock")
    monkeypatch.chdir(tmp_path)
    try:
        result = CliRunner().invoke(app, ["demo", "--size", "128", "--steps", "2", "--max-frames", "3"])
    finally:
        hub.stop()
    assert result.exit_code == 0, result.output
    assert "wrote hellomeme-demo.mp4: H.264 mp4, 3 frames at 15 fps" in result.output
    info = probe_video(tmp_path / "hellomeme-demo.mp4")
    assert info.frame_count == 3 and info.has_audio
    fetched = {"/".join(path.lstrip("/").split("/")[:2]) for path in hub.gets()}
    assert {"files/demo_portrait", "files/demo_clip"} <= fetched


def test_demo_without_network_is_one_line_naming_the_hosts_and_import(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2", "HELLOMEME_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "hellomeme_cli", "demo"], capture_output=True, text=True, env={**os.environ, **env}, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "127.0.0.1" in lines[0] and "raw.githubusercontent.com" in lines[0] and "hellomeme weights import" in lines[0]
    assert not (tmp_path / "hellomeme-demo.mp4").exists()
    left = [path for path in (tmp_path / "home").rglob("*")] if (tmp_path / "home").exists() else []
    assert left == [], "a failed fetch leaves nothing in the cache"
