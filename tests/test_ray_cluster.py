"""`hellomeme batch --ray HOST:PORT` on a real Ray cluster: two nodes joined with `ray start` under
token authentication, on 127.0.0.1 only (loopback_cluster.py), tiny networks on real clips.

A node lost mid-batch costs its clip one more try on the other node, and the report, the outputs and
a rerun lose nothing; a driver stopped with SIGTERM writes its report and leaves the cluster running;
a driver without the cluster's token is told so in one line; GPUs the cluster advertises get one
worker each."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

import loopback_cluster
from conftest import PROJECT_ROOT
from hellomeme_cli.batch.jobs import DONE, NOT_RUN
from hellomeme_cli.media.video import probe_video
from test_batch import FAST, clips_folder, finished_outputs, media, read_report

pytest.importorskip("ray", reason='Ray is the optional extra: pip install -e ".[test,cluster]"')
_why = loopback_cluster.unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")

CLIPS = ("jue.mp4", "qie.mp4", "tndtc.mp4", "ysll.mp4")


@pytest.fixture(scope="module")
def cluster(tiny_cache):
    """Two nodes, one CPU each: `node1` the head, `node2` joined to it."""
    made = loopback_cluster.LoopbackCluster({**os.environ, "HELLOMEME_HOME": str(tiny_cache), "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        made.start("node1", head=True)
        made.start("node2")
        yield made
    finally:
        made.close()


def batch(cluster, folder: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hellomeme_cli", "batch", str(folder), "--ref", str(media("chillout.jpg")), "-o", str(out), *FAST, *extra]


def making_a_clip(processes: set[int]) -> bool:
    """Whether one of `processes` is a worker making a clip (Ray titles it `ray::Worker.make`)."""
    for pid in processes:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::Worker.make"):
                return True
    return False


def test_a_node_lost_mid_batch_costs_its_clip_a_second_try_on_the_other_node_and_a_rerun_skips_all(cluster, tmp_path):
    folder, out = clips_folder(tmp_path / "clips", *CLIPS), tmp_path / "out"
    driver = cluster.popen([*batch(cluster, folder, out), "--ray", cluster.address, "--workers", "2"], home=cluster.home("driver", token=True))
    killed = False
    while driver.poll() is None and not killed:
        if list(out.glob(".*.partial.mp4")) and making_a_clip(cluster.processes("node2")):
            cluster.kill("node2")
            killed = True
        time.sleep(0.01)
    _, errors = driver.communicate(timeout=600)
    assert killed, "node2 never made a clip"
    assert driver.returncode == 0, errors
    report = read_report(out / "batch-report.json")
    assert report[""]["counts"] == {"ok": 4, "failed": 0, "skipped": 0}
    again = [name for name in CLIPS if report[name]["reason"].startswith("made on a second try")]
    assert len(again) == 1, report
    assert re.fullmatch(r"made on a second try: the worker node2/cpu\d+ was lost while making it", report[again[0]]["reason"])
    assert report[again[0]]["device"].startswith("node1/")
    assert finished_outputs(out) == sorted(f"chillout_{Path(name).stem}.mp4" for name in CLIPS)
    assert all(probe_video(out / f"chillout_{Path(name).stem}.mp4").frame_count == 3 for name in CLIPS)
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]  # no partial file, no check file

    rerun = cluster.run([*batch(cluster, folder, out), "--ray", cluster.address, "--workers", "2"], home=cluster.home("driver", token=True))
    assert rerun.returncode == 0, rerun.stderr
    assert [read_report(out / "batch-report.json")[name]["reason"] for name in CLIPS] == [DONE] * 4


def test_a_driver_stopped_with_sigterm_writes_its_report_and_leaves_the_cluster_running(cluster, tmp_path):
    folder, out = clips_folder(tmp_path / "clips", *CLIPS), tmp_path / "out"
    home = cluster.home("driver", token=True)
    driver = cluster.popen([*batch(cluster, folder, out), "--ray", cluster.address], home=home)
    deadline = time.monotonic() + 600
    while not finished_outputs(out) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGTERM)
    _, errors = driver.communicate(timeout=120)
    assert driver.returncode == 143, errors
    report = read_report(out / "batch-report.json")
    assert report[""]["finished"] is False and "ok" in [report[name]["status"] for name in CLIPS]
    assert all(report[name]["reason"] == NOT_RUN for name in CLIPS if report[name]["status"] == "skipped")
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]
    assert cluster.alive("node1")  # a cluster the driver only joined is left running: the next batch finishes the clips
    finish = cluster.run([*batch(cluster, folder, out), "--ray", cluster.address], home=home)
    assert finish.returncode == 0, finish.stderr
    assert finished_outputs(out) == sorted(f"chillout_{Path(name).stem}.mp4" for name in CLIPS)


def test_a_driver_without_the_clusters_token_is_told_in_one_line(cluster, tmp_path):
    folder = clips_folder(tmp_path / "clips", "qie.mp4")
    result = cluster.run([*batch(cluster, folder, tmp_path / "out"), "--ray", cluster.address], home=cluster.home("stranger", token=False), timeout=300)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("checking ")]  # the bar of the clips checked first
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot reach the Ray cluster at {cluster.address}") and "~/.ray/auth_token" in lines[0]


def test_each_gpu_the_cluster_advertises_gets_a_worker_of_its_own(tiny_cache, tmp_path):
    """Two nodes telling Ray of one GPU each (`ray start --num-gpus 1`; this machine has none): two
    workers, one on each node's GPU, each checking its device before any work."""
    gpus = loopback_cluster.LoopbackCluster({**os.environ, "HELLOMEME_HOME": str(tiny_cache), "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        gpus.start("gpu1", head=True, gpus=1)
        gpus.start("gpu2", gpus=1)
        folder, out = clips_folder(tmp_path / "clips", "qie.mp4", "jue.mp4"), tmp_path / "out"
        result = gpus.run([*batch(gpus, folder, out), "--ray", gpus.address], home=gpus.home("driver", token=True))
    finally:
        gpus.close()
    assert result.returncode == 1, result.stderr
    (said,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    problems = sorted(said.removeprefix("error: ").split("; "))
    assert problems == [f"on the Ray worker {node}/gpu0: device 'cuda' is not available here (CUDA GPUs: 0)" for node in ("gpu1", "gpu2")]
    assert not finished_outputs(out)


def test_without_an_address_each_batch_runs_on_a_runtime_of_its_own_whatever_ray_start_left(tiny_cache, tmp_path):
    """A `ray start --head` that has ended leaves its pointer file: `batch --ray` starts a runtime of
    its own all the same, and two such batches at once do not disturb each other."""
    ended = loopback_cluster.LoopbackCluster({**os.environ, "HELLOMEME_HOME": str(tiny_cache), "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        ended.start("node1", head=True)
        ended.kill("node1")
        assert (ended.folder / "ray" / "ray_current_cluster").is_file()  # what `ray.init()` alone would try to join
        home = ended.home("driver", token=False)
        runs = {
            name: ended.popen([*batch(ended, clips_folder(tmp_path / name, clip), tmp_path / f"{name}-out"), "--ray", "--workers", "1"], home=home)
            for name, clip in (("a", "qie.mp4"), ("b", "jue.mp4"))
        }
        done = {name: run.communicate(timeout=900) for name, run in runs.items()}
    finally:
        ended.close()
    for name, run in runs.items():
        assert run.returncode == 0, done[name][1]
    assert finished_outputs(tmp_path / "a-out") == ["chillout_qie.mp4"] and finished_outputs(tmp_path / "b-out") == ["chillout_jue.mp4"]
