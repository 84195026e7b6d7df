"""`hellomeme batch` in this process: planning, failures recorded per clip, resuming, CSV pairs (on Ray: test_batch_ray.py).

Clips are made with tiny random networks on real clips at the smallest useful cost (128 px, one
step, no guidance, 3 frames); the control flow (errors, interrupts, model groups) runs with the
networks replaced by fakes."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from conftest import MEDIA, require
from hellomeme_cli.batch import jobs as batch
from hellomeme_cli.batch.jobs import DIGEST_TAG, DONE, FINISHED_AT_STOP, FOREIGN, NOT_RUN, BatchPlan, plan_folder, plan_pairs
from hellomeme_cli.batch import run as batch_run
from hellomeme_cli.batch.run import run_batch
from hellomeme_cli.cli import app
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.pipeline import SEED_TAG, AnimateResult, AnimateSettings
from hellomeme_cli.media.video import probe_video, read_frames, write_image, write_video
from hellomeme_cli.weights.cache import WeightCache

FAST = ["--size", "128", "--steps", "1", "--guidance", "1", "--window", "3", "--overlap", "0", "--max-frames", "3"]
runner = CliRunner()


def media(name: str) -> Path:
    return require(MEDIA / name, "test media")


def clips_folder(folder: Path, *names: str) -> Path:
    """A folder of links to the shared test clips (nothing copied)."""
    folder.mkdir()
    for name in names:
        (folder / name).symlink_to(media(name))
    return folder


def read_report(path: Path) -> dict[str, dict]:
    """The report's clips by driving file name, and the whole report under ''."""
    report = json.loads(path.read_text())
    return {"": report, **{Path(clip["driving"]).name: clip for clip in report["clips"]}}


def finished_outputs(folder: Path) -> list[str]:
    """Names of the videos under their final names (a temporary file is hidden)."""
    return sorted(path.name for path in folder.glob("*.mp4") if not path.name.startswith("."))


