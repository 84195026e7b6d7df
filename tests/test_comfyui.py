"""hellomeme's ComfyUI nodes driven as ComfyUI drives them (INPUT_TYPES, RETURN_TYPES, FUNCTION, under
torch.inference_mode), against stand-ins of ComfyUI's modules (comfyui_standins.py), on tiny random
weights at a 128-pixel working size and 2 steps. The real server: test_comfyui_server.py."""

from __future__ import annotations

import json
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import comfyui_standins as standins
from conftest import MEDIA, audio_duration, require
from hellomeme_cli import api
from hellomeme_cli.cli import app
from hellomeme_cli.comfyui import comfy as comfy_door, install, nodes
from hellomeme_cli.comfyui.inputs import DEFAULT, UNSET, setting_values
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.progress import ProgressEvent
from hellomeme_cli.media.video import probe_video, read_audio, read_frames, read_image
from hellomeme_cli.settings import all_settings

FAST = {"size": 128, "steps": 2}
FRAMES = 6  # of qie.mp4 (15 fps, with audio)


def run(node: type, **inputs):
    """One node run as ComfyUI runs it: widgets left out take their defaults (a list's first entry),
    the function called under inference mode; its outputs checked against RETURN_TYPES."""
    spec = node.INPUT_TYPES()
    for name, (kind, options) in spec["required"].items():
        if name not in inputs:
            inputs[name] = options["default"] if "default" in options else kind[0]
    with torch.inference_mode():
        result = getattr(node(), node.FUNCTION)(**inputs)
    outputs = result["result"] if isinstance(result, dict) else result
    assert len(outputs) == len(node.RETURN_TYPES)
    return outputs


@pytest.fixture(scope="module")
def comfy(tiny_cache, tmp_path_factory):
    """ComfyUI's modules stood in for, hellomeme's cache the tiny one, every pipeline load counted."""
    base = tmp_path_factory.mktemp("comfyui")
    loads = []
    load = api.load_pipeline
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HELLOMEME_HOME", str(tiny_cache))
        for name, module in standins.modules(base).items():
            patch.setitem(sys.modules, name, module)
        patch.setattr(nodes, "_pipelines", None)
        patch.setattr(api, "load_pipeline", lambda *args, **kwargs: loads.append(args) or load(*args, **kwargs))
        yield SimpleNamespace(base=base, loads=loads, management=sys.modules["comfy.model_management"])


@pytest.fixture(scope="module")
def made(comfy):
    """A clip made once from LoadVideo's VIDEO: Load pipeline, Driving motion, Animate."""
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip")
    (pipeline,) = run(nodes.HelloMemeLoadPipeline)
    driving, preview = run(nodes.HelloMemeDrivingMotion, video=standins.VideoFromFile(str(clip)), max_frames=FRAMES)
    portrait = picture(reference)
    video, images, fps, audio = run(nodes.HelloMemeAnimate, pipeline=pipeline, reference=portrait, driving=driving, seed=5, **FAST)
    return SimpleNamespace(pipeline=pipeline, driving=driving, preview=preview, portrait=portrait, clip=clip, video=video, images=images, fps=fps, audio=audio)


def picture(path: Path) -> torch.Tensor:
    """A picture as LoadImage gives it: an IMAGE batch of one."""
    return torch.from_numpy(read_image(path))[None].float() / 255


def test_every_node_is_named_hellomeme_and_takes_the_settings_by_their_names(comfy):
    settings = {setting.name for setting in all_settings()}
    for node_id, node in nodes.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("HelloMeme") and nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("HelloMeme ")
        assert node.CATEGORY == "hellomeme" and callable(getattr(node, node.FUNCTION))
        assert len(getattr(node, "RETURN_NAMES", node.RETURN_TYPES)) == len(node.RETURN_TYPES)
    animate = nodes.HelloMemeAnimate.INPUT_TYPES()["required"]
    assert set(nodes.ANIMATE_SETTINGS) <= set(animate) and set(animate) - set(nodes.ANIMATE_SETTINGS) == {"pipeline", "reference", "driving"}
    assert set(nodes.HelloMemeLoadPipeline.INPUT_TYPES()["required"]) - {"mode"} <= settings
    assert animate["steps"] == ("INT", animate["steps"][1]) and animate["steps"][1]["default"] == DEFAULT
    assert (animate["size"][1]["min"], animate["size"][1]["step"]) == (128, 64) and animate["seed"][1]["control_after_generate"]
    assert animate["scheduler"][0][0] == UNSET["scheduler"] and animate["pose"][0] == ["absolute", "relative"]
    values = setting_values(nodes.ANIMATE_SETTINGS, {name: options.get("default", kind[0] if isinstance(kind, list) else None) for name, (kind, options) in animate.items()})
    assert values["steps"] is None and values["scheduler"] is None and values["guidance"] is None and values["size"] == 512


