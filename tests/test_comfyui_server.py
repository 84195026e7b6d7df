"""hellomeme's nodes in the real ComfyUI server, which no package on PyPI provides: run only where
HELLOMEME_COMFYUI names a ComfyUI checkout and the Python that runs it (with hellomeme-cli installed
in it), as CHECKOUT:PYTHON (os.pathsep between them), e.g.

    HELLOMEME_COMFYUI=/work/comfyui:/work/comfyui/.venv/bin/python .venv/bin/python -m pytest tests/test_comfyui_server.py -s

The pack is installed with `hellomeme comfyui install` into a fresh --base-directory, the server
started on a free loopback port (--cpu, HELLOMEME_HOME at the tiny weights, offline) and stopped by
its process id. Every *_api.json example is submitted to /prompt after its inputs are uploaded, at a
128-pixel working size, 2 steps and 6 driving frames; a Cancel goes through /interrupt; a faceless
reference's error is read from /history and from the error dialog of the page; every example workflow is opened from the Templates
route in ComfyUI's page (Debian's chromium, Playwright) and run from there. With -s the timings are
printed; HELLOMEME_COMFYUI_SCREENSHOT=PATH also saves the page with the video workflow (docs/comfyui.md).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import MEDIA, audio_duration, require
from hellomeme_cli.comfyui.install import example_workflows
from hellomeme_cli.media.video import probe_video, read_image, write_image

SETTING = os.environ.get("HELLOMEME_COMFYUI", "")
pytestmark = pytest.mark.skipif(
    not SETTING,
    reason="HELLOMEME_COMFYUI is not set (CHECKOUT:PYTHON: a ComfyUI checkout and the Python that runs it, with hellomeme-cli installed; docs/comfyui.md)",
)
FAST = {"size": 128, "steps": 2, "max_frames": 6}
FRAMES = FAST["max_frames"]
INPUTS = {"chillout.jpg": "chillout.jpg", "majicmix1.jpg": "majicmix1.jpg", "jue.mp4": "jue.mp4"}  # the examples' names: ../shared/media's
STARTUP_S, PROMPT_S = 180, 600
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
# The page's API events, kept for the test to read (app.api is the page's client of /ws).
LISTEN = """() => {
  window.hellomemeEvents = [];
  for (const type of ["execution_start", "execution_success", "execution_error", "execution_interrupted", "progress"])
    app.api.addEventListener(type, (event) => window.hellomemeEvents.push({type, ...event.detail}));
}"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _comfyui() -> tuple[Path, Path]:
    parts = SETTING.split(os.pathsep)
    if len(parts) != 2 or not (Path(parts[0]) / "main.py").is_file() or not Path(parts[1]).is_file():
        pytest.fail(f"HELLOMEME_COMFYUI={SETTING!r}: expected CHECKOUT{os.pathsep}PYTHON, a folder with main.py and a Python executable")
    return Path(parts[0]), Path(parts[1])


