"""The weight cache: what `weights.lock` pins, where it lives, and getting it there.

Layout: `$HELLOMEME_HOME/<component>/<path>` for every file the lock lists, plus
`<component>/.hellomeme.json` recording where the files came from and their
sha256, so `verify` can tell a corrupt file from a good one even where the lock
has no hash yet (and for tiny test weights, which the lock does not describe).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import HellomemeError
from .progress import ProgressCallback, ProgressEvent, no_progress

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOCK_PATH = Path(__file__).with_name("weights.lock")
RECORD_NAME = ".hellomeme.json"
CHUNK = 1 << 20
DOWNLOAD_WORKERS = 4


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
    needed_for: tuple[str, ...]
    repo: str = ""
    revision: str = ""
    subfolder: str = ""
    url: str = ""

    def source_url(self, locked: LockedFile, endpoint: str) -> str:
        if self.url:
            return self.url
        prefix = f"{self.subfolder}/" if self.subfolder else ""
        return f"{endpoint.rstrip('/')}/{self.repo}/resolve/{self.revision}/{prefix}{locked.path}"

    @property
    def source(self) -> str:
        return self.url or f"huggingface {self.repo}@{self.revision}" + (f"/{self.subfolder}" if self.subfolder else "")


def read_lock(path: Path = LOCK_PATH) -> dict[str, Component]:
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


def write_lock(components: dict[str, Component], path: Path = LOCK_PATH) -> None:
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
        lines.append(f"needed_for = {json.dumps(list(component.needed_for))}")
        lines.append("files = [")
        for f in component.files:
            lines.append(f"  {{ path = {json.dumps(f.path)}, sha256 = {json.dumps(f.sha256)}, size = {f.size} }},")
        lines.append("]")
    _atomic_write_text(path, "\n".join(lines) + "\n")


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


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class FileState:
    component: str
    path: str
    state: str  # "ok", "unverified" (no hash to check against), "missing", "corrupt"
    detail: str = ""


class WeightCache:
    def __init__(self, home: Path | None = None, lock: dict[str, Component] | None = None):
        self.home = home or default_home()
        self.lock = lock if lock is not None else read_lock()

    def component(self, name: str) -> Component:
        if name not in self.lock:
            raise HellomemeError(f"unknown component {name!r}; known: {', '.join(self.lock)}")
        return self.lock[name]

    def path(self, name: str) -> Path:
        return self.home / self.component(name).name

    def _record(self, name: str) -> dict:
        try:
            return json.loads((self.path(name) / RECORD_NAME).read_text())
        except (OSError, ValueError):
            return {"origin": "", "files": {}}

    def _remember(self, name: str, origin: str, hashes: dict[str, str]) -> None:
        record = self._record(name)
        if origin == "tiny" or record.get("origin") != "tiny":
            record["origin"] = origin
        record["files"].update(hashes)
        _atomic_write_text(self.path(name) / RECORD_NAME, json.dumps(record, indent=1, sort_keys=True))

    def expected_sha256(self, name: str, locked: LockedFile) -> str:
        """The lock's hash, except for tiny test weights, which only their record describes."""
        record = self._record(name)
        if record.get("origin") == "tiny" or not locked.sha256:
            return record["files"].get(locked.path, "")
        return locked.sha256

    def states(self, names: Iterable[str] | None = None, rehash: bool = False) -> list[FileState]:
        """Each locked file's state; `rehash` checks contents, otherwise presence and size only."""
        result = []
        for name in names or self.lock:
            for locked in self.component(name).files:
                target = self.path(name) / locked.path
                expected = self.expected_sha256(name, locked)
                if not target.is_file():
                    state = FileState(name, locked.path, "missing")
                elif not rehash:
                    size_ok = not locked.size or self._record(name).get("origin") == "tiny" or target.stat().st_size == locked.size
                    state = FileState(name, locked.path, "ok" if size_ok else "corrupt", "" if size_ok else "wrong size")
                elif not expected:
                    state = FileState(name, locked.path, "unverified", "no sha256 known")
                else:
                    actual = sha256_of(target)
                    ok = actual == expected
                    state = FileState(name, locked.path, "ok" if ok else "corrupt", "" if ok else f"sha256 {actual[:12]}... != {expected[:12]}...")
                result.append(state)
        return result

    def require(self, names: Sequence[str]) -> dict[str, Path]:
        """The folders of these components; stops before any work when a file is missing."""
        missing: dict[str, int] = {}
        for state in self.states(names):
            if state.state in ("missing", "corrupt"):
                missing[state.component] = missing.get(state.component, 0) + 1
        if missing:
            listed = ", ".join(f"{name} ({count} file{'s' * (count > 1)})" for name, count in missing.items())
            raise HellomemeError(
                f"missing weights in {self.home}: {listed}; run `hellomeme weights fetch {' '.join(missing)}`, "
                "or on an offline machine copy them over and run `hellomeme weights import DIR`"
            )
        return {name: self.path(name) for name in names}

    # -- fetch ---------------------------------------------------------------

    def fetch(
        self, names: Sequence[str] | None = None, progress: ProgressCallback = no_progress, endpoint: str | None = None
    ) -> list[FileState]:
        """Download what is missing or wrong, in parallel, resuming partial files; every
        file is checked against its sha256 before it is moved into place."""
        endpoint = endpoint or hub_endpoint()
        todo = [
            (self.component(s.component), s.path)
            for s in self.states(names or list(self.lock), rehash=False)
            if s.state != "ok"
        ]
        with concurrent.futures.ThreadPoolExecutor(DOWNLOAD_WORKERS) as pool:
            jobs = [pool.submit(self._fetch_one, c, p, endpoint, progress) for c, p in todo]
            errors = [str(job.exception()) for job in jobs if job.exception()]
        if errors:
            raise HellomemeError(errors[0] if len(errors) == 1 else f"{errors[0]} (and {len(errors) - 1} more failures)")
        return self.states(names or list(self.lock), rehash=False)

    def _fetch_one(self, component: Component, path: str, endpoint: str, progress: ProgressCallback) -> None:
        locked = next(f for f in component.files if f.path == path)
        target = self.path(component.name) / path
        url = component.source_url(locked, endpoint)
        partial = target.with_name(target.name + ".part")
        target.parent.mkdir(parents=True, exist_ok=True)
        task = f"{component.name}/{path}"
        for attempt in range(2):
            digest = _download(url, partial, locked.size or None, task, progress)
            if locked.sha256 and digest != locked.sha256:
                partial.unlink(missing_ok=True)
                if attempt == 0:
                    continue  # a corrupt resume or transfer: one clean retry
                raise HellomemeError(f"download of {task} from {url}: sha256 {digest} does not match the lock")
            break
        os.replace(partial, target)
        self._remember(component.name, "download", {path: digest})

    # -- import --------------------------------------------------------------

    def import_path(self, source: Path, progress: ProgressCallback = no_progress) -> list[FileState]:
        """Add files obtained elsewhere. A file is taken where its sha256 matches a locked
        file, or, for files whose hash the lock does not know yet, where its path ends in
        `<component>/<path>` (a copy of another machine's cache)."""
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
            imported.append(FileState(component.name, locked.path, "ok"))
            progress(ProgressEvent(f"import {component.name}/{locked.path}", 1, 1, unit="file"))
        if not imported:
            raise HellomemeError(f"{source}: no file matches a component of the weight lock")
        return imported

    def mark_tiny(self, name: str) -> None:
        """Record every file of a component written by `make_tiny` with its hash."""
        folder = self.path(name)
        hashes = {f.path: sha256_of(folder / f.path) for f in self.component(name).files if (folder / f.path).is_file()}
        self._remember(name, "tiny", hashes)


