"""`hellomeme batch --ray`: a local Ray runtime on the CPU, tiny networks on real clips.

The same folder gives the same report as the batch in this process; a worker killed during a clip
loses nothing (the clip is redone on another worker, or reported after a second loss, and no
partial file stays); a rerun skips finished clips; a worker that does not see the batch's files
stops the batch before any work; SIGTERM stops the workers as it stops the batch in one process."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hellomeme_cli.batch import on_ray as cluster
from hellomeme_cli.batch.jobs import DONE, NOT_RUN, ClusterOptions, plan_folder, plan_pairs
from hellomeme_cli.batch.run import run_batch
from hellomeme_cli.cli import _ray_address_filled, app
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.pipeline import AnimateSettings
from hellomeme_cli.media.video import probe_video, write_image
from hellomeme_cli.weights.cache import WeightCache
from test_batch import FAST, clips_folder, finished_outputs, gray_clip, media, read_report, terminate_after_first_output

ray = pytest.importorskip("ray", reason='Ray is the optional extra: pip install -e ".[test,cluster]"')
runner = CliRunner()
SETTINGS = AnimateSettings(size=128, steps=1, guidance=1.0, window=3, overlap=0, max_frames=3)


@pytest.fixture(autouse=True)
def sigterm_as_it_was():
    """A test process that ran these still stops on SIGTERM (a CI time limit, a `timeout`): no Ray
    handler stays behind a batch, nor behind a test's own `ray.init`."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    assert signal.getsignal(signal.SIGTERM) == before


def test_without_ray_batch_says_in_one_line_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets when it is not installed
    plan = plan_folder(clips_folder(tmp_path / "clips", "qie.mp4"), media("majicmix1.jpg"), SETTINGS)
    with pytest.raises(HellomemeError) as error:
        run_batch(plan, cluster=ClusterOptions())
    assert str(error.value) == 'hellomeme batch --ray needs Ray: pip install "hellomeme-cli[cluster]"'
    assert not (tmp_path / "clips" / "hellomeme").exists()  # said before any work


def test_ray_addresses_and_worker_counts_are_checked():
    assert _ray_address_filled(["batch", "clips", "--ray"]) == ["batch", "clips", "--ray", "local"]
    assert _ray_address_filled(["batch", "--ray", "--workers", "2", "clips"]) == ["batch", "--ray", "local", "--workers", "2", "clips"]
    assert _ray_address_filled(["batch", "clips", "--ray", "auto"]) == ["batch", "clips", "--ray", "auto"]
    for address in ("auto", "ray://head:10001", "10.0.0.1:6379"):
        assert ClusterOptions(address).address == address
    with pytest.raises(HellomemeError, match=r"--ray clips/: not a Ray address .*give the clips folder before --ray"):
        ClusterOptions("clips/")
    with pytest.raises(HellomemeError, match="--workers must be at least 1"):
        ClusterOptions(workers=0)
    result = runner.invoke(app, ["batch", "clips", "--ref", "r.jpg", "--workers", "2"])
    assert isinstance(result.exception, HellomemeError) and "--workers needs --ray" in str(result.exception)


def comparable(report: dict) -> list[tuple]:
    """What must match between two runs of one folder: each clip's status, reason and frames."""
    return [(Path(clip["driving"]).name, clip["status"], clip["reason"], clip["frames"]) for clip in report["clips"]]


def test_on_two_ray_workers_a_folder_gives_the_local_report_and_a_rerun_skips_the_finished_clip(workdir):
    folder = clips_folder(workdir / "clips", "qie.mp4", "jue.mp4")
    (folder / "broken.mp4").write_bytes(media("tndtc.mp4").read_bytes()[:100_000])
    write_image(np.full((128, 128, 3), 200, np.uint8), folder / "faceless.jpg")
    gray_clip(folder / "blank.mp4")
    command = ["batch", str(folder), "--ref", str(media("majicmix1.jpg")), *FAST]

    local = runner.invoke(app, [*command, "-o", str(workdir / "local")])
    on_ray = runner.invoke(app, [*command, "-o", str(workdir / "ray"), "--ray", "local", "--workers", "2"])
    assert local.exit_code == on_ray.exit_code == 1, on_ray.output
    assert "5 clips: 2 ok, 3 failed, 0 skipped" in local.output and "5 clips: 2 ok, 3 failed, 0 skipped" in on_ray.output
    expected, made = read_report(workdir / "local" / "batch-report.json"), read_report(workdir / "ray" / "batch-report.json")
    assert comparable(made[""]) == comparable(expected[""]) and made[""]["counts"] == expected[""]["counts"]
    assert {key for clip in made[""]["clips"] for key in clip} == {key for clip in expected[""]["clips"] for key in clip}
    workers = {made[name]["device"] for name in ("qie.mp4", "jue.mp4", "blank.mp4")}
    assert len(workers) == 2 and all(label.endswith(("/cpu1", "/cpu2")) for label in workers)  # both workers took clips
    log = (workdir / "ray" / "batch-report.log").read_text()  # tracebacks come back from the workers
    assert f"== {folder / 'blank.mp4'}: {made['blank.mp4']['reason']}\nTraceback (most recent call last)" in log
    assert finished_outputs(workdir / "ray") == ["majicmix1_jue.mp4", "majicmix1_qie.mp4"]
    assert not [path.name for path in (workdir / "ray").iterdir() if path.name.startswith(".")]  # no partial files, no check files
    made_at = (workdir / "ray" / "majicmix1_qie.mp4").stat().st_mtime_ns

    rerun = runner.invoke(app, [*command, "-o", str(workdir / "ray"), "--ray", "local", "--workers", "2"])
    assert rerun.exit_code == 1, rerun.output
    again = read_report(workdir / "ray" / "batch-report.json")
    assert [(again[name]["status"], again[name]["reason"]) for name in ("qie.mp4", "jue.mp4")] == [("skipped", DONE)] * 2
    assert again["qie.mp4"]["seed"] == made["qie.mp4"]["seed"] and (workdir / "ray" / "majicmix1_qie.mp4").stat().st_mtime_ns == made_at
    assert [again[name]["status"] for name in ("broken.mp4", "faceless.jpg", "blank.mp4")] == ["failed"] * 3


