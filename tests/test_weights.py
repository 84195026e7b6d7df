"""The weight cache against a fake Hugging Face hub on 127.0.0.1: fetch into a temporary HF
cache, checks against the lock and the hub's hashes, offline use, import, list, verify,
make-tiny, and `animate` end to end from weights that came through the fake hub."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from typer.testing import CliRunner

from conftest import MEDIA, SHARED, require
from hellomeme_cli.weights import cache as weights
from hellomeme_cli.cli import app
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.weights.cache import Component, LockedFile, WeightCache, read_lock, resolve_lock, write_lock

COMMIT = "c0ffee00" * 5
LFS_SUFFIXES = (".safetensors", ".bin", ".task")
WEIGHTS = bytes(range(256)) * 64
FACE = b"a face model"
FILES = {
    "org/thing/a.safetensors": WEIGHTS,
    "org/thing/sub/config.json": b'{"hello": 1}',
    "org/deep/models/enc/config.json": b"{}",
    "org/deep/models/enc/model.safetensors": WEIGHTS[::-1],
    "plain/face.task": FACE,
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeHub(http.server.ThreadingHTTPServer):
    """Answers like the hub at /{repo}/resolve/{revision}/{path}: HEAD and GET, X-Repo-Commit, ETag
    (git's blob sha1), for LFS files X-Linked-Etag (the sha256) and X-Linked-Size, HTTP Range, and a
    404 with the hub's X-Error-Code. Any other path is a plain file. Files named in `corrupt` are
    served spoilt, with their true headers."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.files = files
        self.requests: list[tuple[str, str]] = []
        self.corrupt: set[str] = set()
        self.authorizations: set[str | None] = set()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self) -> list[str]:
        return [path for method, path in self.requests if method == "GET"]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _HubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(with_body=False)

    def do_GET(self):
        self._answer(with_body=True)

    def _answer(self, with_body: bool) -> None:
        hub: FakeHub = self.server
        hub.requests.append((self.command, self.path))
        hub.authorizations.add(self.headers.get("Authorization") if "/resolve/" in self.path else "")
        path = urllib.parse.unquote(self.path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        key = (f"{resolve[1]}/{resolve[3]}" if resolve[2] in ("main", COMMIT) else "") if resolve else path[1:]
        if key not in hub.files:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        content = hub.files[key]
        self.send_response(206 if self.headers.get("Range") else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{hashlib.sha1(b"blob %d" % len(content) + bytes(1) + content).hexdigest()}"')
        if key.endswith(LFS_SUFFIXES):
            self.send_header("X-Linked-Etag", f'"{_sha256(content)}"')
            self.send_header("X-Linked-Size", str(len(content)))
        if key in hub.corrupt:
            content = bytes(b ^ 0xFF for b in content)
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        self.send_header("Content-Length", str(len(content) - start))
        self.end_headers()
        if with_body:
            self.wfile.write(content[start:])


def serve_hub(files: dict[str, bytes], tmp_path: Path, monkeypatch) -> FakeHub:
    """A fake hub serving `files`, with HF_ENDPOINT at it, and HF_HUB_CACHE and HELLOMEME_HOME in tmp_path."""
    server = FakeHub(files)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HELLOMEME_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return server


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = serve_hub(dict(FILES), tmp_path, monkeypatch)
    yield server
    server.stop()


def _lock(hub: FakeHub, extra: tuple[str, ...] = (), sha256: dict[str, str] | None = None) -> dict[str, Component]:
    sha256 = sha256 or {}

    def files(*paths):
        return tuple(LockedFile(p, sha256.get(p, "")) for p in paths)

    common = {"description": "test component", "licence": "MIT", "needed_for": ("tests",)}
    return {
        "thing": Component("thing", files=files("a.safetensors", "sub/config.json", *extra), repo="org/thing", revision="main", **common),
        "deep": Component(
            "deep", files=files("config.json", "model.safetensors"), repo="org/deep", revision="main", subfolder="models/enc", **common
        ),
        "face": Component("face", files=(LockedFile("face.task", _sha256(FACE)),), url=f"{hub.endpoint}/plain/face.task", **common),
    }


def _snapshot(tmp_path: Path, repo: str) -> Path:
    return tmp_path / "hf" / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT


def test_fetch_lands_files_in_the_hf_cache_and_require_returns_their_folders(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    cache = WeightCache(lock=_lock(hub))
    events = []
    cache.fetch(progress=events.append)
    folders = cache.require(["thing", "deep", "face"])
    assert folders == {
        "thing": _snapshot(tmp_path, "org/thing"),
        "deep": _snapshot(tmp_path, "org/deep") / "models" / "enc",
        "face": tmp_path / "home" / "face",
    }
    assert (folders["thing"] / "a.safetensors").read_bytes() == WEIGHTS
    assert (folders["thing"] / "sub" / "config.json").read_bytes() == FILES["org/thing/sub/config.json"]
    assert (folders["deep"] / "model.safetensors").read_bytes() == WEIGHTS[::-1]
    assert (folders["face"] / "face.task").read_bytes() == FACE
    assert not (tmp_path / "home" / "thing").exists()
    assert sorted(hub.gets()) == sorted(
        ["/org/thing/resolve/main/a.safetensors", "/org/thing/resolve/main/sub/config.json", "/plain/face.task"]
        + ["/org/deep/resolve/main/models/enc/config.json", "/org/deep/resolve/main/models/enc/model.safetensors"]
    )
    assert hub.authorizations == {"Bearer hf_secret", ""}  # HF_TOKEN goes to the hub, not to the plain URL
    finished = {e.task for e in events if e.total and e.completed == e.total}
    assert {"thing/a.safetensors", "deep/model.safetensors", "face/face.task"} <= finished
    # Every hash was checked and recorded, so verify re-checks each file against it.
    assert [s.state for s in cache.states(rehash=True)] == ["ok"] * 5

    hub.requests.clear()
    WeightCache(lock=_lock(hub)).fetch()
    assert hub.requests == []  # everything there and checked: not one request


def test_the_hf_cache_is_where_hf_hub_cache_or_hf_home_say_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    assert WeightCache(tmp_path).hub_cache == tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert WeightCache(tmp_path).hub_cache == tmp_path / "elsewhere"


def test_repos_already_in_the_hf_cache_are_checked_not_downloaded(hub, tmp_path):
    for path in ("a.safetensors", "sub/config.json"):  # as another program would have left them
        hf_hub_download("org/thing", path, cache_dir=tmp_path / "hf", endpoint=hub.endpoint)
    hub.requests.clear()
    cache = WeightCache(lock=_lock(hub))
    assert [s.state for s in cache.states(["thing"], rehash=True)] == ["unverified"] * 2
    cache.fetch(["thing"])
    assert hub.gets() == []
    assert [s.state for s in cache.states(["thing"], rehash=True)] == ["ok"] * 2
    assert cache.require(["thing"]) == {"thing": _snapshot(tmp_path, "org/thing")}


def test_offline_with_the_server_stopped_require_verify_and_fetch_use_the_cache(hub, tmp_path, monkeypatch):
    WeightCache(lock=_lock(hub)).fetch(["thing", "deep"])
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = WeightCache(lock=_lock(hub))
    assert cache.require(["thing", "deep"])["deep"] == _snapshot(tmp_path, "org/deep") / "models" / "enc"
    assert [s.state for s in cache.states(["thing", "deep"], rehash=True)] == ["ok"] * 4
    cache.fetch(["thing", "deep"])  # nothing to do, and no network needed to find that out
    (_snapshot(tmp_path, "org/thing") / "a.safetensors").write_bytes(WEIGHTS[:-1] + b"!")
    assert [s.state for s in cache.states(["thing"], rehash=True)] == ["corrupt", "ok"]
    with pytest.raises(HellomemeError, match=r"^thing/late.bin is not in the Hugging Face cache .* HF_HUB_OFFLINE is set$"):
        WeightCache(lock=_lock(hub, extra=("late.bin",))).fetch(["thing"])


@pytest.mark.parametrize(
    "spoilt, lock_sha256",
    [
        ("org/thing/a.safetensors", {}),  # against the hub's LFS sha256
        ("org/thing/sub/config.json", {}),  # a file kept in git: against its git hash
        (None, {"sub/config.json": "0" * 64}),  # good bytes, but not the ones the lock pins
    ],
)
def test_a_corrupt_download_is_refused_in_one_line_and_not_kept(hub, tmp_path, spoilt, lock_sha256):
    if spoilt:
        hub.corrupt.add(spoilt)
    bad = "a.safetensors" if spoilt == "org/thing/a.safetensors" else "sub/config.json"
    cache = WeightCache(lock=_lock(hub, sha256=lock_sha256))
    with pytest.raises(HellomemeError) as refused:
        cache.fetch(["thing"])
    message = str(refused.value)
    against = "the sha256 in the lock" if lock_sha256 else "the hub's LFS sha256" if bad.endswith(".safetensors") else "the hub's git hash"
    assert "\n" not in message and f"thing/{bad} does not match {against}" in message
    assert try_to_load_from_cache("org/thing", bad, cache_dir=tmp_path / "hf") is None
    with pytest.raises(HellomemeError, match=r"missing weights .* thing \(1 file\)"):
        cache.require(["thing"])


def test_a_file_the_hub_does_not_have_is_one_line_naming_it(hub):
    with pytest.raises(HellomemeError, match=r"^cannot download thing/gone.bin from huggingface org/thing@main: HTTP 404") as error:
        WeightCache(lock=_lock(hub, extra=("gone.bin",))).fetch(["thing"])
    assert "\n" not in str(error.value)


def test_a_plain_url_file_is_checked_against_the_lock(hub, tmp_path):
    hub.files["plain/face.task"] = b"something else"
    with pytest.raises(HellomemeError, match=r"^download of face/face.task from .* does not match the lock$"):
        WeightCache(lock=_lock(hub)).fetch(["face"])
    assert not list((tmp_path / "home" / "face").iterdir())


def test_missing_weights_stop_before_work_with_one_message(hub):
    with pytest.raises(HellomemeError, match=r"missing weights .* thing \(2 files\); run `hellomeme weights fetch thing`"):
        WeightCache(lock=_lock(hub)).require(["thing"])


def test_import_takes_files_by_hash_or_path_and_a_complete_copy_in_home_wins(hub, tmp_path):
    cache = WeightCache(lock=_lock(hub))
    cache.fetch(["thing"])
    outside = tmp_path / "usb"
    (outside / "copy" / "thing" / "sub").mkdir(parents=True)
    (outside / "copy" / "thing" / "a.safetensors").write_bytes(WEIGHTS)
    (outside / "copy" / "thing" / "sub" / "config.json").write_bytes(FILES["org/thing/sub/config.json"])
    (outside / "deep" / "whatever.task").parent.mkdir(parents=True)
    (outside / "deep" / "whatever.task").write_bytes(FACE)  # taken by its sha256
    (outside / "unrelated.txt").write_text("not a weight")
    imported = cache.import_path(outside)
    assert sorted((s.component, s.path) for s in imported) == [("face", "face.task"), ("thing", "a.safetensors"), ("thing", "sub/config.json")]
    assert cache.require(["thing", "face"]) == {"thing": tmp_path / "home" / "thing", "face": tmp_path / "home" / "face"}
    assert [s.where for s in cache.states(["thing"])] == ["home", "home"]
    assert [s.state for s in cache.states(["thing", "face"], rehash=True)] == ["ok"] * 3
    (tmp_path / "home" / "thing" / "a.safetensors").write_bytes(WEIGHTS[:-1] + b"!")
    assert [s.state for s in cache.states(["thing"], rehash=True)] == ["corrupt", "ok"]


def test_import_refuses_a_folder_with_nothing_from_the_lock(hub, tmp_path):
    (tmp_path / "x.bin").write_bytes(b"nothing")
    with pytest.raises(HellomemeError, match="no file matches"):
        WeightCache(lock=_lock(hub)).import_path(tmp_path / "x.bin")


def test_lock_pins_revisions_and_hashes_from_the_hub(hub):
    resolved = resolve_lock(_lock(hub))
    assert resolved["thing"].revision == COMMIT and resolved["deep"].revision == COMMIT
    assert resolved["thing"].files == (
        LockedFile("a.safetensors", _sha256(WEIGHTS), len(WEIGHTS)),
        LockedFile("sub/config.json", _sha256(FILES["org/thing/sub/config.json"]), len(FILES["org/thing/sub/config.json"])),
    )
    assert resolved["face"].files == (LockedFile("face.task", _sha256(FACE), len(FACE)),)
    # LFS files are pinned from the hub's metadata; only the small git files and the URL are downloaded.
    assert sorted(hub.gets()) == sorted(
        [f"/org/thing/resolve/{COMMIT}/sub/config.json", f"/org/deep/resolve/{COMMIT}/models/enc/config.json", "/plain/face.task"]
    )


def test_lock_file_round_trips_and_locks_the_files_diffusers_loads(tmp_path):
    lock = read_lock()
    assert {"sd15", "hm_reference", "hm_control", "hm_control2", "hm_animatediff_frame12", "image_encoder", "pd_fgc_motion", "face_landmarker"} <= set(lock)
    assert lock["face_landmarker"].files[0].sha256 == "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"
    sd15 = {f.path for f in lock["sd15"].files}
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"} <= sd15
    assert not any(".fp16." in f.path for c in lock.values() for f in c.files)
    write_lock(lock, tmp_path / "weights.lock")
    assert read_lock(tmp_path / "weights.lock") == lock


def _seed_hf_cache(cache_dir: Path, repo: str, paths: list[str]) -> Path:
    """A repo in the Hugging Face cache layout: refs/main naming a snapshot holding `paths`."""
    folder = cache_dir / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    for path in paths:
        (folder / "snapshots" / COMMIT / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / COMMIT / path).write_bytes(b"{}")
    return folder / "snapshots" / COMMIT


def test_list_in_a_pipe_names_every_component_and_where_each_file_is(tmp_path):
    face_model = require(SHARED / "models" / "face_landmarker.task", "MediaPipe face model")
    lock = read_lock()
    WeightCache(tmp_path / "home", lock).import_path(face_model)
    snapshot = _seed_hf_cache(tmp_path / "hf", lock["sd15"].repo, [f.path for f in lock["sd15"].files])
    env = {**os.environ, "COLUMNS": "40", "HELLOMEME_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hf")}
    listing = subprocess.run(
        [sys.executable, "-m", "hellomeme_cli", "weights", "list"], env=env, stdout=subprocess.PIPE, text=True, check=True
    ).stdout
    lines = listing.splitlines()
    assert "…" not in listing
    for name, component in lock.items():
        assert any(line.split()[:1] == [name] for line in lines), name
        for locked in component.files:
            line = next(line for line in lines if line.split()[:1] == [locked.path] and line.startswith("  "))
            if name == "sd15":
                assert f"HF cache  {snapshot / locked.path}" in re.sub(r" {2,}", "  ", line)
            elif name == "face_landmarker":
                assert f"HELLOMEME_HOME  {tmp_path / 'home' / name / locked.path}" in re.sub(r" {2,}", "  ", line)
            else:
                assert line.split()[1:] == ["missing"]


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    """`hellomeme weights make-tiny` as a user runs it: one line said, nothing from the libraries."""
    home = tmp_path_factory.mktemp("tiny")
    result = subprocess.run([sys.executable, "-m", "hellomeme_cli", "weights", "make-tiny", str(home)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.startswith(f"tiny weights in {home};") and result.stdout.count("\n") == 1
    return home


def test_verify_checks_what_is_here_and_names_what_was_never_fetched(tiny_home, tmp_path, monkeypatch):
    """A fresh make-tiny cache (no face model, no demo examples) and a cache holding one version's
    files pass `weights verify`; `--version` and named components fail on what they lack."""
    from hellomeme_cli.versions import any_version

    face_model = require(SHARED / "models" / "face_landmarker.task", "MediaPipe face model")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    runner = CliRunner()

    def verify(home: Path, *arguments: str):
        monkeypatch.setenv("HELLOMEME_HOME", str(home))
        return runner.invoke(app, ["weights", "verify", *arguments])

    fresh = verify(tiny_home)
    assert fresh.exit_code == 0, fresh.output
    assert "not fetched (`hellomeme weights fetch NAME` when a run needs one): demo_portrait, demo_clip, face_landmarker" in fresh.stdout

    only_v2 = tmp_path / "v2"
    for name in any_version("v2").all_components():
        if name != "face_landmarker":
            shutil.copytree(tiny_home / name, only_v2 / name)
    WeightCache(only_v2).import_path(face_model)
    for arguments in ((), ("--version", "v2"), ("hm2_control", "sd15")):
        result = verify(only_v2, *arguments)
        assert result.exit_code == 0, (arguments, result.output)
    assert "hm5_reference" in verify(only_v2).stdout.splitlines()[-1]
    for arguments, missing in ((("--version", "v5"), "hm5_reference"), (("hm3_reference",), "hm3_reference")):
        result = verify(only_v2, *arguments)
        assert result.exit_code == 1 and f"missing  {missing}/" in result.stdout, (arguments, result.output)
    (only_v2 / "hm2_control" / "config.json").unlink()  # a component half here is checked without being named
    result = verify(only_v2)
    assert result.exit_code == 1 and "missing  hm2_control/config.json" in result.stdout


def test_make_tiny_and_imported_face_model_give_a_cache_verify_accepts(tiny_home, tmp_path, monkeypatch):
    face_model = require(SHARED / "models" / "face_landmarker.task", "MediaPipe face model")
    monkeypatch.setenv("HELLOMEME_HOME", str(tiny_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    runner = CliRunner()
    examples = [require(MEDIA / name, "demo example") for name in ("chillout.jpg", "jue.mp4")]  # `hellomeme demo`'s, matched by hash
    for file in (face_model, *examples):
        assert runner.invoke(app, ["weights", "import", str(file)]).exit_code == 0
    listing = runner.invoke(app, ["weights", "list"])
    assert listing.exit_code == 0 and "missing" not in listing.stdout
    lock = read_lock()
    states = {line.split()[0]: line.split()[1] for line in listing.stdout.splitlines() if line.split()[:1] and line.split()[0] in lock}
    assert states == {name: "ok" for name in lock}
    # Which runs need a component comes from the version registry.
    needed = {line.split()[0]: line for line in listing.stdout.splitlines() if line.split()[:1] and line.split()[0] in lock}
    assert needed["hm5_motion"].rstrip().endswith("v5 (video), v5b (video)") and needed["hm5c_reference"].rstrip().endswith("v5c")
    verified = runner.invoke(app, ["weights", "verify"])
    assert verified.exit_code == 0, verified.output

    corrupt = tiny_home / "hm_control" / "diffusion_pytorch_model.safetensors"
    original = corrupt.read_bytes()
    corrupt.write_bytes(original[:-8] + b"\0" * 8)
    try:
        verified = runner.invoke(app, ["weights", "verify"])
        assert verified.exit_code == 1
        assert f"corrupt  {corrupt} sha256" in verified.stdout
    finally:
        corrupt.write_bytes(original)


def test_tiny_weights_load_with_the_real_loaders(tiny_home):
    from diffusers import MotionAdapter, UNet2DConditionModel

    from hellomeme_cli.models import FanEncoder, HMControlNet, HMReferenceAdapter

    sd15 = tiny_home / "sd15"
    assert all((sd15 / f.path).is_file() for f in read_lock()["sd15"].files)  # the locked, non-variant names
    for cls, folder in ((UNet2DConditionModel, "sd15/unet"), (MotionAdapter, "hm_animatediff_frame12")):
        _, info = cls.from_pretrained(tiny_home / folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
    for cls, folder in ((HMReferenceAdapter, "hm_reference"), (HMControlNet, "hm_control"), (FanEncoder, "pd_fgc_motion")):
        _, info = cls.from_pretrained(tiny_home / folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]


def test_animate_offline_from_tiny_weights_fetched_through_the_hub(tiny_home, tmp_path, monkeypatch):
    """The whole path a user takes: fetch from the hub into the HF cache, then animate with the
    network gone and HF_HUB_OFFLINE set."""
    from hellomeme_cli.media.video import probe_video

    face_model = require(SHARED / "models" / "face_landmarker.task", "MediaPipe face model")
    portrait, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip")
    served, lock = {}, {}
    for name, component in read_lock().items():
        if component.repo:  # the lock as `weights lock` would pin the tiny files
            pinned = []
            for locked in component.files:
                content = (tiny_home / name / locked.path).read_bytes()
                served[f"{component.repo}/{component.remote_path(locked)}"] = content
                pinned.append(dataclasses.replace(locked, sha256=_sha256(content), size=len(content)))
            component = dataclasses.replace(component, files=tuple(pinned))
        lock[name] = component
    write_lock(lock, tmp_path / "weights.lock")
    monkeypatch.setattr(weights, "LOCK_PATH", tmp_path / "weights.lock")
    hub = serve_hub(served, tmp_path, monkeypatch)
    runner = CliRunner()
    try:
        examples = [str(MEDIA / name) for name in ("chillout.jpg", "jue.mp4")]  # the demo's, matched by hash
        for file in (str(face_model), *examples):
            assert runner.invoke(app, ["weights", "import", file]).exit_code == 0
        fetched = runner.invoke(app, ["weights", "fetch"])
        assert fetched.exit_code == 0, fetched.output
        assert len(hub.gets()) == len(served)
    finally:
        hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folders = WeightCache().require(list(lock))
    assert all(folders[name].is_relative_to(tmp_path / "hf") for name, c in lock.items() if c.repo)
    verified = runner.invoke(app, ["weights", "verify"])
    assert verified.exit_code == 0, verified.output
    monkeypatch.chdir(tmp_path)
    arguments = [str(portrait), str(clip), "--size", "128", "--steps", "2", "--max-frames", "4", "-o", "out.mp4"]
    animated = runner.invoke(app, ["animate", *arguments])
    assert animated.exit_code == 0, animated.output
    assert probe_video(tmp_path / "out.mp4").frame_count == 4