@pytest.fixture(scope="module")
def server(tiny_cache, tmp_path_factory):
    """The pack installed, the server up, the page open with its event listener; stopped by pid at the end."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make install adds it)")
    chromium = shutil.which("chromium") or pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    checkout, python = _comfyui()
    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "custom_nodes").mkdir()
    installed = subprocess.run([python, "-m", "hellomeme_cli", "comfyui", "install", str(base)], capture_output=True, text=True)
    assert installed.returncode == 0 and "wrote" in installed.stdout, installed.stdout + installed.stderr
    url, log = f"http://127.0.0.1:{_free_port()}", base / "server.log"
    env = {**os.environ, "HELLOMEME_HOME": str(tiny_cache), "HF_HUB_OFFLINE": "1"}
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--disable-api-nodes", "--base-directory", str(base)]
    timings: dict[str, float] = {}
    started = time.monotonic()
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=checkout, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        with sync_api.sync_playwright() as playwright:
            http = playwright.request.new_context(base_url=url)
            while not _answers(http, "/object_info/HelloMemeAnimate"):
                assert process.poll() is None, f"ComfyUI ended ({process.returncode}): {log.read_text()[-3000:]}"
                assert time.monotonic() - started < STARTUP_S, f"ComfyUI did not answer in {STARTUP_S} s: {log.read_text()[-3000:]}"
                time.sleep(0.5)
            timings["server start to /object_info"] = time.monotonic() - started
            for name, source in INPUTS.items():
                _upload(http, name, require(MEDIA / source, "test media").read_bytes())
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            page.goto(url)
            page.wait_for_function("!!(window.app && app.api && app.api.clientId && LiteGraph.registered_node_types['HelloMemeAnimate'])", timeout=120_000)
            page.evaluate(LISTEN)
            _close_dialogs(page)  # a new user's first visit opens the templates
            yield SimpleNamespace(url=url, base=base, log=log, http=http, page=page, timings=timings, client=page.evaluate("app.api.clientId"))
            browser.close()
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        print("\nComfyUI server test timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=1))


def _close_dialogs(page) -> None:
    page.wait_for_timeout(2000)
    while page.locator(".p-dialog").count():
        page.keyboard.press("Escape")
        page.wait_for_timeout(500)


def _answers(http, path: str) -> bool:
    try:
        return http.get(path).ok
    except Exception:  # refused while the server starts
        return False


def _upload(http, name: str, data: bytes) -> None:
    response = http.post("/upload/image", multipart={"image": {"name": name, "mimeType": "application/octet-stream", "buffer": data}, "overwrite": "true"})
    assert response.ok and response.json()["name"] == name, response.text()


def _fast(prompt: dict, **more) -> dict:
    """The prompt at the test's size, steps and frame count (and `more`) on hellomeme's nodes."""
    for node in prompt.values():
        if node["class_type"].startswith("HelloMeme"):
            node["inputs"].update({name: value for name, value in {**FAST, **more}.items() if name in node["inputs"]})
    return prompt


def _submit(server, prompt: dict) -> str:
    response = server.http.post("/prompt", data=json.dumps({"prompt": prompt, "client_id": server.client}), headers={"Content-Type": "application/json"})
    assert response.ok, response.text()
    return response.json()["prompt_id"]


def _history(server, prompt_id: str) -> dict:
    deadline = time.monotonic() + PROMPT_S
    while time.monotonic() < deadline:
        entry = server.http.get(f"/history/{prompt_id}").json().get(prompt_id)
        if entry is not None:
            return entry
        time.sleep(0.3)
    raise AssertionError(f"prompt {prompt_id} not done in {PROMPT_S} s: {server.log.read_text()[-3000:]}")


def _outputs(server, entry: dict, kind: str) -> list[Path]:
    """The files the run's output nodes wrote (`images` entries of type output)."""
    return [server.base / "output" / item["subfolder"] / item["filename"] for node in entry["outputs"].values() for item in node.get(kind, []) if item["type"] == "output"]


def _check_clip(path: Path) -> None:
    """As many frames as driving frames, at the driving clip's rate, its sound within a frame of the picture."""
    info, driving = probe_video(path), probe_video(MEDIA / "jue.mp4")
    assert (info.frame_count, info.rate) == (FRAMES, driving.rate), path
    assert info.has_audio and abs(audio_duration(path) - FRAMES / driving.fps) < 1 / driving.fps, path


def _loads(server, version: str, mode: str) -> int:
    return server.log.read_text().count(f"hellomeme: loading HelloMeme {version} for {mode}")


def test_each_api_workflow_makes_its_outputs_and_the_next_prompts_load_nothing(server):
    for path in example_workflows(api_format=True):
        started = time.monotonic()
        entry = _history(server, _submit(server, _fast(json.loads(path.read_text()))))
        server.timings[f"{path.name} (POST /prompt to /history)"] = time.monotonic() - started
        assert entry["status"]["status_str"] == "success", entry["status"]
        videos, pictures = _outputs(server, entry, "images"), []
        for video in [video for video in videos if video.suffix == ".mp4"]:
            _check_clip(video)
        pictures = [picture for picture in videos if picture.suffix == ".png"]
        texts = [text for node in entry["outputs"].values() for text in node.get("text", [])]
        if "compare" in path.name:
            assert len(videos) == 1 and len(texts) == 2 and all(f"| frames | {FRAMES} |" in text for text in texts)
        elif "image" in path.name:
            assert len(pictures) == 1 and read_image(pictures[0]).shape == (128, 128, 3)
        else:
            assert len(videos) == 1
    # The compare workflow loaded v2 for clips first; the video workflow's v2, another prompt, loaded nothing.
    assert _loads(server, "v2", "video") == _loads(server, "v5", "video") == _loads(server, "v5", "image") == 1


