"""Batch runs: `run_batch` takes a plan's clips through the steps listed in jobs.py, here or on Ray."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from hellomeme_cli.batch.jobs import DONE, BatchPlan, BatchReport, ClusterOptions, _check_setup, _ClipMaker, _Ledger, _prepare, _Task, remove_leftovers
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.media.files import check_writable
from hellomeme_cli.quality.evaluate import evaluate
from hellomeme_cli.quality.identity import COMPONENT as IDENTITY_COMPONENT
from hellomeme_cli.model_options import resolve_device
from hellomeme_cli.face.tracking import MODEL_FILE
from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress
from hellomeme_cli.weights.cache import WeightCache


def run_batch(
    plan: BatchPlan,
    *,
    force: bool = False,
    cache: WeightCache | None = None,
    progress: ProgressCallback = no_progress,
    cluster: ClusterOptions | None = None,
    evaluate: bool = False,
) -> BatchReport:
    """Make the plan's clips; `force` remakes finished ones too. Without `cluster`: one after the
    other in this process, on the device the settings name; with it: on Ray workers (on_ray.py).
    With `evaluate`, every finished output is then scored here (`hellomeme eval`'s summary on its row).
    Setup problems raise before any work; a clip's own problem goes into its report. On
    KeyboardInterrupt (Ctrl-C; the command line turns SIGTERM into one too) it stops, leaves no partial
    file under a final name, records the clips not made as skipped and returns."""
    folders = {plan.report.parent, *(job.output.parent for job in plan.jobs)}
    for folder in folders:
        check_writable(folder)  # before any work, not when the first clip is done
    if cluster is not None:
        from hellomeme_cli.batch.on_ray import import_ray

        import_ray(cluster.address)  # without Ray, say how to install it before anything else
    cache = cache or WeightCache()
    device = str(resolve_device(plan.jobs[0].settings.models.device)) if plan.jobs and cluster is None else None
    _check_setup(plan.jobs, device, cache)
    if evaluate:
        cache.require([IDENTITY_COMPONENT])  # the identity model, before any work
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for path in (plan.report, *(job.output for job in plan.jobs)):
        remove_leftovers(path)
    ledger = _Ledger(plan, progress)
    try:
        tasks = _prepare(plan.jobs, ledger, force, cache.path("face_landmarker") / MODEL_FILE, progress)
        if cluster is None:
            _run_here(tasks, device, cache, ledger, progress)
        elif tasks:
            from hellomeme_cli.batch.on_ray import run_on_ray  # Ray is an optional extra: imported only when asked for
            run_on_ray(tasks, cluster, cache, ledger, progress)
        if evaluate:
            _evaluate_outputs(ledger, cache, progress)
    except KeyboardInterrupt:
        return ledger.close(finished=False)
    return ledger.close(finished=True)


def _evaluate_outputs(ledger: _Ledger, cache: WeightCache, progress: ProgressCallback) -> None:
    """Each output made now or before (skipped as done) scored against its clip and reference."""
    finished = [(index, entry) for index, entry in enumerate(ledger.entries) if entry and entry.output and (entry.status == "ok" or entry.reason == DONE)]
    for number, (index, entry) in enumerate(finished):
        progress(ProgressEvent("evaluating", number, len(finished), "clips"))
        try:
            metrics = evaluate(entry.output, entry.driving, entry.reference, cache=cache).summary
        except HellomemeError as error:
            metrics = {"eval_error": str(error)}
        ledger.record(index, dataclasses.replace(entry, metrics=metrics))
    progress(ProgressEvent("evaluating", len(finished), len(finished), "clips"))


def _run_here(tasks: Sequence[_Task], device: str, cache: WeightCache, ledger: _Ledger, progress: ProgressCallback) -> None:
    maker = _ClipMaker(device, device, cache)
    for task in tasks:
        ledger.running = 1
        ledger.show()
        report = maker.make(task, progress)
        ledger.running = 0
        ledger.record(task.index, report)