def ray_workers(title: bytes = b"ray::Worker") -> list[int]:
    """Process ids of hellomeme's Ray workers alive; Ray titles an actor `ray::CLASS`, and
    `ray::CLASS.METHOD` while it runs one (`ray::Worker.make`: making a clip)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "cmdline").read_bytes().startswith(title):
                    found.append(int(entry.name))
    return found


def clip_makers() -> list[int]:
    return ray_workers(b"ray::Worker.make")


class Killer(threading.Thread):
    """Kills (SIGKILL, as the OOM killer does) the worker making a clip while its output is being
    written, `kills[output name]` times; with one worker there is one clip maker to kill."""

    def __init__(self, folder: Path, kills: dict[str, int]):
        super().__init__(daemon=True)
        self.folder, self.kills, self.killed, self.stop = folder, dict(kills), [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            partial = [path.name for path in self.folder.glob(".*.partial.mp4")] if self.folder.is_dir() else []
            for name, left in self.kills.items():
                if left and any(part.startswith(f".{Path(name).stem}.") for part in partial) and (makers := clip_makers()):
                    os.kill(makers[0], signal.SIGKILL)
                    self.kills[name] -= 1
                    self.killed.append(name)
                    while makers[0] in clip_makers():
                        time.sleep(0.005)
            time.sleep(0.005)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds Ray's worker processes in /proc")
def test_a_worker_killed_during_a_clip_costs_one_more_try_on_another_worker_then_the_clip_fails(workdir, tiny_cache):
    folder = clips_folder(workdir / "clips", "jue.mp4", "qie.mp4", "tndtc.mp4")
    out = workdir / "out"
    plan = plan_folder(folder, media("chillout.jpg"), SETTINGS, output_dir=out)
    killer = Killer(out, {"chillout_jue.mp4": 1, "chillout_qie.mp4": 2})
    events = []
    killer.start()
    try:
        report = run_batch(plan, cache=WeightCache(tiny_cache), progress=events.append, cluster=ClusterOptions(workers=1))
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed == ["chillout_jue.mp4", "chillout_qie.mp4", "chillout_qie.mp4"]
    jue, qie, tndtc = report.clips
    assert report.finished and (jue.status, qie.status, tndtc.status) == ("ok", "failed", "ok")
    lost = jue.reason.removeprefix("made on a second try: the worker ").removesuffix(" was lost while making it")
    assert lost != jue.reason and lost != jue.device  # redone on another worker than the one lost
    assert qie.reason.startswith("the workers ") and qie.reason.endswith(" were lost while making it (tried 2 times)")
    assert finished_outputs(out) == ["chillout_jue.mp4", "chillout_tndtc.mp4"]
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]  # the killed writers' partial files are gone
    assert probe_video(out / "chillout_jue.mp4").frame_count == 3 == probe_video(out / "chillout_tndtc.mp4").frame_count
    saved = read_report(out / "batch-report.json")
    assert saved[""]["counts"] == {"ok": 2, "failed": 1, "skipped": 0} and saved["qie.mp4"]["reason"] == qie.reason
    stages = {(event.task, event.detail) for event in events if event.task == tndtc.device}
    assert any(detail.startswith("tndtc.mp4 ") for _, detail in stages) and (tndtc.device, "ready") in stages  # its clip and stage
    clips = [event for event in events if event.task == "clips"]
    assert clips[-1].completed == 3 and clips[-1].detail == "2 ok, 1 failed, 0 skipped, 0 running"


def test_a_worker_that_does_not_see_the_batch_files_stops_it_before_any_work(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    worker = object.__new__(cluster.Worker)  # its check, run here as a worker on another node would
    worker.label, worker.maker = "node2/gpu0", None
    problem = worker.check([str(media("qie.mp4"))], {str(folder): "0123abcd"}, [])[1]
    assert problem == f"{folder}: not the folder the batch writes to, on the Ray worker node2/gpu0 ({cluster.SHARED})"
    (folder / f"{cluster.CHECK_PREFIX}0123abcd").write_text("0123abcd")
    problem = worker.check([str(tmp_path / "clips" / "a.mp4")], {str(folder): "0123abcd"}, [])[1]
    assert problem == f"{tmp_path / 'clips' / 'a.mp4'}: not found on the Ray worker node2/gpu0 ({cluster.SHARED})"



@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds Ray's worker processes in /proc")
def test_sigterm_stops_the_workers_writes_the_report_and_leaves_no_partial_file(workdir):
    folder = clips_folder(workdir / "clips", "jue.mp4", "qie.mp4", "tndtc.mp4", "ysll.mp4")
    out = workdir / "out"
    command = [sys.executable, "-m", "hellomeme_cli", "batch", str(folder), "--ref", str(media("civitai1.jpg")), "-o", str(out), *FAST, "--ray", "--workers", "2"]
    returncode, errors = terminate_after_first_output(command, out)
    assert returncode == 143, errors
    assert "interrupted" in errors and "Traceback" not in errors
    assert "Ray" not in errors and "logging.cc" not in errors  # Ray's own logs stay out of the terminal
    report = read_report(out / "batch-report.json")
    statuses = [report[name]["status"] for name in ("jue.mp4", "qie.mp4", "tndtc.mp4", "ysll.mp4")]
    assert report[""]["finished"] is False and "ok" in statuses and "skipped" in statuses
    assert all(report[name]["reason"] == NOT_RUN for name in report if name and report[name]["status"] == "skipped")
    assert finished_outputs(out) == sorted(f"civitai1_{Path(name).stem}.mp4" for name in report if name and report[name]["status"] == "ok")
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]
    assert not ray_workers()  # the runtime the batch started went with it


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="a path only this process sees: /proc/self/fd")
def test_an_input_a_worker_cannot_see_stops_the_batch_before_any_work(workdir, tiny_cache):
    """/proc/self/fd/N names a file only in the process that holds descriptor N open: as a clip on
    storage the workers do not share would be."""
    with media("qie.mp4").open("rb") as clip:
        private = os.dup2(clip.fileno(), 900)
        try:
            table = workdir / "pairs.csv"
            table.write_text(f"reference,driving\n{media('majicmix1.jpg')},/proc/self/fd/{private}\n")
            plan = plan_pairs(table, SETTINGS)
            with pytest.raises(HellomemeError) as error:
                run_batch(plan, cache=WeightCache(tiny_cache), cluster=ClusterOptions(workers=2))
        finally:
            os.close(private)
    assert str(error.value).startswith(f"/proc/self/fd/{private}: not found on the Ray worker ")
    assert str(error.value).endswith(f"({cluster.SHARED})")
    assert not list((workdir / "hellomeme").iterdir())  # no clip made, no marker left


def test_the_batch_benchmark_reports_clips_per_minute_for_each_run(tiny_cache, tmp_path, capsys):
    from benchmarks import bench_batch

    arguments = ["--clips", "2", "--workers", "2", "--no-local", "--max-frames", "2", "--steps", "1", "--home", str(tiny_cache), "--json", str(tmp_path / "b.json")]
    assert bench_batch.main(arguments) == 0
    (run,) = json.loads((tmp_path / "b.json").read_text())["runs"]
    assert (run["workers"], run["clips"], run["ok"]) == (2, 2, 2)
    assert run["clips_per_minute"] > 0 and 0 < run["first_ready_seconds"] < run["seconds"]
    assert "clips/min" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a GPU Ray is told of and torch cannot use")
def test_in_a_runtime_already_started_two_workers_share_its_one_gpu_and_check_their_device(workdir, tiny_cache):
    handler = signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=2, num_gpus=1, object_store_memory=cluster.OBJECT_STORE_BYTES, include_dashboard=False, log_to_driver=False)
    try:
        plan = plan_folder(clips_folder(workdir / "clips", "qie.mp4", "jue.mp4"), media("majicmix1.jpg"), SETTINGS)
        with pytest.raises(HellomemeError) as error:
            run_batch(plan, cache=WeightCache(tiny_cache), cluster=ClusterOptions(workers=2))
        assert ray.is_initialized()  # a runtime the batch did not start is left running
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, handler)  # ray.init's own, which its shutdown leaves behind
    problems = sorted(str(error.value).split("; "))  # both workers' checks, said at once
    assert len(problems) == 2 and all(re.fullmatch(r"on the Ray worker \S+/gpu0#[12]: device 'cuda' is not available here \(CUDA GPUs: 0\)", p) for p in problems)