def test_cancel_through_interrupt_stops_within_a_step(server):
    """A long run (every frame of jue.mp4, 30 steps) cancelled once the sampler has started."""
    prompt = _fast(json.loads(next(p for p in example_workflows(api_format=True) if p.name == "hellomeme_video_api.json").read_text()), steps=30, max_frames=-1, seed=2)
    animate = next(node_id for node_id, node in prompt.items() if node["class_type"] == "HelloMemeAnimate")
    prompt_id = _submit(server, prompt)
    # Animate's second bar (the driving signals' comes first) has moved: the sampler runs.
    sampling = f"""() => {{
      const bars = window.hellomemeEvents.filter(e => e.type === "progress" && e.prompt_id === "{prompt_id}" && e.node === "{animate}");
      const restart = bars.findIndex((e, i) => i > 0 && e.value < bars[i - 1].value);
      return restart > 0 && bars.length > restart + 1;
    }}"""
    server.page.wait_for_function(sampling, timeout=PROMPT_S * 1000, polling=100)
    asked = time.monotonic()
    assert server.http.post("/interrupt", data="{}", headers={"Content-Type": "application/json"}).ok
    server.page.wait_for_function(f"window.hellomemeEvents.some(e => e.type === 'execution_interrupted' && e.prompt_id === '{prompt_id}')", timeout=60_000, polling=50)
    server.timings["Cancel: POST /interrupt to execution_interrupted"] = time.monotonic() - asked
    entry = _history(server, prompt_id)
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"]) and not _outputs(server, entry, "images")


def test_a_faceless_references_error_is_one_line_in_history(server, tmp_path):
    write_image(np.full((256, 256, 3), 128, np.uint8), tmp_path / "blank.png")
    _upload(server.http, "blank.png", (tmp_path / "blank.png").read_bytes())
    prompt = _fast(json.loads(next(p for p in example_workflows(api_format=True) if p.name == "hellomeme_video_api.json").read_text()))
    next(node for node in prompt.values() if node["class_type"] == "LoadImage")["inputs"]["image"] = "blank.png"
    entry = _history(server, _submit(server, prompt))
    errors = [details for kind, details in entry["status"]["messages"] if kind == "execution_error"]
    assert entry["status"]["status_str"] == "error" and len(errors) == 1
    assert errors[0]["exception_type"] == "hellomeme_cli.errors.HellomemeError"
    assert errors[0]["exception_message"].strip() == "the reference picture: no face found"
    dialog = server.page.locator(".p-dialog", has_text="HelloMemeAnimate")  # the page of the client that queued it shows the error
    dialog.wait_for(timeout=30_000)
    assert dialog.inner_text().split() == ["HelloMemeAnimate", *"the reference picture: no face found".split(), "Show", "Report", "Help", "Fix", "This", "Find", "Issues"]
    dialog.get_by_role("button", name="Close").click()


def test_each_example_workflow_opens_from_the_templates_in_the_page_and_runs_from_there(server):
    listed = server.http.get("/workflow_templates").json()
    assert sorted(listed["hellomeme"]) == [path.stem for path in example_workflows()]
    page = server.page
    for name in sorted(listed["hellomeme"]):
        workflow = server.http.get(f"/api/workflow_templates/hellomeme/{name}.json").json()
        page.evaluate("([workflow, name]) => app.loadGraphData(workflow, true, true, name)", [workflow, name])
        page.wait_for_timeout(1500)  # the pictures and the clip show in their nodes, a complaint about the file in a toast
        assert not page.get_by_text("Invalid workflow").count() and not page.get_by_text("Some Nodes Are Missing").count()
        if name == "hellomeme_video" and os.environ.get("HELLOMEME_COMFYUI_SCREENSHOT"):
            # 256 colours: the page's flat colours keep, the file stays small
            Image.open(io.BytesIO(page.screenshot())).quantize(256).save(os.environ["HELLOMEME_COMFYUI_SCREENSHOT"], optimize=True)
        set_widgets = """(values) => {
          for (const node of app.graph._nodes.filter(n => n.type.startsWith("HelloMeme")))
            for (const widget of node.widgets ?? []) if (widget.name in values) widget.value = values[widget.name];
        }"""
        page.evaluate(set_widgets, FAST)
        started, seen = time.monotonic(), page.evaluate("window.hellomemeEvents.length")
        page.get_by_role("button", name="Run", exact=True).click()
        done = f"window.hellomemeEvents.slice({seen}).some(e => ['execution_success', 'execution_error', 'execution_interrupted'].includes(e.type))"
        page.wait_for_function(done, timeout=PROMPT_S * 1000, polling=200)
        server.timings[f"{name} (Run in the page to done)"] = time.monotonic() - started
        ended = page.evaluate(f"window.hellomemeEvents.slice({seen}).filter(e => e.type.startsWith('execution_') && e.type !== 'execution_start')")
        assert [event["type"] for event in ended] == ["execution_success"], ended
        entry = _history(server, ended[0]["prompt_id"])
        for video in [path for path in _outputs(server, entry, "images") if path.suffix == ".mp4"]:
            _check_clip(video)