def test_a_video_in_gives_a_video_out_with_every_frame_its_rate_and_the_clips_audio(made):
    source = probe_video(made.clip)
    path = Path(made.video.get_stream_source())
    info = probe_video(path)
    assert (info.frame_count, info.rate, info.width) == (FRAMES, source.rate, 128)
    assert info.has_audio and abs(audio_duration(path) - FRAMES / source.fps) < 1 / source.fps
    assert made.images.shape == (FRAMES, 128, 128, 3) and made.images.dtype == torch.float32 and 0 <= made.images.min() <= made.images.max() <= 1
    assert made.fps == pytest.approx(float(source.rate))
    waveform, rate = made.audio["waveform"], made.audio["sample_rate"]
    assert waveform.ndim == 3 and abs(waveform.shape[-1] / rate - FRAMES / made.fps) < 1 / made.fps and waveform.abs().max() > 0
    assert made.preview.shape == (FRAMES, nodes.PREVIEW_SIZE, nodes.PREVIEW_SIZE, 3)
    assert info.tags["hellomeme_seed"] == "5"


def test_cancel_stops_within_one_denoising_step_and_the_next_prompt_runs_on_the_loaded_pipeline(comfy, made):
    pipe = nodes.pipelines().held(nodes.pipelines().keys()[0])
    calls = {"all": 0, "at_cancel": None}

    def count(*_):
        calls["all"] += 1
        if calls["at_cancel"] is None:  # Cancel pressed during the first denoising call
            calls["at_cancel"] = calls["all"]
            comfy.management.interrupt_current_processing()

    hooks = [denoiser.register_forward_hook(count) for denoiser in {pipe.denoiser_2d, pipe.denoiser_motion}]
    try:
        with pytest.raises(standins.InterruptProcessingException):
            run(nodes.HelloMemeAnimate, pipeline=made.pipeline, reference=made.portrait, driving=made.driving, seed=7, **FAST)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls["all"] == calls["at_cancel"], "a denoising call ran after Cancel"
    before = len(comfy.loads)
    (pipeline,) = run(nodes.HelloMemeLoadPipeline)  # the next prompt: the same settings
    _, images, _, _ = run(nodes.HelloMemeAnimate, pipeline=pipeline, reference=made.portrait, driving=made.driving, seed=5, **FAST)
    assert len(comfy.loads) == before and torch.equal(images, made.images)  # nothing loaded; the clip of before the cancelled run


def test_a_faceless_reference_is_one_line_before_any_loading(comfy, made):
    comfy.management.unload_all_models()  # nothing held: a load would show
    assert not nodes.pipelines().keys() and not comfy.management.current_loaded_models
    before = len(comfy.loads)
    (pipeline,) = run(nodes.HelloMemeLoadPipeline)  # checks the options, loads nothing yet
    blank = torch.full((1, 128, 128, 3), 0.5)
    with pytest.raises(HellomemeError) as error:
        run(nodes.HelloMemeAnimate, pipeline=pipeline, reference=blank, driving=made.driving, **FAST)
    assert str(error.value) == "the reference picture: no face found" and error.value.__cause__ is None
    assert len(comfy.loads) == before


def test_held_pipelines_are_listed_in_comfyuis_model_management_and_unload_models_lets_them_go(comfy, made):
    listed, before = comfy.management.current_loaded_models, len(comfy.loads)
    _, images, _, _ = run(nodes.HelloMemeAnimate, pipeline=made.pipeline, reference=made.portrait, driving=made.driving, seed=5, **FAST)
    assert len(comfy.loads) == before + 1 and torch.equal(images, made.images)  # loaded again, the same clip
    assert [entry.key for entry in listed] == nodes.pipelines().keys() and listed[0].model_memory() > 0
    comfy.management.unload_all_models()
    assert not listed and not nodes.pipelines().keys()


def test_frames_in_memory_with_their_audio_drive_a_clip_with_that_audio(comfy, made):
    """A VIDEO made of frames (CreateVideo's), its sound a loud sine the clip's own is not."""
    frames = torch.from_numpy(np.stack(list(read_frames(made.clip, FRAMES)))).float() / 255
    sound = {"waveform": torch.sin(torch.linspace(0, 900, 44100))[None, None].repeat(1, 2, 1), "sample_rate": 44100}
    video = standins.VideoFromComponents(standins.VideoComponents(images=frames, frame_rate=Fraction(15), audio=sound))
    driving, _ = run(nodes.HelloMemeDrivingMotion, video=video)
    made_video, images, fps, audio = run(nodes.HelloMemeAnimate, pipeline=made.pipeline, reference=made.portrait, driving=driving, seed=5, **FAST)
    assert images.shape[0] == FRAMES and fps == 15
    assert audio["waveform"].shape[1] == 2 and abs(audio["waveform"].shape[-1] / audio["sample_rate"] - FRAMES / 15) < 1 / 15
    decoded, rate = read_audio(Path(made_video.get_stream_source()))
    assert rate == 44100 and np.abs(decoded).max() > 0.5


