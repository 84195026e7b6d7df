"""The models stage: devices and dtypes, early option checks, and the official "x1" recipe for
swapped checkpoints and LoRAs (which networks share weights and which do not)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hellomeme_cli.checkpoints import load_sd15, save_original_layout
from hellomeme_cli.engine import ModelOptions, check_options, load_models, resolve_device, resolve_dtype
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.weights import WeightCache
from test_checkpoints import kohya_lora


def test_auto_device_and_dtype_on_this_machine():
    device = resolve_device("auto")
    assert device.type in ("cuda", "mps", "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", device) == torch.bfloat16


@pytest.mark.parametrize(
    "options, message",
    [
        (ModelOptions(device="cuda:9"), "not available"),
        (ModelOptions(device="tpu"), "unknown device"),
        (ModelOptions(dtype="float8"), "unknown dtype"),
        (ModelOptions(control="audio"), "unknown control"),
        (ModelOptions(checkpoint="/nowhere/model.safetensors"), "checkpoint not found"),
        (ModelOptions(loras=((Path("/nowhere/style.safetensors"), 1.0),)), "LoRA not found"),
        (ModelOptions(vae=Path(__file__)), "not a weight file for the VAE"),
    ],
)
def test_bad_options_are_refused_before_loading(options, message):
    with pytest.raises(HellomemeError, match=message):
        check_options(options)


def test_hub_checkpoint_that_cannot_be_downloaded_is_one_line(tmp_path):
    """A repo id goes to the Hugging Face hub; here the endpoint is a closed local port."""
    code = (
        "from pathlib import Path\n"
        "from hellomeme_cli.engine import resolve_checkpoint\n"
        "from hellomeme_cli.weights import WeightCache\n"
        f"resolve_checkpoint('someone/realistic-model', WeightCache(Path({str(tmp_path)!r})))\n"
    )
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "HellomemeError: cannot download checkpoint someone/realistic-model from Hugging Face" in result.stderr


def _weights(module: torch.nn.Module) -> torch.Tensor:
    return module.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight


def test_plain_sd15_is_one_unet_for_reference_net_and_both_stages(tiny_cache):
    models = load_models(ModelOptions(), WeightCache(tiny_cache))
    assert models.reference_net.unet is models.denoiser_2d.unet
    assert _weights(models.denoiser_motion.unet) is _weights(models.denoiser_2d.unet)
    assert models.vae_encoder is models.vae_decoder and models.text_encoder is models.reference_text_encoder
    assert models.image_encoder is not None and models.fan_encoder is None


def test_lora_goes_to_both_stages_but_not_the_reference_net(tiny_cache, tmp_path):
    save_file(kohya_lora(load_sd15(tiny_cache / "sd15")), tmp_path / "style.safetensors")
    models = load_models(ModelOptions(loras=((tmp_path / "style.safetensors", 1.0),)), WeightCache(tiny_cache))
    base = load_sd15(tiny_cache / "sd15")
    layer = "up_blocks.1.attentions.1.proj_out"
    assert torch.equal(models.reference_net.unet.get_submodule(layer).weight, base.unet.get_submodule(layer).weight)
    assert not torch.equal(models.denoiser_2d.unet.get_submodule(layer).weight, base.unet.get_submodule(layer).weight)
    assert models.denoiser_motion.unet.get_submodule(layer).weight is models.denoiser_2d.unet.get_submodule(layer).weight
    prompt = models.encode_prompt("a portrait")
    assert not torch.equal(prompt.positive, prompt.reference)


def test_checkpoint_replaces_only_the_motion_unet_and_the_decoder(tiny_cache, tmp_path):
    community = load_sd15(tiny_cache / "sd15")
    for parameter in [*community.unet.parameters(), *community.vae.parameters()]:
        parameter.data.mul_(1.1)
    save_original_layout(community, tmp_path / "community.safetensors")
    models = load_models(ModelOptions(checkpoint=str(tmp_path / "community.safetensors")), WeightCache(tiny_cache))
    base = load_sd15(tiny_cache / "sd15")
    assert torch.equal(_weights(models.denoiser_2d.unet), _weights(base.unet))
    torch.testing.assert_close(_weights(models.denoiser_motion.unet), _weights(community.unet))
    torch.testing.assert_close(models.vae_decoder.decoder.conv_out.weight, community.vae.decoder.conv_out.weight)
    assert torch.equal(models.vae_encoder.encoder.conv_in.weight, base.vae.encoder.conv_in.weight)
