"""`--upscale 2`: the RRDBNet loader (safe reading, the released layout), the Upscaler's tiling
and streaming, paste-back of enlarged frames, and animate / image end to end on tiny weights.
The match with the official `RealESRGANer.enhance` is checked by test_conformance.py."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import MEDIA, require
from hellomeme_cli.cli import app
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.models.rrdbnet import RRDBNet
from hellomeme_cli.face.pasteback import PasteBack
from hellomeme_cli.pipeline import AnimateSettings, prepare_run
from hellomeme_cli.face.signals import SquareCrop
from hellomeme_cli.media.upscale import COMPONENT, TILE_PAD, WHOLE_FRAME, WEIGHTS_FILE, Upscaler, load_rrdbnet, load_upscaler, read_rrdbnet_state
from hellomeme_cli.media.video import probe_video, read_frames, read_image
from test_pasteback import oval_landmarks, smooth_picture

FAST = ["--size", "128", "--steps", "2"]
runner = CliRunner()


def tiny_network(seed: int = 0, **shape) -> RRDBNet:
    torch.manual_seed(seed)
    return RRDBNet(**{"scale": 2, "num_feat": 8, "num_block": 1, "num_grow_ch": 4, **shape}).eval()


def noise(height: int, width: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def released(tmp_path) -> Path:
    """A tiny network saved as RealESRGAN_x2plus.pth is: tensors under params_ema."""
    path = tmp_path / WEIGHTS_FILE
    torch.save({"params_ema": tiny_network().state_dict()}, path)
    return path


class Payload:
    """Stands for the code a pickle can carry."""


def test_the_released_layout_loads_with_its_shape_read_from_the_file(released):
    model = load_rrdbnet(released)
    assert RRDBNet.shape_of(model.state_dict()) == {"num_in_ch": 3, "num_out_ch": 3, "scale": 2, "num_feat": 8, "num_block": 1, "num_grow_ch": 4}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_network().state_dict().values()))


def test_a_pickle_that_needs_code_is_refused_in_one_line(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"params_ema": tiny_network().state_dict(), "extra": Payload()}, path)
    with pytest.raises(HellomemeError) as error:
        load_rrdbnet(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message and "Payload" in message and "pickle" in message


def test_safetensors_give_the_same_network(tmp_path, released):
    save_file(tiny_network().state_dict(), tmp_path / "x2.safetensors")
    frame = noise(20, 24)
    assert np.array_equal(Upscaler(load_rrdbnet(tmp_path / "x2.safetensors")).upscale(frame), Upscaler(load_rrdbnet(released)).upscale(frame))


def test_a_file_of_another_network_is_refused(tmp_path):
    save_file({"conv_first.weight": torch.zeros(8, 12, 3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(HellomemeError, match="other.safetensors: not an RRDBNet"):
        load_rrdbnet(tmp_path / "other.safetensors")


@pytest.mark.parametrize(("height", "width", "tile"), [(61, 77, 32), (90, 50, 24)])
def test_tiles_with_enough_context_give_the_whole_frame(height, width, tile):
    """Odd sizes (the mod padding), tiles that do not divide the frame: with a tile_pad wider than
    the tiny network's receptive field (about 40 input pixels) every tile sees what the whole
    frame does, so only float rounding may differ."""
    model = tiny_network()
    frame = noise(height, width)
    whole = Upscaler(model, tile=0).upscale(frame).astype(int)
    tiled = Upscaler(model, tile=tile, tile_pad=48).upscale(frame).astype(int)
    assert whole.shape == (2 * height, 2 * width, 3)
    assert np.abs(whole - tiled).max() <= 1 and (whole != tiled).mean() < 1e-3
    seams = Upscaler(model, tile=tile, tile_pad=2).upscale(frame).astype(int)
    assert (seams != whole).mean() > 0.01  # the context is what makes them equal


def test_frames_are_whole_up_to_512_pixels_as_official_and_tiled_above():
    """The default: a 512 frame (the app's size) in one piece, as the official app computes it; a
    larger one in tiles no larger than WHOLE_FRAME + 2 TILE_PAD pixels a side, so memory stays bounded."""
    model = tiny_network()
    sides = []
    model.conv_first.register_forward_hook(lambda module, inputs, output: sides.append(max(inputs[0].shape[2:]) * 2))
    assert Upscaler(model).upscale(noise(512, 512)).shape == (1024, 1024, 3)
    assert len(sides) == 1
    sides.clear()
    assert Upscaler(model).upscale(noise(640, 576)).shape == (1280, 1152, 3)
    assert len(sides) == 4 and max(sides) <= WHOLE_FRAME + 2 * TILE_PAD


def test_outscale_resizes_to_the_asked_size():
    output = Upscaler(tiny_network(), outscale=1.5, tile=0).upscale(noise(30, 40))
    assert output.shape == (45, 60, 3) and output.dtype == np.uint8


def test_frames_are_streamed():
    upscaler = Upscaler(tiny_network(), tile=0)
    asked = []

    def endless():
        for index in itertools.count():
            asked.append(index)
            yield noise(16, 16, index)

    enlarged = list(itertools.islice(upscaler(endless()), 2))
    assert [frame.shape for frame in enlarged] == [(32, 32, 3)] * 2 and asked == [0, 1]


def test_paste_back_blends_frames_twice_the_working_size():
    picture = smooth_picture(900, 700)
    crop, landmarks = SquareCrop(130, 30, 600, 600, 256), oval_landmarks((430, 360), 75, 100)
    generated = np.roll(crop.apply(picture), 7, axis=1)
    once, twice = PasteBack(picture, crop, landmarks), PasteBack(picture, crop, landmarks, frame_scale=2)
    big = np.asarray(np.kron(generated, np.ones((2, 2, 1))), dtype=np.uint8)
    pasted = twice.paste(big)
    assert pasted.shape == picture.shape
    assert np.array_equal(pasted[twice.alpha == 0], picture[twice.alpha == 0])
    assert np.abs(pasted.astype(int) - once.paste(generated)).mean() < 1.0  # the same frame, only larger
    with pytest.raises(ValueError, match="512, 512, 3"):
        twice.paste(generated)


def test_the_upscaler_weights_are_required_only_with_upscale_2(tmp_path):
    asked = []

    class Cache:
        def require(self, names):
            asked.append(list(names))
            raise HellomemeError("stop here")

    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip")
    for scale in (1, 2):
        with pytest.raises(HellomemeError, match="stop here"):
            prepare_run(reference, clip, tmp_path / "out.mp4", AnimateSettings(upscale=scale), mode="video", cache=Cache())
    assert COMPONENT not in asked[0] and asked[1] == [*asked[0], COMPONENT]


def test_upscale_takes_1_or_2():
    with pytest.raises(HellomemeError, match="--upscale must be one of 1, 2"):
        AnimateSettings(upscale=3)


def test_make_tiny_writes_the_released_layout(tiny_cache):
    path = tiny_cache / COMPONENT / WEIGHTS_FILE
    assert list(torch.load(path, weights_only=True)) == ["params_ema"]
    assert read_rrdbnet_state(path).keys() == tiny_network().state_dict().keys()
    assert load_upscaler(tiny_cache / COMPONENT).upscale(noise(16, 16)).shape == (32, 32, 3)


def test_animate_and_image_with_upscale_2_are_twice_the_size(workdir):
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip")
    result = runner.invoke(app, ["animate", str(reference), str(clip), *FAST, "--max-frames", "3", "--upscale", "2", "-o", "big.mp4"])
    assert result.exit_code == 0, result.output
    info = probe_video(workdir / "big.mp4")
    assert (info.width, info.height, info.frame_count) == (256, 256, 3) and info.has_audio
    assert len(list(read_frames(workdir / "big.mp4"))) == 3

    result = runner.invoke(app, ["image", str(reference), str(reference), *FAST, "--upscale", "2", "-o", "big.png"])
    assert result.exit_code == 0, result.output
    assert read_image(workdir / "big.png").shape == (256, 256, 3)


def test_paste_back_after_upscale_keeps_the_picture_size(workdir):
    reference, clip = require(MEDIA / "cg1.jpg", "1024 portrait"), require(MEDIA / "qie.mp4", "clip")
    result = runner.invoke(app, ["animate", str(reference), str(clip), *FAST, "--max-frames", "2", "--upscale", "2", "--paste-back", "-o", "pasted.mp4"])
    assert result.exit_code == 0, result.output
    info = probe_video(workdir / "pasted.mp4")
    assert (info.width, info.height, info.frame_count) == (1024, 1024, 2)