def test_image_evaluate_and_motion_templates(comfy, made):
    (image,) = run(nodes.HelloMemeImage, pipeline=made.pipeline, reference=made.portrait, driving=made.portrait, seed=1, **FAST)
    assert image.shape == (1, 128, 128, 3)
    table, plot = run(nodes.HelloMemeEvaluate, driving=made.driving, reference=made.portrait, video=made.video)
    assert "| frames | 6 |" in table and "| fps | 15 |" in table and "| audio | True |" in table and plot.ndim == 4
    (path,) = run(nodes.HelloMemeSaveMotionTemplate, driving=made.driving)
    (loaded,) = run(nodes.HelloMemeLoadMotionTemplate, template=f"{Path(path).relative_to(comfy.base / 'output').as_posix()} [output]")
    assert len(loaded.template) == FRAMES and loaded.template.audio is None
    assert any(name.endswith(" [output]") for name in nodes.HelloMemeLoadMotionTemplate.INPUT_TYPES()["required"]["template"][0])


def test_work_in_another_thread_shows_its_progress_and_cancel_does_not_wait_for_it(comfy):
    """Downloads run in other threads; ComfyUI's progress bar and Cancel belong to the node's."""
    progress, release = comfy_door.NodeProgress(), threading.Event()

    def download():
        progress(ProgressEvent("download", 5, 10))
        release.wait(0.6)
        return "done"

    standins.ProgressBar.updates.clear()
    assert progress.wait(download) == "done" and standins.ProgressBar.updates == [(5, 10)]
    comfy.management.interrupt_current_processing()
    started = time.monotonic()
    with pytest.raises(standins.InterruptProcessingException):
        progress.wait(lambda: release.wait(30))
    release.set()
    assert time.monotonic() - started < 5


def test_missing_weights_offline_say_how_to_get_them(comfy, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(nodes, "_pipelines", None)
    monkeypatch.setenv("HELLOMEME_HOME", str(tmp_path / "empty"))
    with pytest.raises(HellomemeError) as error:
        run(nodes.HelloMemeLoadPipeline)
    message = str(error.value)
    assert "\n" not in message and "hellomeme weights fetch" in message and "hellomeme weights import" in message


def test_install_writes_the_loader_and_the_example_workflows_and_remove_takes_them_away(tmp_path):
    from typer.testing import CliRunner

    comfyui = tmp_path / "ComfyUI"
    comfyui.mkdir()
    (comfyui / "main.py").write_text("")
    result = CliRunner().invoke(app, ["comfyui", "install", str(comfyui)])
    assert result.exit_code == 0, result.output
    pack = comfyui / "custom_nodes" / "hellomeme"
    assert "from hellomeme_cli.comfyui.nodes import NODE_CLASS_MAPPINGS" in (pack / "__init__.py").read_text()
    shipped = sorted(path.name for path in (pack / "example_workflows").iterdir())
    assert shipped == [path.name for path in install.example_workflows()] and shipped and not any("_api" in name for name in shipped)
    assert f"wrote {pack / '__init__.py'}" in result.output
    assert CliRunner().invoke(app, ["comfyui", "install", str(comfyui), "--remove"]).exit_code == 0 and not pack.exists()
    pack.mkdir()  # another pack of that name is left alone
    with pytest.raises(HellomemeError, match="not written by"):
        install.install(comfyui)


def test_each_example_workflow_has_an_api_twin_and_both_give_every_input_of_hellomemes_nodes(comfy):
    """A setting added, renamed or dropped shows here, before the real server runs the workflows."""
    ui, api_format = install.example_workflows(), install.example_workflows(api_format=True)
    assert [path.stem + "_api" for path in ui] == [path.stem for path in api_format] and len(ui) == 3
    for path in api_format:
        prompt = json.loads(path.read_text())
        workflow = json.loads(path.with_name(path.name.replace("_api", "")).read_text())
        assert sorted(node["type"] for node in workflow["nodes"]) == sorted(node["class_type"] for node in prompt.values()), path.name
        for node in workflow["nodes"]:
            if node["type"].startswith("HelloMeme"):
                given = {name for name, value in prompt[str(node["id"])]["inputs"].items() if not isinstance(value, list)}
                assert given == set(widgets(node["type"])), (path.name, node["type"])
                controls = sum("control_after_generate" in options for options in widgets(node["type"]).values())
                assert len(node["widgets_values"]) == len(given) + controls, (path.name, node["type"])


def widgets(node_id: str) -> dict[str, dict]:
    """The inputs of a node that the page shows as widgets (numbers, text, switches, lists)."""
    declared = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    inputs = {**declared["required"], **declared.get("optional", {})}
    return {name: options for name, (kind, options) in inputs.items() if isinstance(kind, list) or kind in ("INT", "FLOAT", "BOOLEAN", "STRING")}
