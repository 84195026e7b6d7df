"""Loading SD1.5 from a diffusers folder or a civitai-style single file, with a VAE and LoRAs,
all offline, on tiny random-weight models."""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from hellomeme_cli.weights.checkpoints import SD15Components, load_sd15, parse_lora_option
from sd15_layout import save_original_layout
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.weights.tiny import tiny_vae, write_sd15

UNET_LAYERS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.1.attentions.1.proj_out")
# A whole attention: diffusers cannot tell the format of a kohya text-encoder LoRA without an out_proj.
TEXT_LAYERS = tuple(f"encoder.layers.1.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "out_proj"))
TEXT_LAYER = TEXT_LAYERS[2]


@dataclass
class PickledSettings:
    """Stands for the training objects (hyperparameters, callbacks) that old .ckpt files carry."""

    learning_rate: float = 1e-4


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail a test whose loading tries to connect anywhere, even if a library swallows the error."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert attempts == []


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_sd15(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory) -> SD15Components:
    """Other weights of the same architecture, standing for a community fine-tune."""
    return load_sd15(write_tiny_sd15(tmp_path_factory.mktemp("fine_tune"), seed=1))


@pytest.fixture(scope="module")
def single_file(fine_tune, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("civitai") / "fine_tune.safetensors"
    save_original_layout(fine_tune, path)
    return path


def write_tiny_sd15(folder: Path, seed: int = 0, variant: str | None = None, **unet_shape: int) -> Path:
    """A tiny SD1.5 folder whose weights depend on `seed` only (full precision unless a variant is asked)."""
    torch.manual_seed(seed)
    return write_sd15(folder, variant=variant, **unet_shape)


def outputs(components: SD15Components) -> dict[str, torch.Tensor]:
    """Each model run on a fixed input."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 7, 32, generator=generator)
    tokens = components.tokenizer(["a photo of hi"], padding="max_length", max_length=12, return_tensors="pt").input_ids
    with torch.no_grad():
        return {
            "unet": components.unet(sample, 10, encoder_hidden_states=context).sample,
            "vae": components.vae.decode(sample[:, :, :8, :8]).sample,
            "text_encoder": components.text_encoder(tokens).last_hidden_state,
        }


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.keys() == b_state.keys()
    assert [k for k in a_state if not torch.equal(a_state[k], b_state[k])] == []


def assert_one_line_error(error: pytest.ExceptionInfo, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_base_folder_loads_plain_and_fp16_file_names(tmp_path, variant):
    base = write_tiny_sd15(tmp_path, variant=variant)
    components = load_sd15(base)
    suffix = ".fp16.safetensors" if variant else ".safetensors"
    saved = load_file(base / "unet" / f"diffusion_pytorch_model{suffix}")
    assert saved.keys() == components.unet.state_dict().keys()
    assert all(torch.equal(v.float(), components.unet.state_dict()[k]) for k, v in saved.items())
    assert {p.dtype for p in components.text_encoder.parameters()} == {torch.float32}
    assert components.tokenizer("hi").input_ids[1] == components.tokenizer.convert_tokens_to_ids("hi</w>")


def test_dtype_is_applied(base):
    components = load_sd15(base, dtype=torch.float16)
    for model in (components.unet, components.vae, components.text_encoder):
        assert {p.dtype for p in model.parameters()} == {torch.float16}


@pytest.mark.parametrize("layers_per_block, cross_attention_blocks", [(1, 1), (2, 2)])
def test_original_layout_round_trips_exactly(tmp_path, layers_per_block, cross_attention_blocks):
    base = write_tiny_sd15(
        tmp_path / "base", layers_per_block=layers_per_block, cross_attention_blocks=cross_attention_blocks
    )
    source = load_sd15(base)
    save_original_layout(source, tmp_path / "model.safetensors")
    converted = load_sd15(base, checkpoint=tmp_path / "model.safetensors")
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(source, part), getattr(converted, part))


def test_single_file_gives_the_models_it_was_made_from(base, fine_tune, single_file):
    loaded = load_sd15(base, checkpoint=single_file)
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(fine_tune, part), getattr(loaded, part))
    # Not bit-equal: CPU matmuls round differently with the tensors' memory alignment.
    torch.testing.assert_close(outputs(loaded), outputs(fine_tune))
    assert not torch.allclose(outputs(load_sd15(base))["unet"], outputs(loaded)["unet"])


def test_ckpt_in_state_dict_wrapper_loads(base, fine_tune, single_file, tmp_path):
    torch.save({"state_dict": load_file(single_file), "global_step": 1000}, tmp_path / "fine_tune.ckpt")
    loaded = load_sd15(base, checkpoint=tmp_path / "fine_tune.ckpt")
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(fine_tune, part), getattr(loaded, part))


def test_unet_only_file_takes_vae_and_text_encoder_from_base(base, fine_tune, single_file, tmp_path):
    unet_only = {k: v for k, v in load_file(single_file).items() if k.startswith("model.diffusion_model.")}
    save_file(unet_only, tmp_path / "unet_only.safetensors")
    loaded, base_models = load_sd15(base, checkpoint=tmp_path / "unet_only.safetensors"), load_sd15(base)
    assert_same_weights(fine_tune.unet, loaded.unet)
    assert_same_weights(base_models.vae, loaded.vae)
    assert_same_weights(base_models.text_encoder, loaded.text_encoder)


def test_diffusers_folder_with_only_a_unet_takes_the_rest_from_base(base, tmp_path):
    other = write_tiny_sd15(tmp_path / "other", seed=1)
    shutil.copytree(other / "unet", tmp_path / "fine_tune" / "unet")
    loaded, base_models = load_sd15(base, checkpoint=tmp_path / "fine_tune"), load_sd15(base)
    assert_same_weights(load_sd15(other).unet, loaded.unet)
    assert_same_weights(base_models.vae, loaded.vae)


def test_ckpt_with_python_objects_is_refused(base, single_file, tmp_path):
    torch.save({"state_dict": load_file(single_file), "hyper_parameters": PickledSettings()}, tmp_path / "trained.ckpt")
    with pytest.raises(HellomemeError) as error:
        load_sd15(base, checkpoint=tmp_path / "trained.ckpt")
    assert_one_line_error(error, "trained.ckpt", "PickledSettings", "weights_only=True")


@pytest.mark.parametrize(
    "name, tensors, words",
    [
        (
            "realvisxl.safetensors",
            {"conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(6, 2)},
            ["SDXL", "SD1.5"],
        ),
        (
            "xl_unet.safetensors",
            {
                "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(64, 2048),
            },
            ["SDXL", "2048-d"],
        ),
        ("sd21.safetensors", {"cond_stage_model.model.token_embedding.weight": torch.zeros(10, 4)}, ["SD2"]),
        (
            "inpaint.safetensors",
            {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)},
            ["inpainting", "9 input channels"],
        ),
        ("style.safetensors", {"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4)}, ["LoRA", "--lora"]),
        ("vae-ft-mse.safetensors", {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, ["VAE", "--vae"]),
        (
            "diffusion_pytorch_model.safetensors",
            {"conv_in.weight": torch.zeros(32, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(32, 32, 3, 3)},
            ["diffusers layout", "folder"],
        ),
        ("random.safetensors", {"weights": torch.zeros(3)}, ["not an SD1.5 checkpoint", "'weights'"]),
    ],
)
def test_files_of_other_kinds_are_refused_by_name(base, tmp_path, name, tensors, words):
    save_file(tensors, tmp_path / name)
    with pytest.raises(HellomemeError) as error:
        load_sd15(base, checkpoint=tmp_path / name)
    assert_one_line_error(error, name, *words)


@pytest.mark.parametrize("name", ["broken.safetensors", "broken.ckpt", "broken.pt"])
def test_damaged_files_are_refused_by_name(base, single_file, tmp_path, name):
    (tmp_path / name).write_bytes(single_file.read_bytes()[:5000] if name.endswith(".safetensors") else b"not a pickle")
    with pytest.raises(HellomemeError) as error:
        load_sd15(base, checkpoint=tmp_path / name)
    assert_one_line_error(error, name)


def test_folder_of_another_family_is_refused(base, tmp_path):
    (tmp_path / "sdxl" / "unet").mkdir(parents=True)
    (tmp_path / "sdxl" / "unet" / "config.json").write_text('{"cross_attention_dim": 2048, "in_channels": 4}')
    with pytest.raises(HellomemeError) as error:
        load_sd15(base, checkpoint=tmp_path / "sdxl")
    assert_one_line_error(error, "sdxl", "SDXL")


def test_missing_checkpoint_is_refused(base, tmp_path):
    with pytest.raises(HellomemeError) as error:
        load_sd15(base, checkpoint=tmp_path / "nowhere.safetensors")
    assert_one_line_error(error, "nowhere.safetensors", "not found")


# VAE -------------------------------------------------------------------------------------------


VAE_FORMS = [
    "original.safetensors",
    "prefixed.safetensors",
    "diffusers.safetensors",
    "original.pt",
    "vae_folder",
    "model_folder",
]


def write_vae_forms(vae: AutoencoderKL, folder: Path, fine_tune: SD15Components) -> None:
    """`vae` in every form a user may pass to --vae, under the names in VAE_FORMS."""
    with_vae = SD15Components(fine_tune.unet, vae, fine_tune.text_encoder, fine_tune.tokenizer)
    save_original_layout(with_vae, folder / "all.safetensors")
    prefixed = {k: v for k, v in load_file(folder / "all.safetensors").items() if k.startswith("first_stage_model.")}
    original = {k.removeprefix("first_stage_model."): v for k, v in prefixed.items()}
    save_file(original, folder / "original.safetensors")
    save_file(prefixed, folder / "prefixed.safetensors")
    save_file(vae.state_dict(), folder / "diffusers.safetensors")
    torch.save({"state_dict": original}, folder / "original.pt")
    vae.save_pretrained(folder / "vae_folder")
    vae.save_pretrained(folder / "model_folder" / "vae")


@pytest.mark.parametrize("form", VAE_FORMS)
def test_vae_option_replaces_the_vae(base, fine_tune, tmp_path, form):
    torch.manual_seed(2)
    vae = tiny_vae().eval()
    write_vae_forms(vae, tmp_path, fine_tune)
    loaded = load_sd15(base, vae=tmp_path / form)
    assert_same_weights(vae, loaded.vae)
    assert_same_weights(load_sd15(base).unet, loaded.unet)


# LoRA ------------------------------------------------------------------------------------------


def kohya_lora(components: SD15Components, rank: int = 2, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """Random up/down pairs on two UNet layers (one 1x1 convolution) and a text-encoder attention,
    named as kohya's sd-scripts name them."""
    generator = torch.Generator().manual_seed(3)
    unet_modules, text_modules = dict(components.unet.named_modules()), dict(components.text_encoder.named_modules())
    layers = [("lora_unet_", name, unet_modules[name]) for name in UNET_LAYERS]
    layers += [("lora_te_text_model_", name, text_modules[name]) for name in TEXT_LAYERS]
    lora = {}
    for prefix, name, module in layers:
        weight = module.weight
        key = prefix + name.replace(".", "_")
        kernel = weight.shape[2:]
        lora[f"{key}.lora_down.weight"] = torch.randn(rank, weight.shape[1], *kernel, generator=generator)
        lora[f"{key}.lora_up.weight"] = torch.randn(weight.shape[0], rank, *kernel, generator=generator)
        lora[f"{key}.alpha"] = torch.tensor(alpha)
    return lora


def peft_lora(kohya: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same LoRA as diffusers saves it (no alpha: it is folded into the up weights)."""
    names = {"lora_unet_" + n.replace(".", "_"): "unet." + n for n in UNET_LAYERS}
    names.update({"lora_te_text_model_" + n.replace(".", "_"): "text_encoder.text_model." + n for n in TEXT_LAYERS})
    lora = {}
    for kohya_name, name in names.items():
        down, up = kohya[f"{kohya_name}.lora_down.weight"], kohya[f"{kohya_name}.lora_up.weight"]
        lora[f"{name}.lora_A.weight"] = down
        lora[f"{name}.lora_B.weight"] = up * kohya[f"{kohya_name}.alpha"] / down.shape[0]
    return lora


@pytest.mark.parametrize("form", ["kohya", "peft"])
def test_lora_is_fused_with_its_scale(base, tmp_path, form):
    plain = load_sd15(base)
    lora = kohya_lora(plain, rank=2, alpha=1.0)
    save_file(peft_lora(lora) if form == "peft" else lora, tmp_path / "style.safetensors")

    fused = load_sd15(base, loras=[(tmp_path / "style.safetensors", 0.7)])

    layer = "lora_unet_" + UNET_LAYERS[1].replace(".", "_")
    up, down = lora[f"{layer}.lora_up.weight"].flatten(1), lora[f"{layer}.lora_down.weight"].flatten(1)
    before = plain.unet.get_submodule(UNET_LAYERS[1]).weight
    after = fused.unet.get_submodule(UNET_LAYERS[1]).weight
    torch.testing.assert_close(after - before, (0.7 * 1.0 / 2 * up @ down).reshape(before.shape))
    text_before = plain.text_encoder.get_submodule(TEXT_LAYER).weight
    assert not torch.equal(text_before, fused.text_encoder.get_submodule(TEXT_LAYER).weight)
    assert not torch.equal(outputs(plain)["unet"], outputs(fused)["unet"])
    for model in (fused.unet, fused.text_encoder):
        assert [name for name, _ in [*model.named_modules(), *model.named_parameters()] if "lora" in name.lower()] == []
        assert {type(m).__module__.split(".")[0] for m in model.modules()} <= {"torch", "diffusers", "transformers"}


def test_conv_lora_equals_running_its_down_and_up_convolutions(base, tmp_path):
    """A LoCon LoRA on a 3x3 convolution: its down convolution keeps the kernel."""
    plain = load_sd15(base)
    layer = "down_blocks.0.resnets.0.conv1"
    conv = plain.unet.get_submodule(layer)
    generator = torch.Generator().manual_seed(4)
    down = torch.randn(2, conv.in_channels, 3, 3, generator=generator)
    up = torch.randn(conv.out_channels, 2, 1, 1, generator=generator)
    key = "lora_unet_" + layer.replace(".", "_")
    lora = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(4.0)}
    save_file(lora, tmp_path / "locon.safetensors")

    fused = load_sd15(base, loras=[(tmp_path / "locon.safetensors", 0.5)]).unet.get_submodule(layer)

    x = torch.randn(1, conv.in_channels, 8, 8, generator=generator)
    with torch.no_grad():
        lora_branch = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=1), up)
        torch.testing.assert_close(fused(x), conv(x) + 0.5 * 4.0 / 2 * lora_branch, rtol=1e-4, atol=1e-4)


def test_lora_at_scale_zero_changes_nothing(base, tmp_path):
    plain = load_sd15(base)
    save_file(kohya_lora(plain), tmp_path / "style.safetensors")
    fused = load_sd15(base, loras=[(tmp_path / "style.safetensors", 0.0)])
    assert_same_weights(plain.unet, fused.unet)
    assert_same_weights(plain.text_encoder, fused.text_encoder)


def test_lora_matching_nothing_is_refused(base, tmp_path):
    layer = "lora_unet_input_blocks_4_1_proj_in"  # SDXL LoRAs use the original layer names
    save_file(
        {f"{layer}.lora_down.weight": torch.zeros(2, 8), f"{layer}.lora_up.weight": torch.zeros(8, 2)},
        tmp_path / "xl_style.safetensors",
    )
    with pytest.raises(HellomemeError) as error:
        load_sd15(base, loras=[(tmp_path / "xl_style.safetensors", 1.0)])
    assert_one_line_error(error, "xl_style.safetensors", "not a LoRA for this SD1.5", "down_blocks.4.1.proj_in")


def test_lora_of_another_shape_is_refused(base, tmp_path):
    key = "lora_unet_" + UNET_LAYERS[0].replace(".", "_")
    lora = {f"{key}.lora_down.weight": torch.zeros(2, 2048), f"{key}.lora_up.weight": torch.zeros(32, 2)}
    save_file(lora, tmp_path / "xl.safetensors")
    with pytest.raises(HellomemeError) as error:
        load_sd15(base, loras=[(tmp_path / "xl.safetensors", 1.0)])
    assert_one_line_error(error, "xl.safetensors", "not a LoRA for this SD1.5", "[2, 2048]", "[2, 32]")


def test_lora_of_another_format_is_refused(base, tmp_path):
    key = "lora_unet_" + UNET_LAYERS[0].replace(".", "_")
    save_file({f"{key}.hada_w1_a": torch.zeros(32, 2), f"{key}.hada_w1_b": torch.zeros(2, 32)}, tmp_path / "loha.safetensors")
    with pytest.raises(HellomemeError) as error:
        load_sd15(base, loras=[(tmp_path / "loha.safetensors", 1.0)])
    assert_one_line_error(error, "loha.safetensors", "LoHa", "hada_w1_a")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("style.safetensors", (Path("style.safetensors"), 1.0)),
        ("style.safetensors:0.6", (Path("style.safetensors"), 0.6)),
        ("dir/style.safetensors:-1", (Path("dir/style.safetensors"), -1.0)),
        (r"C:\loras\style.safetensors", (Path(r"C:\loras\style.safetensors"), 1.0)),
        (r"C:\loras\style.safetensors:.5", (Path(r"C:\loras\style.safetensors"), 0.5)),
    ],
)
def test_parse_lora_option(value, expected):
    assert parse_lora_option(value) == expected


@pytest.mark.parametrize("value", ["style.safetensors:strong", "style.safetensors:", ":0.5", "style.safetensors:nan"])
def test_parse_lora_option_refuses_bad_scales(value):
    with pytest.raises(HellomemeError) as error:
        parse_lora_option(value)
    assert_one_line_error(error, value)


def test_parse_lora_option_keeps_the_colons_of_an_existing_file(tmp_path):
    path = tmp_path / "style:v2.safetensors"
    path.touch()
    assert parse_lora_option(str(path)) == (path, 1.0)
