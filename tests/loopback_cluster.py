"""A real Ray cluster for the tests, made of `ray start` nodes on this machine, reachable on 127.0.0.1
only: its processes, and every command the tests run against it, are in one network namespace that
holds nothing but the loopback interface (util-linux's `unshare` and `nsenter`), and each node has a
hostname of its own (a UTS namespace), as machines of a cluster do. Each node is a process group,
stopped by killing that group: never `ray stop`, which stops every Ray on the machine.

The cluster follows docs/batch.md: the head node makes the token, the other nodes and the driver
get a copy of it in their own home folder and run in token mode."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
PORT = 6379  # the namespace is the cluster's own: Ray's default port is free there
START_SECONDS = 180  # a node's `ray start` on a busy 2-core machine

# Brings the namespace's loopback interface up (SIOCGIFFLAGS, SIOCSIFFLAGS | IFF_UP), with no iproute2 needed.
_LOOPBACK_UP = (
    "import fcntl, socket, struct\n"
    "with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:\n"
    "    flags = struct.unpack('16sh', fcntl.ioctl(s, 0x8913, struct.pack('16sh', b'lo', 0)))[1]\n"
    "    fcntl.ioctl(s, 0x8914, struct.pack('16sh', b'lo', flags | 1))\n"
)


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def unavailable() -> str | None:
    """Why a loopback cluster cannot be made here, or None."""
    if not sys.platform.startswith("linux"):
        return "a loopback-only Ray cluster needs Linux network namespaces"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a network namespace here (unshare: {probe.stderr.strip()}; root or user namespaces needed)"
    return None


class LoopbackCluster:
    """Nodes started with `start(name, head=..., **resources)`, commands run with `run`/`popen`
    inside the namespace, each as a home folder says (`home`: the token there, or none)."""

    def __init__(self, environment: dict[str, str]):
        self.folder = Path(tempfile.mkdtemp(prefix="hmray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
        # RAY_TMPDIR: the cluster's files, and the pointer file `ray start` leaves, here rather than in /tmp/ray.
        # The token travels as docs/batch.md says, in home folders: none of this process's Ray settings go along.
        own = {name: value for name, value in environment.items() if not name.startswith("RAY_AUTH_")}
        self.environment = {**own, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(self.folder)}
        self.nodes: dict[str, int] = {}  # name: process group
        self.anchor = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"])
        self.namespace = f"/proc/{self.anchor.pid}/ns/net"
        deadline = time.monotonic() + 10
        while os.readlink(self.namespace) == os.readlink("/proc/self/ns/net") and time.monotonic() < deadline:
            time.sleep(0.01)
        self.run([sys.executable, "-c", _LOOPBACK_UP], home=None).check_returncode()
        self.address = f"127.0.0.1:{PORT}"

    def home(self, name: str, token: bool) -> Path:
        """A home folder; with `token`, the head node's `~/.ray/auth_token` copied into it."""
        home = self.folder / f"home-{name}"
        (home / ".ray").mkdir(parents=True, exist_ok=True)
        if token:
            shutil.copyfile(self.folder / "home-head" / ".ray" / "auth_token", home / ".ray" / "auth_token")
        return home

    def _command(self, argv: list[str], hostname: str | None = None) -> list[str]:
        own_host = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname] if hostname else []
        return ["nsenter", f"--net={self.namespace}", *own_host, *argv]

    def _environment(self, home: Path | None, extra: dict[str, str]) -> dict[str, str]:
        environment = {**self.environment, **extra}
        if home is not None:
            environment["HOME"] = str(home)
        return environment

    def run(self, argv: list[str], *, home: Path | None, timeout: float = 900, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(self._command(argv), capture_output=True, text=True, timeout=timeout, env=self._environment(home, extra))

    def popen(self, argv: list[str], *, home: Path | None, **extra: str) -> subprocess.Popen:
        return subprocess.Popen(self._command(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self._environment(home, extra))

    def start(self, name: str, *, head: bool = False, cpus: int = 1, gpus: int = 0) -> None:
        """`ray start` a node named `name` (its hostname); the head makes the cluster's token first."""
        if head:
            home = self.folder / "home-head"
            (home / ".ray").mkdir(parents=True, exist_ok=True)
            self.run([RAY, "get-auth-token", "--generate"], home=home).check_returncode()
            where = ["--head", "--port", str(PORT), "--include-dashboard=false"]
        else:
            home, where = self.home(name, token=True), ["--address", self.address]
        argv = [RAY, "start", *where, "--num-cpus", str(cpus), "--num-gpus", str(gpus)]
        log = (self.folder / f"{name}.log").open("w")
        node = subprocess.Popen(
            self._command(argv, hostname=name), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=self._environment(home, {"RAY_AUTH_MODE": "token"}),
        )
        self.nodes[name] = node.pid  # its processes stay in this group once `ray start` has returned
        if node.wait(timeout=START_SECONDS) != 0:
            raise RuntimeError(f"ray start {name} failed: {(self.folder / f'{name}.log').read_text()[-2000:]}")

    def processes(self, name: str) -> set[int]:
        """Every process of the node: its `ray start` group and what they started (Ray's workers each
        begin a session of their own, so a group kill would miss them)."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError):
                    parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        group = self.nodes[name]
        found = {pid for pid in parents if _group(pid) == group}
        while grown := {pid for pid, parent in parents.items() if parent in found and pid not in found}:
            found |= grown
        return found

    def alive(self, name: str) -> bool:
        return bool(self.processes(name))

    def kill(self, name: str) -> None:
        """The node gone at once, as a machine that loses power: SIGKILL to every process of it."""
        deadline = time.monotonic() + 30
        while (left := self.processes(name)) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        del self.nodes[name]

    def close(self) -> None:
        for name in list(self.nodes):
            self.kill(name)
        self.anchor.kill()
        self.anchor.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
