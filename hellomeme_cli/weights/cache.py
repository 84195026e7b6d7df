"""The weight cache: what `weights.lock` pins, where its files are, and getting them there.

Components on the Hugging Face hub download with huggingface_hub into the standard Hugging
Face cache (`HF_HUB_CACHE`, or `HF_HOME/hub`), so a machine that already holds the
`songkey/*` repos downloads nothing. `$HELLOMEME_HOME/<component>/<path>` holds the rest:
imported copies (air-gapped machines), tiny test weights, and the face landmarker (a plain
URL); a component complete there is used from there. Every file fetched is checked against
the lock's sha256, or the hub's own hash where the lock has none, and its sha256 recorded
(`<component>/.hellomeme.json` for HELLOMEME_HOME, `hub-files.json` for the Hugging Face
cache) so `verify` can tell a corrupt file from a good one later.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.file_download import http_get

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.logs import hub_logs_quiet
from hellomeme_cli.media.files import atomic_output, write_atomically
from hellomeme_cli.progress import ProgressCallback, ProgressEvent, no_progress

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOCK_PATH = Path(__file__).with_name("weights.lock")
RECORD_NAME = ".hellomeme.json"
HUB_RECORD_NAME = "hub-files.json"
CHUNK = 1 << 20
DOWNLOAD_WORKERS = 4
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")


@dataclasses.dataclass(frozen=True)
class LockedFile:
    path: str
    sha256: str = ""
    size: int = 0


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    description: str
    files: tuple[LockedFile, ...]
    licence: str
    needed_for: tuple[str, ...] = ()  # runs needing it beyond the versions' (those come from versions.py)
    repo: str = ""
    revision: str = ""
    subfolder: str = ""
    url: str = ""

    def remote_path(self, locked: LockedFile) -> str:
        """The file's path in the hub repo."""
        return f"{self.subfolder}/{locked.path}" if self.subfolder else locked.path

    @property
    def source(self) -> str:
        return self.url or f"huggingface {self.repo}@{self.revision}" + (f"/{self.subfolder}" if self.subfolder else "")


def read_lock(path: Path | None = None) -> dict[str, Component]:
    path = path or LOCK_PATH
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise HellomemeError(f"{path}: cannot read the weight lock ({error})") from None
    components = {}
    for name, entry in data.get("components", {}).items():
        files = tuple(LockedFile(**f) for f in entry.get("files", []))
        fields = {k: entry[k] for k in ("repo", "revision", "subfolder", "url") if k in entry}
        components[name] = Component(
            name=name,
            description=entry.get("description", ""),
            files=files,
            licence=entry.get("licence", ""),
            needed_for=tuple(entry.get("needed_for", [])),
            **fields,
        )
    return components


def write_lock(components: dict[str, Component], path: Path | None = None) -> None:
    """Write the lock back in the same format (a TOML subset: strings, ints, lists)."""
    lines = [
        "# Every component hellomeme can download. `hellomeme weights lock` (on a machine",
        "# that reaches the sources) resolves revisions to commit ids and fills sha256 and",
        "# size for every file; empty values are not known yet.",
        "",
        "version = 1",
    ]
    for component in components.values():
        lines += ["", f"[components.{component.name}]"]
        for key in ("description", "repo", "revision", "subfolder", "url", "licence"):
            value = getattr(component, key)
            if value:
                lines.append(f"{key} = {json.dumps(value)}")
        if component.needed_for:
            lines.append(f"needed_for = {json.dumps(list(component.needed_for))}")
        lines.append("files = [")
        for f in component.files:
            lines.append(f"  {{ path = {json.dumps(f.path)}, sha256 = {json.dumps(f.sha256)}, size = {f.size} }},")
        lines.append("]")
    write_atomically(path or LOCK_PATH, "\n".join(lines) + "\n")


