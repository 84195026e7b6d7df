"""Bad input, every command: exit code 1 and one line on stderr naming the problem, no traceback.

Each row runs the real command line in a fresh process (as a user runs it), with the tiny weight
cache as HELLOMEME_HOME (or an empty one) and these bad inputs in the current folder: `flat.png`
(a picture without a face), `notes.mp4` (text named like a video), `taken.mp4` and `taken.npz`
(outputs that already exist)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import MEDIA, PROJECT_ROOT, require
from hellomeme_cli.media.video import write_image

FAST = "--size 128 --steps 2"


@dataclasses.dataclass(frozen=True)
class Case:
    command: str  # after `python -m`; {media} is the shared test media, {tmp} the current folder
    message: str  # in the one line, after "error: "; " … " separates fragments that come in this order
    weights: str = "tiny"  # HELLOMEME_HOME: "tiny" (the tiny cache) or "empty"
    not_written: str | None = None  # an output the command must not have started

    def arguments(self, tmp: Path) -> list[str]:
        return [word.format(media=MEDIA, tmp=tmp) for word in self.command.split()]


ANIMATE = f"hellomeme_cli animate {FAST}"
GOOD = "{media}/majicmix1.jpg {media}/qie.mp4"
CASES = {
    # animate: the inputs
    "animate missing reference": Case(f"{ANIMATE} {{media}}/missing.jpg {{media}}/qie.mp4", "missing.jpg"),
    "animate video as reference": Case(f"{ANIMATE} {{media}}/qie.mp4 {{media}}/qie.mp4", "not an image"),
    "animate image as clip": Case(f"{ANIMATE} {{media}}/majicmix1.jpg {{media}}/cg1.jpg", "is an image, not a video"),
    "animate faceless reference": Case(f"{ANIMATE} {{tmp}}/flat.png {{media}}/qie.mp4", "no face found"),
    "animate text as clip": Case(f"{ANIMATE} {{media}}/majicmix1.jpg {{tmp}}/notes.mp4", "notes.mp4"),
    # animate: the options
    "animate overlap": Case(f"{ANIMATE} {GOOD} --overlap 12", "--overlap must be in [0, window)"),
    "animate control": Case(f"{ANIMATE} {GOOD} --control audio", "--control must be one of blendshapes, pdfgc (got 'audio')"),
    "animate version": Case(f"{ANIMATE} {GOOD} --version v9", "--version must be one of"),
    "animate steps": Case(f"{ANIMATE} {GOOD} --steps 0", "--steps must be at least 1"),
    "animate device": Case(f"{ANIMATE} {GOOD} --device cuda:7", "not available"),
    "animate checkpoint": Case(f"{ANIMATE} {GOOD} --checkpoint {{tmp}}/notes.mp4", "notes.mp4"),
    # animate: the output and the weights
    "animate over its input": Case(f"{ANIMATE} {GOOD} -o {{media}}/qie.mp4 --force", "refusing to write over an input file"),
    "animate existing output": Case(f"{ANIMATE} {GOOD} -o {{tmp}}/taken.mp4", "already exists"),
    "animate missing weights": Case(
        f"hellomeme_cli animate {GOOD} -o {{tmp}}/x.mp4", "missing weights … run `hellomeme weights fetch", weights="empty", not_written="x.mp4"
    ),
    # batch
    "batch missing folder": Case("hellomeme_cli batch {tmp}/nowhere --ref x.jpg", "{tmp}/nowhere: no such folder"),
    "batch folder without reference": Case("hellomeme_cli batch {tmp}", "give a folder of clips and --ref REF, or --pairs FILE.csv"),
    "batch reference without folder": Case("hellomeme_cli batch --ref x.jpg", "give a folder of clips and --ref REF, or --pairs FILE.csv"),
    "batch folder and pairs": Case("hellomeme_cli batch {tmp} --pairs p.csv", "give a folder of clips or --pairs, not both"),
    # track
    "track image": Case("hellomeme_cli track {media}/cg1.jpg", "is an image, not a video"),
    "track missing clip": Case("hellomeme_cli track {tmp}/missing.mp4", "missing.mp4"),
    "track text as clip": Case("hellomeme_cli track {tmp}/notes.mp4", "notes.mp4"),
    "track over its input": Case("hellomeme_cli track {media}/qie.mp4 -o {media}/qie.mp4 --force", "refusing to write over an input file"),
    "track existing output": Case("hellomeme_cli track {media}/qie.mp4 -o {tmp}/taken.npz", "already exists"),
    # weights
    "weights import missing": Case("hellomeme_cli weights import {tmp}/nowhere.task", "{tmp}/nowhere.task: no such file or folder"),
    # the benchmark beside the package
    "bench missing clip": Case("benchmarks.bench --drive {tmp}/missing.mp4", "{tmp}/missing.mp4: not found (give it with --drive)"),
}


@pytest.fixture
def bad_inputs(workdir: Path) -> Path:
    require(MEDIA / "qie.mp4", "test clip")
    write_image(np.full((256, 256, 3), 128, np.uint8), workdir / "flat.png")
    (workdir / "notes.mp4").write_text("not a video")
    (workdir / "taken.mp4").write_bytes(b"")
    (workdir / "taken.npz").write_bytes(b"")
    return workdir


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_and_exit_code_1(bad_inputs, tiny_cache, case):
    tmp = bad_inputs
    home = tiny_cache if case.weights == "tiny" else tmp / "empty"
    environment = {**os.environ, "HELLOMEME_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, "-m", *case.arguments(tmp)], capture_output=True, text=True, cwd=tmp, env=environment)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    fragments = [re.escape(fragment) for fragment in case.message.format(tmp=tmp).split(" … ")]
    assert re.search(".*".join(fragments), lines[0]), result.stderr
    if case.not_written:
        assert not (tmp / case.not_written).exists()


@pytest.mark.parametrize("how", ["--debug", "HELLOMEME_DEBUG=1"])
def test_debug_adds_the_traceback_to_the_one_line(bad_inputs, tiny_cache, how):
    environment = {**os.environ, "HELLOMEME_HOME": str(tiny_cache), "PYTHONPATH": str(PROJECT_ROOT)}
    arguments = [sys.executable, "-m", "hellomeme_cli", "track", str(bad_inputs / "missing.mp4")]
    if how == "--debug":
        arguments.append("--debug")
    else:
        environment["HELLOMEME_DEBUG"] = "1"
    result = subprocess.run(arguments, capture_output=True, text=True, cwd=bad_inputs, env=environment)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "HellomemeError" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == f"error: {bad_inputs / 'missing.mp4'}: no such file"


def test_another_networks_weight_file_is_one_line_naming_the_component(bad_inputs, tiny_cache):
    """The reference adapter's file replaced by a control net's (a mistaken copy, no sha256 in the lock
    to catch it) fails at load with the component, the file and how many tensors did not match."""
    home = bad_inputs / "swapped"
    home.mkdir()
    for folder in tiny_cache.iterdir():
        if folder.name != "hm2_reference":
            (home / folder.name).symlink_to(folder)
    (home / "hm2_reference").mkdir()
    for file in (tiny_cache / "hm2_reference").iterdir():
        (home / "hm2_reference" / file.name).write_bytes(file.read_bytes())
    weights_file = home / "hm2_reference" / "diffusion_pytorch_model.safetensors"
    weights_file.write_bytes((tiny_cache / "hm2_control" / "diffusion_pytorch_model.safetensors").read_bytes())
    environment = {**os.environ, "HELLOMEME_HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT)}
    arguments = [*FAST.split(), "--max-frames", "2", str(MEDIA / "majicmix1.jpg"), str(MEDIA / "qie.mp4")]
    result = subprocess.run([sys.executable, "-m", "hellomeme_cli", "animate", *arguments], capture_output=True, text=True, cwd=bad_inputs, env=environment)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("seed ", "loading models"))]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    expected = rf"error: weights component hm2_reference: .*{re.escape(str(weights_file))} does not hold HMReferenceAdapter's tensors \(\d+ missing, \d+ unexpected\)"
    assert re.search(expected, lines[0]), lines[0]


def test_a_weight_file_with_extra_tensors_loads_as_the_official_from_pretrained_loads_it(tiny_cache, tmp_path, caplog):
    """Tensors the network does not have (a newer release's extras) are left and logged, as diffusers'
    `from_pretrained` in the official code leaves them; the network gets the same weights."""
    import logging
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from hellomeme_cli.models.reference import HMReferenceAdapter
    from hellomeme_cli.models.unet import load_folder

    folder = tmp_path / "hm2_reference"
    shutil.copytree(tiny_cache / "hm2_reference", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    extras = {f"extra_{number}.weight": torch.ones(2) for number in range(4)}
    save_file({**load_file(weights), **extras}, weights, metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="hellomeme_cli"):
        loaded = load_folder(HMReferenceAdapter, folder)
    plain = load_folder(HMReferenceAdapter, tiny_cache / "hm2_reference").state_dict()
    assert loaded.state_dict().keys() == plain.keys() and all(torch.equal(loaded.state_dict()[k], plain[k]) for k in plain)
    (record,) = [record for record in caplog.records if record.name.startswith("hellomeme_cli")]
    assert record.levelno == logging.INFO  # not on a user's terminal unless --debug
    assert f"{weights}: 4 tensor(s) HMReferenceAdapter does not have, left unused: extra_0.weight, extra_1.weight, extra_2.weight, ..." == record.getMessage()