def terminate_after_first_output(command: list[str], out: Path) -> tuple[int, str]:
    """Run `command`, SIGTERM it once a video is finished under `out`; its exit code and stderr."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not finished_outputs(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, errors = process.communicate(timeout=120)
    return process.returncode, errors


def gray_clip(path: Path, frames: int = 3) -> Path:
    return write_video([np.full((128, 128, 3), 128, np.uint8)] * frames, path, 15)


# -- with tiny networks, end to end -----------------------------------------


def test_folder_records_each_failure_and_a_rerun_skips_the_finished_clip(workdir):
    folder = clips_folder(workdir / "clips", "qie.mp4")
    (folder / "broken.mp4").write_bytes(media("jue.mp4").read_bytes()[:100_000])
    write_image(np.full((128, 128, 3), 200, np.uint8), folder / "faceless.jpg")
    gray_clip(folder / "blank.mp4")
    reference = media("majicmix1.jpg")
    command = ["batch", str(folder), "--ref", str(reference), *FAST]

    first = runner.invoke(app, command)
    assert first.exit_code == 1, first.output
    assert "4 clips: 1 ok, 3 failed, 0 skipped" in first.output
    report_path = folder / "hellomeme" / "batch-report.json"
    clips = read_report(report_path)
    assert clips[""]["finished"] is True and clips[""]["counts"] == {"ok": 1, "failed": 3, "skipped": 0}
    assert "ffmpeg can read" in clips["broken.mp4"]["reason"]
    assert "not a video" in clips["faceless.jpg"]["reason"]
    assert "no face found" in clips["blank.mp4"]["reason"]
    log = (folder / "hellomeme" / "batch-report.log").read_text()  # each failure's traceback, beside the report
    assert f"== {folder / 'blank.mp4'}: {clips['blank.mp4']['reason']}\nTraceback (most recent call last)" in log
    assert "traceback" not in clips["blank.mp4"] and "qie.mp4" not in log
    good = clips["qie.mp4"]
    output = folder / "hellomeme" / "majicmix1_qie.mp4"
    assert good["status"] == "ok" and good["reason"] == "" and good["frames"] == 3 and good["device"] == "cpu"
    assert good["output"] == str(output.absolute()) and good["reference"] == str(reference) and good["seconds"] > 0
    assert set(good) == {"driving", "reference", "output", "status", "reason", "frames", "seconds", "seed", "device", "metrics"}
    assert good["metrics"] is None  # scored only with --eval (test_compare.py)
    info = probe_video(output)
    assert info.frame_count == 3 and info.tags[SEED_TAG] == str(good["seed"]) and len(info.tags[DIGEST_TAG]) == 16
    made = output.stat().st_mtime_ns

    second = runner.invoke(app, command)
    assert second.exit_code == 1, second.output
    again = read_report(report_path)
    assert again["qie.mp4"]["status"] == "skipped" and again["qie.mp4"]["reason"] == DONE
    assert again["qie.mp4"]["seed"] == good["seed"] and again["qie.mp4"]["frames"] == 3
    assert output.stat().st_mtime_ns == made
    assert [again[name]["status"] for name in ("broken.mp4", "faceless.jpg", "blank.mp4")] == ["failed"] * 3


def test_a_killed_run_leaves_no_partial_output_and_the_next_run_finishes_it(workdir):
    folder = clips_folder(workdir / "clips", "jue.mp4", "qie.mp4")
    out = workdir / "out"
    command = [sys.executable, "-m", "hellomeme_cli", "batch", str(folder), "--ref", str(media("chillout.jpg")), "-o", str(out), *FAST]
    returncode, errors = terminate_after_first_output(command, out)
    assert returncode == 143, errors
    assert "interrupted" in errors and "Traceback" not in errors

    assert finished_outputs(out) == ["chillout_jue.mp4"]
    assert not [path for path in out.iterdir() if path.name.startswith(".")]
    assert probe_video(out / "chillout_jue.mp4").frame_count == 3
    killed = read_report(out / "batch-report.json")
    assert killed[""]["finished"] is False
    assert (killed["jue.mp4"]["status"], killed["qie.mp4"]["status"], killed["qie.mp4"]["reason"]) == ("ok", "skipped", NOT_RUN)

    leftover = out / ".chillout_qie.0123456789ab.partial.mp4"  # what a SIGKILL while writing leaves
    leftover.write_bytes(b"half a video")
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    resumed = read_report(out / "batch-report.json")
    assert resumed[""]["finished"] is True
    assert (resumed["jue.mp4"]["status"], resumed["jue.mp4"]["reason"], resumed["qie.mp4"]["status"]) == ("skipped", DONE, "ok")
    assert not leftover.exists() and probe_video(out / "chillout_qie.mp4").frame_count == 3


def test_pairs_csv_paths_outputs_and_per_row_options(workdir):
    project = workdir / "project"
    (project / "faces").mkdir(parents=True)
    (project / "faces" / "portrait.jpg").symlink_to(media("majicmix1.jpg"))
    clips_folder(project / "clips", "qie.mp4", "jue.mp4")
    (project / "pairs.csv").write_text(
        "reference,driving,output,seed,control,max-frames\n"
        "faces/portrait.jpg,clips/qie.mp4,made/custom.mp4,5,,\n"
        ",clips/jue.mp4,,,pdfgc,2\n"
    )
    result = runner.invoke(app, ["batch", "--pairs", str(project / "pairs.csv"), "--ref", str(media("chillout.jpg")), *FAST])
    assert result.exit_code == 0, result.output
    custom, default = project / "made" / "custom.mp4", project / "hellomeme" / "chillout_jue.mp4"
    assert probe_video(custom).tags[SEED_TAG] == "5" and probe_video(custom).frame_count == 3
    assert probe_video(default).frame_count == 2
    clips = read_report(project / "hellomeme" / "batch-report.json")
    assert [clips[name]["status"] for name in ("qie.mp4", "jue.mp4")] == ["ok", "ok"]
    assert clips["jue.mp4"]["reference"] == str(media("chillout.jpg"))


# -- the control flow, with the networks replaced by fakes --------------------


class StopAfterWriting(KeyboardInterrupt):
    """The stop arriving after a clip's video is under its final name, before the batch records it."""


@pytest.fixture
def fake_models(workdir, monkeypatch):
    """`load_pipeline` and `animate` replaced: every call is recorded, `animate` does what
    `behaviour[driving name]` says (write a 2-frame video, or raise, or both: StopAfterWriting)."""
    calls: dict[str, list] = {"load": [], "animate": []}
    behaviour: dict[str, BaseException] = {}

    def load_pipeline(version, options, cache, progress):
        calls["load"].append(options.control)
        return object()

    def animate(reference, driving, output, settings, models, *, force, progress, extra_tags, track_cache=None):
        calls["animate"].append((driving.name, settings.models.control, force))
        if driving.name in behaviour and not isinstance(behaviour[driving.name], StopAfterWriting):
            raise behaviour[driving.name]
        frames = list(read_frames(driving, 2))
        write_video(frames, output, 15, metadata={SEED_TAG: str(settings.seed), **extra_tags}, force=force)
        if driving.name in behaviour:
            raise behaviour[driving.name]
        return AnimateResult(output, 2, 15.0, settings.seed, 0, 0.1)

    monkeypatch.setattr(batch, "load_pipeline", load_pipeline)
    monkeypatch.setattr(batch, "animate", animate)
    return calls, behaviour