def default_home() -> Path:
    if "HELLOMEME_HOME" in os.environ:
        return Path(os.environ["HELLOMEME_HOME"]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "hellomeme"


# huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE, HF_HOME and HF_HUB_OFFLINE once, at import;
# these read them when called, so a setting made later in the process counts too.


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _matching_sha256(path: Path, expected: str) -> str | None:
    """The file's sha256, or None when it does not match `expected`: a sha256 (the lock's,
    or the hub's etag of an LFS file) or the hub's etag of a file kept in git, the sha1 of
    `blob <size>\\0<content>`. An etag of any other form checks nothing."""
    if not _GIT_SHA1.fullmatch(expected):
        actual = sha256_of(path)
        return None if _SHA256.fullmatch(expected) and actual != expected else actual
    git, digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode()), hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            git.update(block)
            digest.update(block)
    return digest.hexdigest() if git.hexdigest() == expected else None


@dataclasses.dataclass(frozen=True)
class FileState:
    component: str
    path: str
    state: str  # "ok", "unverified" (no hash to check against), "missing", "corrupt"
    detail: str = ""
    location: Path | None = None  # the file, None when missing
    where: str = ""  # "home" ($HELLOMEME_HOME), "hub" (the Hugging Face cache), "" when missing


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a component's files are: `folder` holds them as the lock names them."""

    where: str  # "home" or "hub"
    folder: Path | None  # None: nothing of it in the Hugging Face cache
    files: dict[str, Path]


class _ProgressBar:
    """What huggingface_hub drives as its tqdm bar during a transfer, told to a ProgressCallback."""

    def __init__(self, task: str, progress: ProgressCallback, *, total: int | None = None, initial: int = 0, **_):
        self.task, self.progress, self.total, self.n = task, progress, total, initial
        progress(ProgressEvent(task, initial, total))

    def update(self, n: int = 1) -> None:
        self.n += n
        self.progress(ProgressEvent(self.task, self.n, self.total))

    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        return None


def _bar(task: str, progress: ProgressCallback):
    return functools.partial(_ProgressBar, task, progress)


@contextlib.contextmanager
def _hub_errors(what: str) -> Iterator[None]:
    """Whatever huggingface_hub raises, as one line."""
    try:
        yield
    except HellomemeError:
        raise
    except Exception as error:  # HTTP, network, offline and auth errors take different types across its versions
        response = getattr(error, "response", None)
        if response is not None and getattr(response, "status_code", None):
            reason = f"HTTP {response.status_code} {getattr(response, 'reason_phrase', '')}".rstrip()
            if response.status_code in (401, 403):
                reason += " (a private or gated repo needs HF_TOKEN)"
        else:
            reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise HellomemeError(f"{what}: {reason}") from None


