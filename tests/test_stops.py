"""Runs that cannot finish say so at once: an output folder that takes no file is found before any
model loads (not after the work), and Ctrl-C or SIGTERM ends a run with one line, its exit status
(130, 143) and no file left. Each runs the real command line in a fresh process, as a user does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MEDIA, PROJECT_ROOT, require

FAST = ["--size", "128", "--steps", "2"]
HEAVY = ("torch", "diffusers", "transformers", "mediapipe", "cv2")
# Each command line in one process, in turn: its exit code, its stderr, its seconds, and whether a heavy
# library had been imported by then (none of them should: the folder is checked before).
DRIVER = """
import contextlib, io, json, sys, time
from hellomeme_cli.cli import main
for arguments in json.loads(sys.argv[1]):
    sys.argv, errors, started = ["hellomeme", *arguments], io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(errors):
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    heavy = sorted(name for name in %r if name in sys.modules)
    print(json.dumps([arguments[0], code, errors.getvalue(), time.perf_counter() - started, heavy]))
""" % (HEAVY,)


def _unwritable(folder: Path) -> tuple[list[str], str]:
    """A command prefix under which `folder` takes no new file, and the cause the line must give: a
    read-only tmpfs mounted there in a mount namespace of the command's own (root, as in CI), else
    the folder's write permission taken away (any other user)."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return [], "permission denied"
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "--mount", "true"], capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("a read-only folder for root needs util-linux's unshare with mount namespaces (the CI installs it)")
    return [unshare, "--mount", "sh", "-c", f'mount -t tmpfs -o ro,size=1m none "{folder}" && exec "$@"', "sh"], "read-only file system"


def test_an_output_folder_that_takes_no_file_is_said_before_any_work(tiny_cache, tmp_path):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip")
    locked = tmp_path / "locked"
    prefix, cause = _unwritable(locked)
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "qie.mp4").symlink_to(clip)
    commands = [
        ["animate", str(reference), str(clip), *FAST, "-o", str(locked / "out.mp4")],
        ["image", str(reference), str(reference), *FAST, "-o", str(locked / "out.png")],
        ["batch", str(tmp_path / "clips"), "--ref", str(reference), *FAST, "-o", str(locked / "batch")],
        ["batch", str(tmp_path / "clips"), "--ref", str(reference), *FAST, "--report", str(locked / "report.json")],
        ["track", str(clip), "-o", str(locked / "clip.npz")],
        ["track", str(clip), "-o", str(tmp_path / "clip.npz"), "--preview", str(locked / "preview.mp4")],
        ["eval", str(clip), "--drive", str(clip), "--ref", str(reference), "--json", str(locked / "eval.json")],
        ["compare", str(reference), str(clip), "--versions", "v2", "-o", str(locked / "compare")],
    ]
    environment = {**os.environ, "HELLOMEME_HOME": str(tiny_cache), "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run([*prefix, sys.executable, "-c", DRIVER, json.dumps(commands)], capture_output=True, text=True, env=environment, cwd=tmp_path)
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(commands), done.stderr
    for command, code, errors, seconds, heavy in results:
        assert code == 1 and errors.strip().splitlines() == [f"error: {locked}: cannot write files there ({cause})"], (command, errors)
        assert heavy == [], (command, heavy)
        print(f"{command}: said in {seconds:.2f} s")
    assert not (tmp_path / "clip.npz").exists()


def _animate(tiny_cache: Path, output: Path) -> subprocess.Popen:
    """`animate` on 36 frames of a clip, in a session of its own (as a terminal's foreground job:
    Ctrl-C reaches its ffmpeg children too)."""
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "jue.mp4", "clip")
    environment = {**os.environ, "HELLOMEME_HOME": str(tiny_cache), "PYTHONPATH": str(PROJECT_ROOT)}
    command = [sys.executable, "-m", "hellomeme_cli", "animate", str(reference), str(clip), *FAST, "--max-frames", "36", "-o", str(output)]
    # Ctrl-C at its default in the child, however the tests were started (a shell's background job ignores it, and so would the child)
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_ctrl_c_while_loading_says_so_exits_130_and_writes_nothing(tiny_cache, tmp_path):
    output = tmp_path / "out.mp4"
    process = _animate(tiny_cache, output)
    assert process.stderr.readline().startswith("seed "), process.stderr.read()  # said before any model loads
    time.sleep(1)
    os.killpg(process.pid, signal.SIGINT)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 130, errors
    assert errors.strip().splitlines()[-1] == "interrupted (Ctrl-C): nothing was written" and "Traceback" not in errors
    assert list(tmp_path.iterdir()) == []


def test_sigterm_while_writing_says_so_exits_143_and_leaves_no_partial_file(tiny_cache, tmp_path):
    output = tmp_path / "out.mp4"
    process = _animate(tiny_cache, output)
    deadline = time.monotonic() + 600
    while not list(tmp_path.glob(".out.*.partial.mp4")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be stopped while writing"
    process.send_signal(signal.SIGTERM)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 143, errors
    assert errors.strip().splitlines()[-1] == "interrupted (SIGTERM): nothing was written" and "Traceback" not in errors
    assert list(tmp_path.iterdir()) == []