def fake_plan(workdir: Path, controls: list[str]) -> BatchPlan:
    """One job per control, on the test clips, with settings that make 2 frames."""
    names = ["jue.mp4", "qie.mp4", "ysll.mp4", "nice.mp4"][: len(controls)]
    folder = clips_folder(workdir / "clips", *names)
    settings = AnimateSettings(max_frames=2, size=128)
    plan = plan_folder(folder, media("majicmix1.jpg"), settings)
    jobs = [
        dataclasses.replace(job, settings=dataclasses.replace(settings, models=dataclasses.replace(settings.models, control=control)))
        for job, control in zip(plan.jobs, controls)
    ]
    return dataclasses.replace(plan, jobs=tuple(jobs))


def test_unexpected_errors_are_recorded_and_models_load_once_per_control(fake_models, workdir, tiny_cache):
    calls, behaviour = fake_models
    plan = fake_plan(workdir, ["blendshapes", "pdfgc", "blendshapes"])
    behaviour["qie.mp4"] = RuntimeError("out of memory, say")
    report = run_batch(plan, cache=WeightCache(tiny_cache))
    assert calls["load"] == ["blendshapes", "pdfgc"]
    assert [name for name, *_ in calls["animate"]] == ["jue.mp4", "ysll.mp4", "qie.mp4"]
    assert [clip.status for clip in report.clips] == ["ok", "failed", "ok"]  # plan order
    assert report.clips[1].reason == "RuntimeError: out of memory, say" and report.failed and report.finished


def test_an_interrupt_stops_the_batch_and_writes_the_report(fake_models, workdir, tiny_cache):
    _, behaviour = fake_models
    plan = fake_plan(workdir, ["blendshapes"] * 3)
    behaviour["qie.mp4"] = KeyboardInterrupt()
    report = run_batch(plan, cache=WeightCache(tiny_cache))
    assert not report.finished and [clip.status for clip in report.clips] == ["ok", "skipped", "skipped"]
    assert report.clips[1].reason == NOT_RUN
    saved = json.loads(plan.report.read_text())
    assert saved["finished"] is False and saved["counts"] == {"ok": 1, "failed": 0, "skipped": 2}


def test_a_clip_finished_as_the_stop_came_is_reported_ok(fake_models, workdir, tiny_cache):
    _, behaviour = fake_models
    plan = fake_plan(workdir, ["blendshapes"] * 3)
    behaviour["qie.mp4"] = StopAfterWriting()
    report = run_batch(plan, cache=WeightCache(tiny_cache))
    assert not report.finished
    assert [(clip.status, clip.reason, clip.frames) for clip in report.clips] == [("ok", "", 2), ("ok", FINISHED_AT_STOP, 2), ("skipped", NOT_RUN, None)]
    assert report.clips[1].seed is not None


def test_a_rerun_skips_finished_clips_until_a_setting_or_an_input_changes(fake_models, workdir, tiny_cache):
    calls, _ = fake_models
    plan = fake_plan(workdir, ["blendshapes"] * 2)
    assert [clip.status for clip in run_batch(plan, cache=WeightCache(tiny_cache)).clips] == ["ok", "ok"]
    again = run_batch(plan, cache=WeightCache(tiny_cache))
    assert [(clip.status, clip.reason, clip.frames) for clip in again.clips] == [("skipped", DONE, 2)] * 2
    assert len(calls["animate"]) == 2

    first, second = plan.jobs
    changed = dataclasses.replace(plan, jobs=(dataclasses.replace(first, settings=dataclasses.replace(first.settings, steps=3)), second))
    assert [clip.status for clip in run_batch(changed, cache=WeightCache(tiny_cache)).clips] == ["ok", "skipped"]
    second.driving.unlink()
    second.driving.symlink_to(media("nice.mp4"))  # same name, other clip
    assert [clip.status for clip in run_batch(changed, cache=WeightCache(tiny_cache)).clips] == ["skipped", "ok"]
    assert calls["animate"][2:] == [("jue.mp4", "blendshapes", True), ("qie.mp4", "blendshapes", True)]


def test_outputs_hellomeme_did_not_make_are_kept_unless_forced_and_broken_ones_remade(fake_models, workdir, tiny_cache):
    calls, _ = fake_models
    plan = fake_plan(workdir, ["blendshapes"] * 2)
    foreign, broken = (job.output for job in plan.jobs)
    foreign.parent.mkdir()
    gray_clip(foreign)
    kept = foreign.stat().st_mtime_ns
    broken.write_bytes(b"cut short")
    report = run_batch(plan, cache=WeightCache(tiny_cache))
    assert [clip.status for clip in report.clips] == ["failed", "ok"] and FOREIGN in report.clips[0].reason
    assert calls["animate"] == [("qie.mp4", "blendshapes", True)]
    assert foreign.stat().st_mtime_ns == kept

    forced = run_batch(plan, force=True, cache=WeightCache(tiny_cache))
    assert [clip.status for clip in forced.clips] == ["ok", "ok"]
    assert calls["animate"][1:] == [("jue.mp4", "blendshapes", True), ("qie.mp4", "blendshapes", True)]