def _download(url: str, partial: Path, size: int | None, task: str, progress: ProgressCallback) -> str:
    """Append to `partial` from where it stops (HTTP Range) and return the whole file's sha256."""
    digest = hashlib.sha256()
    have = partial.stat().st_size if partial.exists() else 0
    if size is not None and have > size:
        partial.unlink()
        have = 0
    if have:
        with partial.open("rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if have and response.status != 206:  # the server ignored the range: start over
                digest, have = hashlib.sha256(), 0
            total = size or (have + int(response.headers.get("Content-Length", 0)) or None)
            progress(ProgressEvent(task, have, total))
            with partial.open("ab" if have else "wb") as out:
                while block := response.read(CHUNK):
                    out.write(block)
                    digest.update(block)
                    have += len(block)
                    progress(ProgressEvent(task, have, total))
        if total is not None and have < total:
            raise HellomemeError(
                f"download of {task} from {url} stopped at {have} of {total} bytes; run the command again to resume"
            )
    except urllib.error.HTTPError as error:
        if error.code == 416 and size is not None and have == size:  # already complete
            return digest.hexdigest()
        raise HellomemeError(f"download of {task} from {url} failed: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(error, OSError) and error.errno == 28:
            raise HellomemeError(f"no space left on the device for {partial.parent}") from None
        raise HellomemeError(f"download of {task} from {url} failed: {reason}") from None
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def _atomic_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.import")
    try:
        shutil.copyfile(source, tmp)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise HellomemeError(f"cannot copy {source} to {target}: {error.strerror}") from None
    os.replace(tmp, target)


def resolve_lock(
    components: dict[str, Component], endpoint: str | None = None, progress: ProgressCallback = no_progress
) -> dict[str, Component]:
    """Pin every Hugging Face revision to its commit id and record each file's sha256 and
    size: from the hub's LFS metadata where it has them, otherwise by downloading the file."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = endpoint or hub_endpoint()
    api = HfApi(endpoint=endpoint)
    resolved = {}
    with tempfile.TemporaryDirectory() as scratch:
        for component in components.values():
            siblings, revision = {}, component.revision
            if component.repo:
                try:
                    info = api.model_info(component.repo, revision=component.revision, files_metadata=True)
                except (HfHubHTTPError, OSError) as error:
                    raise HellomemeError(f"cannot read {component.source}: {error}") from None
                siblings, revision = {s.rfilename: s for s in info.siblings or []}, info.sha
            files = []
            for locked in component.files:
                remote = f"{component.subfolder}/{locked.path}" if component.subfolder else locked.path
                sibling = siblings.get(remote)
                if component.repo and sibling is None:
                    raise HellomemeError(f"{component.source} has no file {remote}")
                if sibling is not None and sibling.lfs is not None:
                    files.append(LockedFile(locked.path, sibling.lfs.sha256, sibling.size or sibling.lfs.size))
                    continue
                partial = Path(scratch) / f"{component.name}.{len(files)}"
                url = dataclasses.replace(component, revision=revision).source_url(locked, endpoint)
                digest = _download(url, partial, None, f"{component.name}/{locked.path}", progress)
                files.append(LockedFile(locked.path, digest, partial.stat().st_size))
            resolved[component.name] = dataclasses.replace(component, revision=revision, files=tuple(files))
    return resolved
