"""A batch on Ray: making the clips (jobs.py) on many GPUs and many machines.

One Ray actor per GPU (or `workers` of them on CPUs) loads the models once and makes clip after
clip; the driver hands the next clip to whichever actor is free, so a slow clip holds back no
other and a worker on an added node takes work as soon as it is up. Before any work each worker
checks that it sees the batch's files (a shared filesystem) and weights. A worker lost during a clip
(killed, out of memory, its node gone) costs that clip one more try on another worker, then the
clip is reported failed; its temporary file is removed. Reports go through the local batch's
ledger, so the JSON report and the summary are the same.

Clips are handed to actors by hand rather than as plain Ray tasks because an actor keeps its
models loaded between clips; the one retry is our own bookkeeping because Ray's `max_task_retries`
retries on the same (restarted) actor, and a clip must not be redone on the worker that lost it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from queue import Empty

import torch

from hellomeme_cli.batch.jobs import ClipReport, ClusterOptions, _check_setup, _ClipMaker, _failed, _Ledger, _Task, remove_leftovers
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.logs import native_stderr_muted
from hellomeme_cli.progress import ProgressCallback, ProgressEvent
from hellomeme_cli.weights.cache import WeightCache

INSTALL = 'hellomeme batch --ray needs Ray: pip install "hellomeme-cli[cluster]"'
SHARED = "every node must see the inputs, outputs and weights at the same paths (a shared filesystem, docs/batch.md)"
ATTEMPTS = 2  # a clip whose worker is lost is tried once more, on another worker, then reported failed
OBJECT_STORE_BYTES = 200_000_000  # a local runtime's object store: clips travel as paths, only references as pictures
POLL_SECONDS = 0.2  # how often the driver looks at workers' stages between finished clips
GROW_SECONDS = 5.0  # how often it looks for GPUs added to the cluster
EVENT_SECONDS = 0.25  # a worker sends at most this often the progress of one stage (its start and end always)
STOP_SECONDS = 30.0  # how long a stopped batch waits for its killed workers to be gone
HEAD_RESOURCE = "node:__internal_head__"  # the resource Ray gives the head node alone
PLACE_SECONDS = 60.0  # once a first worker has answered, how long the others may take (Ray may have no room for them yet)
CHECK_PREFIX = ".hellomeme-shared-"  # hidden: a folder plan leaves it out


def import_ray(address: str | None = None):
    """Ray, or the one line that says how to install it. To join the cluster at `address` with a
    token this machine has, Ray is put in token mode first (`RAY_AUTH_MODE=token`): `ray start` is
    told so on each node, a driver is not, and Ray sends no token without it."""
    if address is not None and "RAY_AUTH_MODE" not in os.environ and cluster_token_source() is not None:
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray" in sys.modules:  # it read its configuration when loaded: again, as Ray's own token setup does
            sys.modules["ray"]._raylet.Config.initialize("")
    try:
        import ray
    except ImportError:
        raise HellomemeError(INSTALL) from None
    return ray


def run_on_ray(tasks: Sequence[_Task], options: ClusterOptions, cache: WeightCache, ledger: _Ledger, progress: ProgressCallback) -> None:
    """Make `tasks` on Ray workers, recording each clip in `ledger`. Uses the Ray runtime this
    process already started, else starts (and stops) one as `options` say."""
    ray = import_ray(options.address)
    with _runtime(ray, options):
        _Driver(ray, tasks, options, cache, ledger, progress).run()


@contextlib.contextmanager
def _runtime(ray, options: ClusterOptions) -> Iterator[None]:
    """The Ray runtime the batch runs on, for as long as it runs: the one this process started, else
    a local one of its own (never a cluster `ray start` left on the machine, running or not), else the
    cluster at `options.address`, with its authentication token. A runtime it started it stops; a
    cluster it only joined it leaves running."""
    if ray.is_initialized():
        yield
        return
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with native_stderr_muted():  # Ray's C++ core writes every connection retry there
            if options.address is None:
                cpus = max(os.cpu_count() or 1, options.workers or 1)  # `workers` CPU workers always fit
                # "local": a new runtime, whatever RAY_ADDRESS or the pointer file of a `ray start` says.
                ray.init(address="local", num_cpus=cpus, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, **quiet)
            else:
                ray.init(address=options.address, **quiet)
    except (ConnectionError, ValueError, RuntimeError, ray.exceptions.AuthenticationError) as error:
        raise HellomemeError(_cannot_reach(options.address, error)) from None
    _restore(handlers)  # Ray's own would abort the driver before the report is written
    try:
        yield
    finally:
        ray.shutdown()
        _restore(handlers)  # and would stay behind it, ending the next program that gets a SIGTERM in the middle


def _restore(handlers: dict[int, object]) -> None:
    if threading.current_thread() is threading.main_thread():
        for number, handler in handlers.items():
            if handler is not None:
                signal.signal(number, handler)


# Where Ray looks for a cluster's token, first found first: the variable, the file it names, the default file.
TOKEN_VARIABLE, TOKEN_PATH_VARIABLE, DEFAULT_TOKEN = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", Path("~/.ray/auth_token")


def cluster_token_source() -> str | None:
    """Where this machine keeps a Ray cluster's authentication token, or None."""
    if os.environ.get(TOKEN_VARIABLE):
        return TOKEN_VARIABLE
    named = os.environ.get(TOKEN_PATH_VARIABLE)
    if named:
        return named if Path(named).expanduser().is_file() else None
    return str(DEFAULT_TOKEN) if DEFAULT_TOKEN.expanduser().is_file() else None