# -- planning and the command line --------------------------------------------


def test_folder_plan_leaves_out_hidden_files_folders_the_reference_and_its_own_outputs(tmp_path):
    folder = clips_folder(tmp_path / "clips", "jue.mp4", "qie.mp4")
    (folder / ".DS_Store").write_bytes(b"")
    (folder / "sub").mkdir()
    (folder / "ref.jpg").symlink_to(media("majicmix1.jpg"))
    (folder / "ref_jue.mp4").write_bytes(b"made by an earlier run into this folder")
    (folder / "batch-report.json").write_text("{}")
    (folder / "notes.txt").write_text("")
    plan = plan_folder(folder, folder / "ref.jpg", AnimateSettings(), output_dir=folder)
    assert [job.driving.name for job in plan.jobs] == ["jue.mp4", "qie.mp4"]
    assert [job.output.name for job in plan.jobs] == ["ref_jue.mp4", "ref_qie.mp4"]
    assert [(clip.driving.name, clip.status) for clip in plan.rejected] == [("notes.txt", "failed")]

    (folder / "jue.mov").symlink_to(media("jue.mp4"))
    with pytest.raises(HellomemeError, match=r"jue.mp4: .*ref_jue.mp4 is also the output of .*jue.mov"):
        plan_folder(folder, folder / "ref.jpg", AnimateSettings())


BAD_PAIRS = [
    ("reference,driving,colour\na.jpg,b.mp4,red\n", "unknown column(s) 'colour'"),
    ("reference\na.jpg\n", "no 'driving' column"),
    ("reference,driving,steps\na.jpg,b.mp4,many\n", ":2: steps 'many' is not a whole number"),
    ("reference,driving,steps\na.jpg,b.mp4,0\n", ":2: --steps must be at least 1"),
    ("reference,driving,control\na.jpg,b.mp4,audio\n", ":2: --control must be one of blendshapes, pdfgc (got 'audio')"),
    ("reference,driving,version\na.jpg,b.mp4,v9\n", ":2: --version must be one of"),
    ("reference,driving,smooth\na.jpg,b.mp4,maybe\n", ":2: smoothing 'maybe' is not a yes/no value"),
    ("reference,driving,device\na.jpg,b.mp4,cpu\n", "unknown column(s) 'device'"),
    ("driving\nb.mp4\n", ":2: no reference"),
    ("reference,driving\na.jpg,b.mp4,extra\n", ":2: more cells than the header has columns"),
    ("reference,driving,output\na.jpg,b.mp4,x.mp4\na.jpg,c.mp4,x.mp4\n", "is also the output of " + "{table}:2 (give each row its own output)"),
    ("reference,driving,output\na.jpg,b.mp4,b.mp4\n", "refusing to write over an input"),
    ("reference,driving,output\na.jpg,b.mp4,b.bmp\n", "outputs are written as"),  # .gif, .webp, .webm are written since issue 29
    ("reference,driving\n", "no rows"),
]


@pytest.mark.parametrize("text, message", BAD_PAIRS)
def test_a_bad_pairs_row_refuses_the_table_naming_its_line(tmp_path, text, message):
    table = tmp_path / "pairs.csv"
    table.write_text(text)
    with pytest.raises(HellomemeError) as error:
        plan_pairs(table, AnimateSettings())
    assert str(error.value).startswith(str(table)) and message.format(table=table) in str(error.value)


def test_batch_builds_the_settings_from_the_options_it_shares_with_animate(tmp_path, monkeypatch):
    commands = typer.main.get_command(app).commands
    shared = {parameter.name for parameter in commands["animate"].params} - {"reference", "drive", "output", "force"}
    assert {"steps", "seed", "control", "loras", "size", "window", "version", "device"} <= shared <= {p.name for p in commands["batch"].params}
    seen = {}

    def run_batch(plan, **options):
        seen.update(plan=plan, **options)
        raise typer.Exit()

    monkeypatch.setattr(batch_run, "run_batch", run_batch)
    folder = clips_folder(tmp_path / "clips", "jue.mp4")
    arguments = ["batch", str(folder), "--ref", str(media("majicmix1.jpg")), "--steps", "3", "--control", "pdfgc", "--device", "cuda:1"]
    assert runner.invoke(app, arguments).exit_code == 0
    (job,) = seen["plan"].jobs
    assert (job.settings.steps, job.settings.models.control, job.settings.seed, job.settings.models.device) == (3, "pdfgc", None, "cuda:1")
    assert seen["cluster"] is None
