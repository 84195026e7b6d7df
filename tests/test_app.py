"""`hellomeme app`: the page in a real browser (Debian's chromium via Playwright), its API through
gradio_client, the loaded-model cache, and the one line said when Gradio is not installed."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from hellomeme_cli.cli import main
from hellomeme_cli.media.video import probe_video
from hellomeme_cli.weights.cache import WeightCache

from conftest import MEDIA, require

gr = pytest.importorskip("gradio", reason='the app extra is not installed (pip install -e ".[app]")')

from hellomeme_cli import app as web_app  # noqa: E402  (needs gradio)

FAST = {"size": 128, "steps": 2, "max_frames": 3}  # every stage runs, in seconds with tiny weights
GENERATION_TIMEOUT_MS = 300_000  # model loading and three frames on a shared 2-core CPU


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_cache, tmp_path_factory):
    """The app on a free port of 127.0.0.1 in a background thread, HELLOMEME_HOME at the tiny cache."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HELLOMEME_HOME", str(tiny_cache))
        demo = web_app.create_app(WeightCache(tiny_cache), tmp_path_factory.mktemp("app-outputs"))
        demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True, max_file_size=web_app.MAX_UPLOAD)
        try:
            yield demo
        finally:
            demo.close()


def _written_videos(demo) -> list[Path]:
    return sorted(Path(demo.output_root).glob("run-*/*.mp4"))


@pytest.fixture
def faceless_png(tmp_path) -> Path:
    """A picture with no face in it: smooth colour gradients."""
    ramp = np.linspace(0, 255, 256, dtype=np.uint8)
    picture = np.dstack([np.tile(ramp, (256, 1)), np.tile(ramp[:, None], (1, 256)), np.full((256, 256), 90, np.uint8)])
    path = tmp_path / "no_face.png"
    assert cv2.imwrite(str(path), picture)
    return path


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; make install does it on the CI)")
    return found


def test_page_in_a_browser_makes_a_video_with_audio_and_says_no_face(server, faceless_png):
    """Upload a portrait and a clip, fast settings, Generate: a video plays in the page and the
    file written has the clip's audio; a picture without a face gives a one-line message."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make install adds it)")
    portrait, clip = require(MEDIA / "majicmix1.jpg", "test portrait"), require(MEDIA / "jue.mp4", "test clip")
    before = set(_written_videos(server))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.local_url)
            page.locator("#video-reference input[type=file]").set_input_files(str(portrait))
            page.locator("#video-driving input[type=file]").set_input_files(str(clip))
            page.locator("#video-reference img").wait_for()
            page.locator("#video-driving video").wait_for()
            for name, value in FAST.items():
                field = page.locator(f"#video-{name} input, #video-{name} textarea")
                field.fill(str(value))
                field.press("Tab")
            page.locator("#video-generate").click()
            result, message = page.locator("#video-result video[src]"), page.get_by_test_id("toast-body")
            result.or_(message).first.wait_for(timeout=GENERATION_TIMEOUT_MS)
            assert not message.count(), message.first.inner_text()
            assert result.get_attribute("src")
            seed = page.locator("#video-used-seed input").input_value()
            assert seed.isdigit()

            page.reload()
            page.locator("#video-reference input[type=file]").set_input_files(str(faceless_png))
            page.locator("#video-driving input[type=file]").set_input_files(str(clip))
            page.locator("#video-reference img").wait_for()
            page.locator("#video-driving video").wait_for()
            for name, value in FAST.items():  # as fast as the first run, should the check come late
                field = page.locator(f"#video-{name} input, #video-{name} textarea")
                field.fill(str(value))
                field.press("Tab")
            page.locator("#video-generate").click()
            message = page.get_by_test_id("toast-text").first
            message.wait_for(timeout=GENERATION_TIMEOUT_MS)
            assert message.inner_text().strip() == "no_face.png: no face found"
            assert "Traceback" not in page.content()
        finally:
            browser.close()
    written = sorted(set(_written_videos(server)) - before)
    assert len(written) == 1
    info = probe_video(written[0])
    assert info.has_audio and info.frame_count == FAST["max_frames"]


def test_api_endpoint_returns_the_video_and_its_seed(server):
    """The named endpoint /animate, called as a program would (gradio_client)."""
    from gradio_client import Client, handle_file

    portrait, clip = require(MEDIA / "majicmix1.jpg", "test portrait"), require(MEDIA / "jue.mp4", "test clip")
    client = Client(server.local_url, verbose=False)
    video, download, seed, shown = client.predict(  # four outputs, as before the meme formats: scripts unpack them
        reference=handle_file(str(portrait)), driving=handle_file(str(clip)), **{**FAST, "seed": "7"}, api_name="/animate"
    )
    assert Path(video).suffix == ".mp4" and Path(video).is_file()
    assert probe_video(Path(video)).frame_count == FAST["max_frames"]
    assert seed == 7 and shown["seed"] == 7 and shown["steps"] == 2 and shown["size"] == 128
    assert "H.264 mp4, 3 frames at 15 fps" in shown["result"] and "with the audio" in shown["result"]
    video, download, seed, shown = client.predict(
        reference=handle_file(str(portrait)), driving=handle_file(str(clip)), **{**FAST, "seed": "7"}, format="gif", caption="HI",
        api_name="/animate",
    )
    assert video is None and Path(download).suffix == ".gif" and probe_video(Path(download)).frame_count == 3
    assert "GIF, 3 frames" in shown["result"] and "audio left out (GIF has no sound)" in shown["result"] and shown["caption"] == "HI"


def test_check_driving_and_image_endpoints(server):
    """/check_driving gives the track preview of the clip's first frames; /render_image a picture."""
    from gradio_client import Client, handle_file

    portrait, clip = require(MEDIA / "majicmix1.jpg", "test portrait"), require(MEDIA / "jue.mp4", "test clip")
    client = Client(server.local_url, verbose=False)
    preview = client.predict(driving=handle_file(str(clip)), face_index=0, max_frames="3", smoothing=True, api_name="/check_driving")
    info = probe_video(Path(preview))
    assert info.frame_count == 3 and info.has_audio
    picture, seed, shown = client.predict(
        reference=handle_file(str(portrait)), driving=handle_file(str(portrait)), size=128, steps="2", seed="3", api_name="/render_image"
    )
    assert cv2.imread(picture).shape[:2] == (128, 128)
    assert seed == 3 and shown["version"] == "v5"