class WeightCache:
    def __init__(self, home: Path | None = None, lock: dict[str, Component] | None = None, hub_cache: Path | None = None):
        self.home = home or default_home()
        self.lock = lock if lock is not None else read_lock()
        self.hub_cache = hub_cache or hub_cache_dir()
        self._record_lock = threading.Lock()

    def component(self, name: str) -> Component:
        if name not in self.lock:
            raise HellomemeError(f"unknown component {name!r}; known: {', '.join(self.lock)}")
        return self.lock[name]

    def path(self, name: str) -> Path:
        """The component's folder in HELLOMEME_HOME (imports, tiny weights, non-hub downloads)."""
        return self.home / self.component(name).name

    # -- records ---------------------------------------------------------------

    def _record(self, name: str) -> dict:
        try:
            return json.loads((self.path(name) / RECORD_NAME).read_text())
        except (OSError, ValueError):
            return {"origin": "", "files": {}}

    def _remember(self, name: str, origin: str, hashes: dict[str, str]) -> None:
        with self._record_lock:
            record = self._record(name)
            if origin == "tiny" or record.get("origin") != "tiny":
                record["origin"] = origin
            record["files"].update(hashes)
            write_atomically(self.path(name) / RECORD_NAME, json.dumps(record, indent=1, sort_keys=True))

    def _hub_record(self) -> dict[str, str]:
        try:
            return json.loads((self.home / HUB_RECORD_NAME).read_text())
        except (OSError, ValueError):
            return {}

    def _hub_key(self, component: Component, locked: LockedFile, file: Path) -> str:
        """`repo@commit/path`: the file in the snapshot folder `snapshots/<commit>/<path>` it sits in."""
        remote = component.remote_path(locked)
        return f"{component.repo}@{file.parents[remote.count('/')].name}/{remote}"

    def _remember_hub(self, key: str, sha256: str) -> None:
        with self._record_lock:
            record = self._hub_record()
            record[key] = sha256
            write_atomically(self.home / HUB_RECORD_NAME, json.dumps(record, indent=1, sort_keys=True))

    # -- where the files are ------------------------------------------------

    def locate(self, name: str) -> Location:
        """Found without network: HELLOMEME_HOME when it holds every file of the component (or
        the component is not on the hub), otherwise the Hugging Face cache snapshot of its
        revision (plus subfolder)."""
        component = self.component(name)
        home = {f.path: self.path(name) / f.path for f in component.files if (self.path(name) / f.path).is_file()}
        if not component.repo or len(home) == len(component.files):
            return Location("home", self.path(name), home)
        hub, folder = {}, None
        for locked in component.files:
            found = try_to_load_from_cache(
                component.repo, component.remote_path(locked), cache_dir=self.hub_cache, revision=component.revision
            )
            if isinstance(found, str):
                hub[locked.path] = Path(found)
                folder = Path(found).parents[locked.path.count("/")]
        if home and not hub:
            return Location("home", self.path(name), home)
        return Location("hub", folder, hub)

    def expected_sha256(self, name: str, locked: LockedFile, location: Location) -> str:
        """The lock's hash, else the one recorded when the file was fetched or imported; tiny
        test weights, which the lock does not describe, only by their record."""
        if location.where == "hub":
            file = location.files[locked.path]
            return locked.sha256 or self._hub_record().get(self._hub_key(self.component(name), locked, file), "")
        record = self._record(name)
        if record.get("origin") == "tiny" or not locked.sha256:
            return record["files"].get(locked.path, "")
        return locked.sha256

    def states(self, names: Iterable[str] | None = None, rehash: bool = False) -> list[FileState]:
        """Each locked file's state; `rehash` checks contents, otherwise presence and size only."""
        return [state for name in names or self.lock for state in self._states(name, self.locate(name), rehash)]

    def _states(self, name: str, location: Location, rehash: bool) -> list[FileState]:
        tiny = location.where == "home" and self._record(name).get("origin") == "tiny"
        result = []
        for locked in self.component(name).files:
            file = location.files.get(locked.path)
            if file is None:
                result.append(FileState(name, locked.path, "missing"))
                continue
            place = {"location": file, "where": location.where}
            expected = self.expected_sha256(name, locked, location)
            if not rehash:
                size_ok = not locked.size or tiny or file.stat().st_size == locked.size
                state = FileState(name, locked.path, "ok" if size_ok else "corrupt", "" if size_ok else "wrong size", **place)
            elif not expected:
                state = FileState(name, locked.path, "unverified", "no sha256 known", **place)
            else:
                actual = sha256_of(file)
                ok = actual == expected
                detail = "" if ok else f"sha256 {actual[:12]}... != {expected[:12]}..."
                state = FileState(name, locked.path, "ok" if ok else "corrupt", detail, **place)
            result.append(state)
        return result

    def verify(self, names: Iterable[str] | None = None) -> tuple[list[FileState], list[str]]:
        """Re-hash files: those of `names`, where a missing file is as bad as a corrupt one; without
        names, those of every component with a file here, and the components with none are
        returned apart (never fetched is not an error: a user fetches what their runs need)."""
        if names is not None:
            return self.states(names, rehash=True), []
        located = {name: self.locate(name) for name in self.lock}
        not_fetched = [name for name, location in located.items() if not location.files]
        states = [state for name, location in located.items() if location.files for state in self._states(name, location, True)]
        return states, not_fetched

    def require(self, names: Sequence[str]) -> dict[str, Path]:
        """The folder holding each component's files; stops before any work when a file is missing."""
        folders: dict[str, Path] = {}
        missing: dict[str, int] = {}
        for name in names:
            location = self.locate(name)
            bad = sum(s.state in ("missing", "corrupt") for s in self._states(name, location, rehash=False))
            if bad:
                missing[name] = bad
            elif location.folder is not None:
                folders[name] = location.folder
        if missing:
            listed = ", ".join(f"{name} ({count} file{'s' * (count > 1)})" for name, count in missing.items())
            raise HellomemeError(
                f"missing weights in {self.home} and the Hugging Face cache {self.hub_cache}: {listed}; "
                f"run `hellomeme weights fetch {' '.join(missing)}`, "
                "or on an offline machine copy them over and run `hellomeme weights import DIR`"
            )
        return folders

    # -- fetch ---------------------------------------------------------------

    def fetch(self, names: Sequence[str] | None = None, progress: ProgressCallback = no_progress) -> list[FileState]:
        """Download what is missing, a few files at a time, and check every file new to this
        cache (downloaded now, or found in the Hugging Face cache) against its hash; a file
        already checked costs no request."""
        names = list(names or self.lock)
        todo = []
        record = self._hub_record()
        for name in names:
            component, location = self.component(name), self.locate(name)
            for state in self._states(name, location, rehash=False):
                locked = next(f for f in component.files if f.path == state.path)
                unchecked = state.where == "hub" and self._hub_key(component, locked, state.location) not in record
                if state.state != "ok" or unchecked:
                    todo.append((component, locked))
        with hub_logs_quiet(), concurrent.futures.ThreadPoolExecutor(DOWNLOAD_WORKERS) as pool:
            jobs = [
                pool.submit(self._fetch_hub_file if c.repo else self._fetch_url_file, c, f, progress) for c, f in todo
            ]
            errors = [str(job.exception()) for job in jobs if job.exception()]
        if errors:
            raise HellomemeError(errors[0] if len(errors) == 1 else f"{errors[0]} (and {len(errors) - 1} more failures)")
        return self.states(names)

    def _fetch_hub_file(self, component: Component, locked: LockedFile, progress: ProgressCallback) -> None:
        task, offline, endpoint = f"{component.name}/{locked.path}", hub_offline(), hub_endpoint()
        expected = locked.sha256
        with _hub_errors(f"cannot download {task} from {component.source}"):
            if not expected and not offline:
                url = hf_hub_url(component.repo, component.remote_path(locked), revision=component.revision, endpoint=endpoint)
                expected = get_hf_file_metadata(url, endpoint=endpoint).etag or ""
            cached = try_to_load_from_cache(
                component.repo, component.remote_path(locked), cache_dir=self.hub_cache, revision=component.revision
            )
            if offline and not isinstance(cached, str):
                raise HellomemeError(f"{task} is not in the Hugging Face cache {self.hub_cache} and HF_HUB_OFFLINE is set")
            file = Path(
                hf_hub_download(
                    component.repo,
                    locked.path,
                    subfolder=component.subfolder or None,
                    revision=component.revision,
                    cache_dir=self.hub_cache,
                    endpoint=endpoint,
                    local_files_only=offline,
                    tqdm_class=_bar(task, progress),
                )
            )
        if not expected:
            return  # offline, and the lock has no hash: the next online fetch checks it
        sha256 = _matching_sha256(file, expected)
        if sha256 is None:
            blob = file.resolve()
            file.unlink()
            blob.unlink(missing_ok=True)
            against = "the sha256 in the lock" if locked.sha256 else "the hub's LFS sha256" if _SHA256.fullmatch(expected) else "the hub's git hash"
            raise HellomemeError(
                f"{file}: {task} does not match {against} ({expected[:12]}...); removed it from the "
                f"Hugging Face cache, run `hellomeme weights fetch {component.name}` to download it again"
            )
        self._remember_hub(self._hub_key(component, locked, file), sha256)

    def _fetch_url_file(self, component: Component, locked: LockedFile, progress: ProgressCallback) -> None:
        task, target = f"{component.name}/{locked.path}", self.path(component.name) / locked.path
        if hub_offline():
            raise HellomemeError(f"{task} is not in {self.home} and HF_HUB_OFFLINE is set")
        partial = _download_url(component.url, target, task, progress)
        digest = sha256_of(partial)
        if locked.sha256 and digest != locked.sha256:
            partial.unlink()
            raise HellomemeError(f"download of {task} from {component.url}: sha256 {digest[:12]}... does not match the lock")
        os.replace(partial, target)
        self._remember(component.name, "download", {locked.path: digest})

    # -- import --------------------------------------------------------------

    def import_path(self, source: Path, progress: ProgressCallback = no_progress) -> list[FileState]:
        """Add files obtained elsewhere into HELLOMEME_HOME. A file is taken where its sha256
        matches a locked file, or, for files whose hash the lock does not know yet, where its
        path ends in `<component>/<path>` (a copy of another machine's HELLOMEME_HOME)."""
        if not source.exists():
            raise HellomemeError(f"{source}: no such file or folder")
        candidates = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file() and p.name != RECORD_NAME)
        by_hash = {f.sha256: (c, f) for c in self.lock.values() for f in c.files if f.sha256}
        by_tail = {f"{c.name}/{f.path}": (c, f) for c in self.lock.values() for f in c.files}
        imported = []
        for candidate in candidates:
            digest = sha256_of(candidate)
            tail = candidate.relative_to(source.parent if source.is_file() else source).as_posix()
            match = by_hash.get(digest) or next((m for t, m in by_tail.items() if tail.endswith(t)), None)
            if match is None:
                continue
            component, locked = match
            if locked.sha256 and digest != locked.sha256:
                raise HellomemeError(f"{candidate}: sha256 does not match {component.name}/{locked.path} in the lock")
            target = self.path(component.name) / locked.path
            _atomic_copy(candidate, target)
            self._remember(component.name, "import", {locked.path: digest})
            imported.append(FileState(component.name, locked.path, "ok", location=target, where="home"))
            progress(ProgressEvent(f"import {component.name}/{locked.path}", 1, 1, unit="file"))
        if not imported:
            raise HellomemeError(f"{source}: no file matches a component of the weight lock")
        return imported

    def mark_tiny(self, name: str) -> None:
        """Record every file of a component written by `make_tiny` with its hash."""
        folder = self.path(name)
        hashes = {f.path: sha256_of(folder / f.path) for f in self.component(name).files if (folder / f.path).is_file()}
        self._remember(name, "tiny", hashes)


