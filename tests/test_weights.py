"""The weight cache: downloads from a local HTTP server, import, verify, make-tiny."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest
from typer.testing import CliRunner

from conftest import SHARED, require
from hellomeme_cli.cli import app
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.weights import Component, LockedFile, WeightCache, read_lock, write_lock

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Server(http.server.ThreadingHTTPServer):
    """Serves PAYLOAD at any path with HTTP Range; can corrupt its next answer or stop half way."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str | None]] = []
        self.corrupt_next = False
        self.cut_next_at: int | None = None


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server: _Server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if "missing" in self.path:
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        body = PAYLOAD[start:]
        if server.corrupt_next:
            server.corrupt_next = False
            body = bytes(len(body))
        if server.cut_next_at is not None:
            body, server.cut_next_at = body[: server.cut_next_at], None
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:
            pass


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()


def _lock(server, sha=PAYLOAD_SHA, size=len(PAYLOAD), files=("a.bin", "sub/b.bin")) -> dict[str, Component]:
    component = Component(
        name="thing",
        description="test component",
        files=tuple(LockedFile(f, sha, size) for f in files),
        licence="MIT",
        needed_for=("tests",),
        repo="org/thing",
        revision="main",
    )
    return {"thing": component}


def _endpoint(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_fetch_downloads_checks_and_places_every_file(tmp_path, server):
    cache = WeightCache(tmp_path, _lock(server))
    events = []
    cache.fetch(progress=events.append, endpoint=_endpoint(server))
    for name in ("a.bin", "sub/b.bin"):
        assert (tmp_path / "thing" / name).read_bytes() == PAYLOAD
    assert sorted(p for p, _ in server.requests) == ["/org/thing/resolve/main/a.bin", "/org/thing/resolve/main/sub/b.bin"]
    assert not list(tmp_path.rglob("*.part"))
    finished = [e for e in events if e.completed == len(PAYLOAD)]
    assert {e.task for e in finished} == {"thing/a.bin", "thing/sub/b.bin"} and all(e.total == len(PAYLOAD) for e in finished)
    server.requests.clear()
    cache.fetch(endpoint=_endpoint(server))
    assert server.requests == []  # nothing left to fetch


def test_interrupted_download_resumes_where_it_stopped(tmp_path, server):
    cache = WeightCache(tmp_path, _lock(server, files=("a.bin",)))
    server.cut_next_at = 300_000
    with pytest.raises(HellomemeError):
        cache.fetch(endpoint=_endpoint(server))
    partial = tmp_path / "thing" / "a.bin.part"
    assert partial.stat().st_size == 300_000 and not (tmp_path / "thing" / "a.bin").exists()
    cache.fetch(endpoint=_endpoint(server))
    assert server.requests[-1][1] == "bytes=300000-"
    assert (tmp_path / "thing" / "a.bin").read_bytes() == PAYLOAD


def test_corrupt_download_is_detected_and_fetched_again(tmp_path, server):
    cache = WeightCache(tmp_path, _lock(server, files=("a.bin",)))
    server.corrupt_next = True
    cache.fetch(endpoint=_endpoint(server))
    assert len(server.requests) == 2
    assert (tmp_path / "thing" / "a.bin").read_bytes() == PAYLOAD


def test_a_file_that_never_matches_its_hash_is_not_placed(tmp_path, server):
    cache = WeightCache(tmp_path, _lock(server, sha="0" * 64, files=("a.bin",)))
    with pytest.raises(HellomemeError, match="does not match the lock"):
        cache.fetch(endpoint=_endpoint(server))
    assert not (tmp_path / "thing" / "a.bin").exists()


def test_failed_download_names_the_file_and_the_reason(tmp_path, server):
    cache = WeightCache(tmp_path, _lock(server, files=("missing.bin",)))
    with pytest.raises(HellomemeError, match=r"thing/missing.bin .* HTTP 404"):
        cache.fetch(endpoint=_endpoint(server))


def test_missing_weights_stop_before_work_with_one_message(tmp_path, server):
    cache = WeightCache(tmp_path, _lock(server))
    with pytest.raises(HellomemeError, match=r"missing weights .* thing \(2 files\); run `hellomeme weights fetch thing`"):
        cache.require(["thing"])


def test_import_takes_files_by_hash_and_verify_names_a_corrupt_one(tmp_path, server):
    outside = tmp_path / "usb"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "whatever.bin").write_bytes(PAYLOAD)
    (outside / "unrelated.txt").write_text("not a weight")
    cache = WeightCache(tmp_path / "home", _lock(server, files=("a.bin",)))
    imported = cache.import_path(outside)
    assert [(s.component, s.path) for s in imported] == [("thing", "a.bin")]
    assert [s.state for s in cache.states(rehash=True)] == ["ok"]
    (tmp_path / "home" / "thing" / "a.bin").write_bytes(PAYLOAD[:-1] + b"!")
    assert [s.state for s in cache.states(rehash=True)] == ["corrupt"]


def test_import_refuses_a_folder_with_nothing_from_the_lock(tmp_path, server):
    (tmp_path / "x.bin").write_bytes(b"nothing")
    with pytest.raises(HellomemeError, match="no file matches"):
        WeightCache(tmp_path / "home", _lock(server)).import_path(tmp_path / "x.bin")


def test_lock_file_round_trips(tmp_path):
    lock = read_lock()
    assert {"sd15", "hm_reference", "hm_control", "hm_control2", "hm_animatediff_frame12", "image_encoder", "pd_fgc_motion", "face_landmarker"} <= set(lock)
    assert lock["face_landmarker"].files[0].sha256 == "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"
    write_lock(lock, tmp_path / "weights.lock")
    assert read_lock(tmp_path / "weights.lock") == lock


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("tiny")
    result = CliRunner().invoke(app, ["weights", "make-tiny", str(home)])
    assert result.exit_code == 0, result.output
    return home


def test_make_tiny_and_imported_face_model_give_a_cache_verify_accepts(tiny_home, monkeypatch):
    face_model = require(SHARED / "models" / "face_landmarker.task", "MediaPipe face model")
    monkeypatch.setenv("HELLOMEME_HOME", str(tiny_home))
    runner = CliRunner()
    assert runner.invoke(app, ["weights", "import", str(face_model)]).exit_code == 0
    listing = runner.invoke(app, ["weights", "list"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and "missing" not in listing.stdout and listing.stdout.count(" ok ") == 8
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
    from hellomeme_cli.models import FanEncoder, HMControlNet, HMDenoisingNet, HMReferenceAdapter

    sd15 = tiny_home / "sd15"
    denoiser = HMDenoisingNet.from_pretrained(
        sd15 / "unet", tiny_home / "hm_reference", tiny_home / "hm_animatediff_frame12"
    )
    assert denoiser.is_motion
    for cls, folder in ((HMReferenceAdapter, "hm_reference"), (HMControlNet, "hm_control"), (FanEncoder, "pd_fgc_motion")):
        _, info = cls.from_pretrained(tiny_home / folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