def _cannot_reach(address: str | None, error: BaseException) -> str:
    """One line for a runtime that would not start, or a cluster that would not take this driver."""
    if address is None:
        return f"cannot start a local Ray runtime: {_first_line(error)}"
    source = cluster_token_source()
    if source is None:
        return (
            f"cannot reach the Ray cluster at {address} ({_first_line(error)}): it may want its authentication token "
            f"(Ray's default), which this machine does not have: copy the head node's {DEFAULT_TOKEN} here, or set "
            f"{TOKEN_VARIABLE} (`ray get-auth-token` on the head node prints it; docs/batch.md)"
        )
    if "token" in str(error).lower():
        return f"the Ray cluster at {address} refuses the authentication token in {source}: copy the head node's {DEFAULT_TOKEN} (docs/batch.md)"
    return f"cannot reach the Ray cluster at {address}: {_first_line(error)}"


class Worker:
    """A Ray actor: the models of one GPU (or a share of the CPUs), loaded once, clip after clip."""

    def __init__(self, number: int, cache_home: str, events) -> None:
        import ray

        gpus = ray.get_gpu_ids()
        host = socket.gethostname()
        assigned = ray.get_runtime_context().get_assigned_resources()
        if gpus:
            device, self.label = "cuda", f"{host}/gpu{gpus[0]}"
            if assigned.get("GPU", 1) < 1:  # one GPU, several workers
                self.label += f"#{number}"
        else:
            device, self.label = "cpu", f"{host}/cpu{number}"
            torch.set_num_threads(max(1, int(assigned.get("CPU", 1))))
        self.maker = _ClipMaker(self.label, device, WeightCache(Path(cache_home)))
        self.events = events
        self.last: tuple[str, float] = ("", 0.0)  # the stage last sent, and when
        self.clip = ""  # the driving clip's name, shown with its stages

    def check(self, inputs: Sequence[str], markers: dict[str, str], jobs: Sequence) -> tuple[str, str]:
        """(label, problem or ''): the batch's files and weights as this worker sees them."""
        for folder, token in markers.items():
            marker = Path(folder) / f"{CHECK_PREFIX}{token}"
            if not marker.is_file():
                return self.label, f"{folder}: not the folder the batch writes to, on the Ray worker {self.label} ({SHARED})"
        for path in inputs:
            if not Path(path).exists():
                return self.label, f"{path}: not found on the Ray worker {self.label} ({SHARED})"
        try:
            _check_setup(jobs, self.maker.device, self.maker.cache)
        except HellomemeError as error:
            return self.label, f"on the Ray worker {self.label}: {error}"
        return self.label, ""

    def make(self, task: _Task, reference) -> ClipReport:
        self.clip = task.job.driving.name
        return self.maker.make(dataclasses.replace(task, reference=reference), self._forward)

    def _forward(self, event: ProgressEvent) -> None:
        """A stage's progress to the driver: its start and end, and between them at most every EVENT_SECONDS."""
        now = time.monotonic()
        stage, sent = self.last
        if event.task == stage and event.completed != event.total and now - sent < EVENT_SECONDS:
            return
        self.last = (event.task, now)
        self.events.put_nowait((self.label, dataclasses.replace(event, detail=f"{self.clip} {event.task}")))