def _download_url(url: str, target: Path, task: str, progress: ProgressCallback) -> Path:
    """`url` into a hidden file beside `target`, returned (http_get retries and resumes a cut transfer itself)."""
    created = [folder for folder in (target.parent, *target.parent.parents) if not folder.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.download")
    try:
        with _hub_errors(f"cannot download {task} from {url}"), partial.open("wb") as out:
            http_get(url, out, displayed_filename=task, tqdm_class=_bar(task, progress))
    except BaseException:
        partial.unlink(missing_ok=True)
        for folder in created:  # deepest first; a failed download leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return partial


def _atomic_copy(source: Path, target: Path) -> None:
    try:
        with atomic_output(target) as temporary:
            shutil.copyfile(source, temporary)
    except OSError as error:
        raise HellomemeError(f"cannot copy {source} to {target}: {error.strerror}") from None


def resolve_lock(components: dict[str, Component], progress: ProgressCallback = no_progress) -> dict[str, Component]:
    """Pin every hub revision to its commit id and record each file's sha256 and size: the
    hub's LFS sha256 where it has one, otherwise by downloading the file (to a scratch folder)."""
    endpoint = hub_endpoint()
    resolved = {}
    with tempfile.TemporaryDirectory() as scratch:
        for component in components.values():
            revision, files = component.revision, []
            for locked in component.files:
                task = f"{component.name}/{locked.path}"
                if component.url:
                    file = _download_url(component.url, Path(scratch) / task, task, progress)
                    files.append(LockedFile(locked.path, sha256_of(file), file.stat().st_size))
                    continue
                with _hub_errors(f"cannot read {task} from {component.source}"):
                    url = hf_hub_url(component.repo, component.remote_path(locked), revision=revision, endpoint=endpoint)
                    metadata = get_hf_file_metadata(url, endpoint=endpoint)
                    revision = metadata.commit_hash or revision  # every file from the same commit
                    if metadata.etag and _SHA256.fullmatch(metadata.etag):
                        files.append(LockedFile(locked.path, metadata.etag, metadata.size or 0))
                        continue
                    file = Path(
                        hf_hub_download(
                            component.repo,
                            locked.path,
                            subfolder=component.subfolder or None,
                            revision=revision,
                            cache_dir=scratch,
                            endpoint=endpoint,
                            tqdm_class=_bar(task, progress),
                        )
                    )
                files.append(LockedFile(locked.path, sha256_of(file), file.stat().st_size))
            resolved[component.name] = dataclasses.replace(component, revision=revision, files=tuple(files))
    return resolved