def test_a_faceless_portrait_is_said_before_any_model_loads(server, faceless_png, monkeypatch):
    """Both tabs check their inputs as the command line does, before the models are asked for."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    asked = []
    monkeypatch.setattr(server.models, "get", lambda *arguments: asked.append(arguments))
    client, clip = Client(server.local_url, verbose=False), require(MEDIA / "jue.mp4", "test clip")
    for endpoint, driving in (("/animate", clip), ("/render_image", faceless_png)):
        with pytest.raises(AppError) as error:
            client.predict(reference=handle_file(str(faceless_png)), driving=handle_file(str(driving)), size=128, api_name=endpoint)
        assert str(error.value) == "no_face.png: no face found", endpoint
    assert asked == []


def test_cancel_stops_a_running_video_leaves_no_file_and_the_next_run_works(server):
    """Cancel while the clip is being made: the run stops at its next frame or step, its folder and
    partial file are gone, and the models it used make the next video."""
    import time

    from gradio_client import Client, handle_file

    portrait, clip = require(MEDIA / "majicmix1.jpg", "test portrait"), require(MEDIA / "jue.mp4", "test clip")
    client = Client(server.local_url, verbose=False)
    before = set(Path(server.output_root).iterdir())
    job = client.submit(reference=handle_file(str(portrait)), driving=handle_file(str(clip)), size=128, steps="4", seed="5", api_name="/animate")
    deadline = time.monotonic() + GENERATION_TIMEOUT_MS / 1000
    while not job.status().progress_data and not job.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not job.done(), "the run ended before it could be cancelled"
    client.predict(api_name="/video_cancel")
    with pytest.raises(Exception) as stopped:
        job.result(timeout=GENERATION_TIMEOUT_MS / 1000)
    assert "Traceback" not in str(stopped.value)

    # Queued behind the cancelled run (one generation at a time), so it starts once that one has stopped.
    video, _, seed, _ = client.predict(
        reference=handle_file(str(portrait)), driving=handle_file(str(clip)), **{**FAST, "seed": "6"}, api_name="/animate"
    )
    assert seed == 6 and probe_video(Path(video)).frame_count == FAST["max_frames"]
    new = sorted(set(Path(server.output_root).iterdir()) - before)
    assert [sorted(path.name for path in folder.iterdir()) for folder in new] == [["majicmix1_jue.mp4"]]


def test_compare_endpoint_returns_the_clips_side_by_side_the_contact_sheet_and_the_table(server):
    """The compare tab: the library's `compare` over the uploads."""
    from gradio_client import Client, handle_file

    portrait, clip = require(MEDIA / "majicmix1.jpg", "test portrait"), require(MEDIA / "jue.mp4", "test clip")
    video, sheet, table = Client(server.local_url, verbose=False).predict(
        reference=handle_file(str(portrait)), driving=handle_file(str(clip)), versions=["v2", "v5"], checkpoints=[],
        size=128, steps="1", max_frames="3", seed="4", api_name="/compare",
    )
    info = probe_video(Path(video))
    assert info.frame_count == 3 and info.has_audio and info.height == 128 + 28
    assert cv2.imread(sheet).shape[0] == 3 * (160 + 28)
    assert table.startswith("seed 4") and "| v2 |" in table and "| v5 |" in table


def test_unreadable_clip_is_one_line_naming_it(server, tmp_path):
    """A file that is not a video: the endpoint's error is the library's one line, by the upload's name."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(AppError) as error:
        Client(server.local_url, verbose=False).predict(driving=handle_file(str(broken)), api_name="/check_driving")
    message = str(error.value)
    assert message.startswith("broken.mp4: ") and "\n" not in message and "Traceback" not in message


def test_models_load_once_per_model_options_least_recent_let_go(monkeypatch):
    """Equal model options reuse the loaded pipeline; a third kind lets the oldest go."""
    loaded = []
    monkeypatch.setattr(web_app.api, "load_pipeline", lambda version, **kwargs: loaded.append((version, kwargs)) or object())
    models = web_app.ModelCache(WeightCache(Path("unused")), size=2)
    first = models.get("video", {"version": "v2", "device": "cpu"}, print)
    assert models.get("video", {"version": "v2", "device": "cpu"}, print) is first
    models.get("image", {"version": "v5"}, print)
    models.get("video", {"version": "v2", "loras": ["MoreDetails:0.8"]}, print)
    assert len(loaded) == 3 and len(models) == 2
    assert loaded[2] == ("v2", {"mode": "video", "cache": models.cache, "progress": print, "lora": ["MoreDetails:0.8"]})
    models.get("video", {"version": "v2", "device": "cpu"}, print)  # let go: loaded again
    assert len(loaded) == 4


def test_without_gradio_the_command_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    monkeypatch.delitem(sys.modules, "hellomeme_cli.app")
    monkeypatch.setattr(sys, "argv", ["hellomeme", "app"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and 'pip install "hellomeme-cli[app]"' in lines[0]
