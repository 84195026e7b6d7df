"""`hellomeme compare` and `batch --eval`: several variants of one clip made, scored and shown
together (tiny weights: the videos are noise, the plumbing is real), and the best of each column."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

from conftest import MEDIA, require
from hellomeme_cli.cli import app
from hellomeme_cli.media.video import probe_video, read_image
from hellomeme_cli.quality.compare import best, metrics_markdown
from test_batch import FAST, clips_folder, read_report

runner = CliRunner()


def test_compare_makes_each_variant_scores_it_and_shows_them_together(workdir):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip")
    result = runner.invoke(app, ["compare", str(reference), str(clip), "--versions", "v2,v5", "--size", "128", "--steps", "1", "--max-frames", "3", "-o", "cmp"])
    assert result.exit_code == 0, result.output
    folder = workdir / "cmp"
    assert sorted(path.name for path in folder.iterdir()) == ["contact_sheet.png", "metrics.json", "metrics.md", "side_by_side.mp4", "v2.mp4", "v5.mp4"]
    both = probe_video(folder / "side_by_side.mp4")
    assert both.frame_count == 3 and both.has_audio and both.height == 128 + 28 and both.width == 128 + 128 + 128  # the clip (square) and two columns
    saved = json.loads((folder / "metrics.json").read_text())
    assert [row["variant"] for row in saved["variants"]] == ["v2", "v5"] and all(row["seconds"] > 0 for row in saved["variants"])
    seeds = {probe_video(folder / name).tags["hellomeme_seed"] for name in ("v2.mp4", "v5.mp4")}
    assert seeds == {str(saved["seed"])}  # one seed for every variant
    assert "| v2 |" in (folder / "metrics.md").read_text() and "**" in (folder / "metrics.md").read_text()
    assert read_image(folder / "contact_sheet.png").shape[0] == 3 * (160 + 28)  # the clip's row and one per variant


def test_the_best_of_each_column_is_the_lowest_error_the_highest_identity_and_the_change_nearest_one():
    rows = [
        {"variant": "a", "pose_error_deg": 3.0, "identity": 0.6, "flicker": 1.4, "seam_score": 0.9, "expression_error": None},
        {"variant": "b", "pose_error_deg": 1.0, "identity": 0.8, "flicker": 0.95, "seam_score": 1.5, "expression_error": None},
    ]
    marked = best(rows)
    assert (marked["pose_error_deg"], marked["identity"], marked["flicker"], marked["seam_score"], marked["expression_error"]) == (1, 1, 1, 0, None)
    table = metrics_markdown(rows)
    assert "| a | - | 3 | - | - | 0.6 | 1.4 | **0.9** | - |" in table and "| b | - | **1** | - | - | **0.8** | **0.95** | 1.5 | - |" in table


def test_few_step_recipes_are_a_variant_axis_checked_before_anything_runs(workdir):
    from hellomeme_cli.errors import HellomemeError
    from hellomeme_cli.quality.compare import Variant

    assert Variant("v2", "RealisticVisionV60B1", "tcd").label == "v2 RealisticVisionV60B1 few-step tcd"
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip")
    result = runner.invoke(app, ["compare", str(reference), str(clip), "--versions", "v2", "--recipes", "off,quick", "-o", "cmp"])
    assert isinstance(result.exception, HellomemeError) and "unknown --few-step recipe 'quick'" in str(result.exception)
    assert not (workdir / "cmp").exists()


def test_batch_eval_puts_each_outputs_summary_on_its_row_of_the_json_and_csv_report(workdir):
    folder = clips_folder(workdir / "clips", "qie.mp4", "jue.mp4")
    command = ["batch", str(folder), "--ref", str(MEDIA / "majicmix1.jpg"), *FAST, "--eval"]
    assert runner.invoke(app, command).exit_code == 0
    report = read_report(folder / "hellomeme" / "batch-report.json")
    assert report["qie.mp4"]["metrics"]["frames"] == 3 and "identity" in report["jue.mp4"]["metrics"]
    with (folder / "hellomeme" / "batch-report.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert [row["status"] for row in rows] == ["ok", "ok"] and {"identity", "flicker", "seam_score"} <= set(rows[0])
    rerun = runner.invoke(app, command)  # finished clips are skipped, and scored all the same
    assert rerun.exit_code == 0 and read_report(folder / "hellomeme" / "batch-report.json")["qie.mp4"]["metrics"]["frames"] == 3
