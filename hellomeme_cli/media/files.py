"""Writing files atomically: every output appears under its final name only once complete.

One scheme for the whole tool: a hidden temporary name beside the destination (so the final
rename stays on one filesystem and is atomic), removed again on any failure; a full disk, a
read-only folder or a denied permission is the one-line error it is to a user. Whether a folder
takes a new file is tried before a run starts (`check_writable`), not found after the work.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

from hellomeme_cli.errors import HellomemeError


def temporary_beside(path: Path) -> Path:
    """A fresh hidden name in the destination's folder; the file is created by whoever writes it,
    with the user's usual permissions."""
    return path.with_name(f".{path.stem}.{secrets.token_hex(6)}.partial{path.suffix}")


def leftover_temporaries(path: Path) -> list[Path]:
    """Temporary files that writes of `path` left behind in a process that was killed (SIGKILL,
    power loss), as `temporary_beside` names them."""
    pattern = re.compile(rf"\.{re.escape(path.stem)}\.[0-9a-f]{{12}}\.partial{re.escape(path.suffix)}")
    if not path.parent.is_dir():
        return []
    return sorted(entry for entry in path.parent.iterdir() if pattern.fullmatch(entry.name))


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it becomes `path`, on any failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_beside(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and _names_destination(error, path, temporary):
            raise HellomemeError(f"{path}: cannot write ({os_cause(error)})") from None
        raise


_CAUSES = {
    errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
    errno.ENOSPC: "disk full, no space left on device", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large",
}


def _names_destination(error: OSError, path: Path, temporary: Path) -> bool:
    """The error is about writing `path` (it names the file, its temporary or its folder, or it is a
    writing error naming no file), not about some input read while writing."""
    named = getattr(error, "filename", None)
    return error.errno in _CAUSES if named is None else Path(named) in (path, temporary, path.parent)


def os_cause(error: OSError) -> str:
    """What went wrong, in the words a user knows (read-only, permission denied, disk full)."""
    return _CAUSES.get(error.errno) or (error.strerror or type(error).__name__).lower()


def write_atomically(path: Path, data: bytes | str) -> Path:
    """`path` holding `data` (text as UTF-8), never a half-written file."""
    with atomic_output(path) as temporary:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def require_file(path: Path) -> None:
    """An input file that exists and can be read, else one line naming it."""
    if not path.exists():
        raise HellomemeError(f"{path}: no such file")
    if path.is_dir():
        raise HellomemeError(f"{path}: is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise HellomemeError(f"{path}: cannot read (permission denied)")


def check_writable(folder: Path) -> None:
    """`folder` (or, where it is still to be made, the nearest folder above it that exists) takes a
    new file, else one line naming it and why. Creating and removing a probe file is the only sure
    test: permission bits say nothing for root or on a read-only mount."""
    folder = Path(folder)
    existing = next((parent for parent in (folder, *folder.parents) if parent.is_dir()), None)
    if existing is None:
        raise HellomemeError(f"{folder}: no such folder")
    try:
        probe = existing / f".hellomeme-write-test.{secrets.token_hex(6)}"
        probe.open("xb").close()
        probe.unlink()
    except OSError as error:
        raise HellomemeError(f"{existing}: cannot write files there ({os_cause(error)})") from None


def check_destination(path: Path, force: bool, protect: Iterable[Path]) -> None:
    """Refuse an output path that is an input, a folder, in a missing or unwritable folder, or taken
    (unless forced)."""
    for protected in protect:
        if _same_path(path, Path(protected)):
            raise HellomemeError(f"{path}: refusing to write over an input file")
    if not path.parent.is_dir():
        raise HellomemeError(f"{path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise HellomemeError(f"{path}: is a folder")
    if path.exists() and not force:
        raise HellomemeError(f"{path}: already exists (use --force to overwrite it)")
    check_writable(path.parent)


def _same_path(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()