@dataclasses.dataclass
class _Busy:
    worker: object
    label: str
    task: _Task


class _Driver:
    """Hands clips to free workers and records what comes back."""

    def __init__(self, ray, tasks: Sequence[_Task], options: ClusterOptions, cache: WeightCache, ledger: _Ledger, progress: ProgressCallback):
        from ray.util.queue import Queue

        self.ray, self.options, self.cache, self.ledger, self.progress = ray, options, cache, ledger, progress
        self.pending = deque(tasks)
        self.jobs = [task.job for task in tasks]
        self.lost: dict[int, list[str]] = {}  # clip index: the workers lost while making it
        self.starting: dict[object, object] = {}  # a worker's check: the worker
        self.busy: dict[object, _Busy] = {}  # a clip being made: by whom
        self.idle: list[tuple[object, str]] = []
        self.made: dict[str, int] = {}  # clips each worker has made
        self.workers = 0  # started so far: each has its own number
        self.first: set[object] = set()  # the checks of the first workers still running
        self.problems: list[str] = []  # what the first workers' checks found
        self.first_answer: float | None = None  # when the first worker's check came back
        self.token = secrets.token_hex(8)
        # On the head node (which every Ray cluster has, and a batch cannot outlive): a worker node may be lost mid-batch.
        self.events = Queue(actor_options={"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}})
        self.folders = sorted({self.ledger.plan.report.parent, *(job.output.parent for job in self.jobs)})
        self.inputs = sorted({str(path) for job in self.jobs for path in (job.reference, job.driving)})
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        self.target = options.workers or max(self.gpus, 1)
        if self.gpus:  # more workers than GPUs: as many on each GPU as it takes to place them all
            each = {"num_gpus": 1 / math.ceil(self.target / self.gpus), "num_cpus": 1}
        else:  # the cores shared between the workers, none asking for more than one node has
            largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
            each = {"num_cpus": max(1, min(int(resources.get("CPU", 1)) // self.target, int(largest)))}
        self.actor = ray.remote(max_restarts=0, **each)(Worker)
        references = {id(task.reference): task.reference for task in tasks}
        self.references = {key: ray.put(reference) for key, reference in references.items()}  # each picture sent once

    def run(self) -> None:
        markers = self._write_markers()
        try:
            for _ in range(min(self.target, len(self.pending))):
                self._start_worker()
            self.first = set(self.starting)  # every first worker checks the files before any clip is handed out
            self._loop()
        finally:
            for path in markers:
                path.unlink(missing_ok=True)
            self._stop()

    def _loop(self) -> None:
        looked = time.monotonic()
        while self.pending or self.busy:
            if not self.starting and not self.busy and not self.idle:
                self._start_worker()
            waiting = [*self.starting, *self.busy]
            done, _ = self.ray.wait(waiting, num_returns=1, timeout=POLL_SECONDS) if waiting else ([], [])
            for ref in done:
                if ref in self.starting:
                    self._started(ref)
                else:
                    self._finished(ref)
            if self.first and self.first_answer is not None and time.monotonic() - self.first_answer > PLACE_SECONDS:
                self.first.clear()  # the others wait for room on the cluster (checked when placed); work starts
                self._stop_on_problems()
            self._show_stages()
            if not self.options.workers and time.monotonic() - looked > GROW_SECONDS:
                looked = time.monotonic()
                self._grow()
            self._hand_out()

    def _write_markers(self) -> list[Path]:
        """A hidden file in each folder the batch writes to, that every worker must see."""
        markers = [folder / f"{CHECK_PREFIX}{self.token}" for folder in self.folders]
        for marker in markers:
            marker.write_text(self.token)
        return markers

    def _start_worker(self) -> None:
        self.workers += 1
        worker = self.actor.remote(self.workers, str(self.cache.home), self.events)
        markers = {str(folder): self.token for folder in self.folders}
        self.starting[worker.check.remote(self.inputs, markers, self.jobs)] = worker

    def _started(self, ref) -> None:
        """A worker's check back: ready, or a problem, which stops the batch once every first worker has answered."""
        worker = self.starting.pop(ref)
        self.first.discard(ref)
        self.first_answer = self.first_answer or time.monotonic()
        try:
            label, problem = self.ray.get(ref)
        except self.ray.exceptions.RayError as error:
            label, problem = "", f"a Ray worker could not start: {_first_line(error)}"
        if problem:
            self.problems.append(problem)
        else:
            self.idle.append((worker, label))
            self._say(label, "ready")
        if not self.first:
            self._stop_on_problems()

    def _stop_on_problems(self) -> None:
        """What the workers' checks found, all of it, in one line."""
        if self.problems:
            raise HellomemeError("; ".join(dict.fromkeys(self.problems)))

    def _hand_out(self) -> None:
        while self.idle and self.pending and not self.first:
            task = self.pending.popleft()
            elsewhere = [number for number, (_, label) in enumerate(self.idle) if label not in self.lost.get(task.index, ())]
            worker, label = self.idle.pop(elsewhere[-1] if elsewhere else -1)  # a retry: not where it was lost, if it can
            reference = self.references[id(task.reference)]
            made = worker.make.remote(dataclasses.replace(task, reference=None), reference)
            self.busy[made] = _Busy(worker, label, task)
        self.ledger.running = len(self.busy)
        self.ledger.show()

    def _finished(self, ref) -> None:
        busy = self.busy.pop(ref)
        task = busy.task
        try:
            report = self.ray.get(ref)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError):  # dead, or its node unreachable
            self._lost(busy)
            return
        except self.ray.exceptions.RayError as error:
            report = dataclasses.replace(_failed(task.job, _first_line(error)), device=busy.label)
        if task.index in self.lost and report.status == "ok":
            report = dataclasses.replace(report, reason=f"made on a second try: the worker {self.lost[task.index][0]} was lost while making it")
        self.idle.append((busy.worker, busy.label))
        self.made[busy.label] = self.made.get(busy.label, 0) + 1
        self.ledger.record(task.index, report)
        self._say(busy.label, "ready")

    def _lost(self, busy: _Busy) -> None:
        """The worker died during the clip: its partial file goes, the clip goes to another worker
        (a new one takes the lost one's place) unless this was its second try."""
        task = busy.task
        self.ray.kill(busy.worker)  # were it only unreachable for a while, it must not come back to finish the clip
        remove_leftovers(task.job.output)
        lost = self.lost.setdefault(task.index, [])
        lost.append(busy.label)
        self._say(busy.label, "lost")
        if len(lost) < ATTEMPTS:
            self.pending.appendleft(task)
        else:
            failed = _failed(task.job, f"the workers {' and '.join(lost)} were lost while making it (tried {ATTEMPTS} times)")
            self.ledger.record(task.index, dataclasses.replace(failed, device=busy.label))
        if self.pending:
            self._start_worker()

    def _grow(self) -> None:
        """One more worker for each GPU added to the cluster since the batch began (while clips wait)."""
        gpus = int(self.ray.cluster_resources().get("GPU", 0))
        if self.gpus and gpus > self.gpus:
            for _ in range(min(gpus - self.gpus, len(self.pending))):
                self._start_worker()
            self.gpus = gpus

    def _say(self, label: str, state: str) -> None:
        """A worker between clips: its state, and the clips it has made."""
        made = self.made.get(label, 0)
        self.progress(ProgressEvent(label, made, made, "clips made", detail=state))

    def _show_stages(self) -> None:
        """Each worker's current clip and stage, as the workers sent them."""
        events = []
        with contextlib.suppress(Empty):  # fewer than counted: shown next time
            events = self.events.get_nowait_batch(self.events.qsize())
        for label, event in events:
            self.progress(dataclasses.replace(event, task=label))

    def _stop(self) -> None:
        """Every worker stopped (an interrupted clip's partial file removed), the queue too."""
        for worker in [*self.starting.values(), *(busy.worker for busy in self.busy.values()), *(worker for worker, _ in self.idle)]:
            self.ray.kill(worker)
        if self.busy:  # a killed worker's clip is answered once the worker is gone: then none can still put an output in place
            self.ray.wait(list(self.busy), num_returns=len(self.busy), timeout=STOP_SECONDS)
        for ref, busy in self.busy.items():
            remove_leftovers(busy.task.job.output)
            with contextlib.suppress(self.ray.exceptions.RayError):  # killed first: the ledger's close finds what it put in place
                self.ledger.record(busy.task.index, self.ray.get(ref, timeout=0))
        for task_index in self.lost:
            remove_leftovers(self.ledger.plan.jobs[task_index].output)
        self.events.shutdown()


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
