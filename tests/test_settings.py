"""The one settings source: the CLI options, the CSV columns, the digest and the docs table come from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hellomeme_cli import cli
from hellomeme_cli.batch.jobs import ROW_OPTIONS
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.settings import AnimateSettings, ModelOptions, all_settings, digest_values, from_values, options_markdown
from hellomeme_cli.versions import VERSIONS

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _captured(monkeypatch, args: list[str]) -> AnimateSettings:
    """The settings `hellomeme animate` builds from `args` (stopped before any file is read)."""
    seen = {}

    def stop(reference, drive, output, force, settings, mode):
        seen["settings"], seen["mode"] = settings, mode
        raise HellomemeError("stopped")

    monkeypatch.setattr(cli, "_prepare_run", stop)
    result = CliRunner().invoke(cli.app, args)
    assert "settings" in seen, result.output
    return seen["settings"], seen["mode"]


def test_the_command_line_builds_the_settings_from_the_declarations(monkeypatch):
    settings, mode = _captured(
        monkeypatch,
        ["animate", "r.jpg", "d.mp4", "--steps", "7", "--no-smooth", "--lora", "a.safetensors:0.5", "--lora", "b.safetensors",
         "--control", "pdfgc", "--guidance", "1.5", "--device", "cpu", "--paste-back", "--compile"],
    )
    assert mode == "video"
    assert (settings.steps, settings.guidance, settings.smoothing, settings.paste_back) == (7, 1.5, False, True)
    assert settings.models.loras == ((Path("a.safetensors"), 0.5), (Path("b.safetensors"), 1.0))
    assert (settings.models.control, settings.models.device, settings.models.compile) == ("pdfgc", "cpu", True)
    default, _ = _captured(monkeypatch, ["animate", "r.jpg", "d.mp4"])
    assert default == AnimateSettings()


def test_version_defaults_come_from_the_registry_not_from_the_settings():
    settings = AnimateSettings()
    assert settings.models.version == "v2"  # the official app's video default
    defaults = VERSIONS["v2"].defaults
    assert settings.steps is None and settings.resolved("steps") == defaults.steps == 25
    assert settings.resolved("guidance") == defaults.guidance == 1.5
    assert (settings.resolved("window"), settings.resolved("overlap")) == (defaults.window, defaults.overlap)
    assert settings.models.control_kind.name == defaults.control == "pdfgc"
    assert AnimateSettings(steps=3).resolved("steps") == 3
    v1 = AnimateSettings(models=ModelOptions(version="v1"))
    assert (v1.resolved("guidance"), v1.models.control_kind.name) == (2.0, "pdfgc")


@pytest.mark.parametrize(("version", "name", "value"), [("v3", "overlap", 4), ("v4", "overlap", 1), ("v5", "window", 12), ("v5b", "overlap", 2)])
def test_a_setting_the_version_fixes_is_refused_in_one_line(version, name, value):
    with pytest.raises(HellomemeError, match=rf"^--{name} does not apply to HelloMeme {version}: its windows"):
        AnimateSettings(models=ModelOptions(version=version), **{name: value})
    assert AnimateSettings(models=ModelOptions(version=version)).resolved("window") == 12


def test_the_digest_follows_what_changes_the_output_only():
    base = AnimateSettings()
    same = [
        dataclasses.replace(base, models=dataclasses.replace(base.models, device="cuda:1", compile=True, low_memory=True, channels_last=True)),
        AnimateSettings(steps=25, guidance=1.5, window=12, overlap=4, models=ModelOptions(control="pdfgc")),
    ]
    other = [
        AnimateSettings(steps=3), AnimateSettings(seed=1), AnimateSettings(models=ModelOptions(control="blendshapes")),
        AnimateSettings(size=256), AnimateSettings(models=ModelOptions(version="v1")),
    ]
    assert all(digest_values(s) == digest_values(base) for s in same)
    assert all(digest_values(s) != digest_values(base) for s in other)


def test_csv_columns_are_the_per_clip_settings():
    assert set(ROW_OPTIONS) == {s.column for s in all_settings() if s.per_clip}
    assert {"steps", "seed", "control", "version", "lora", "smooth", "crop", "paste_back"} <= set(ROW_OPTIONS)
    assert not {"device", "compile", "low_memory", "channels_last"} & set(ROW_OPTIONS)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"steps": 0}, "--steps must be at least 1 (got 0)"),
        ({"guidance": 0.5}, "--guidance must be at least 1"),
        ({"fps": 0.0}, "--fps must be in (0, 240]"),
        ({"trans_ratio": 2.0}, "--trans-ratio must be in [0, 1]"),
        ({"size": 100}, "--size must be a multiple of 64"),
        ({"seed": -1}, "--seed must be in [0, 2^32)"),
        ({"overlap": 12}, "--overlap must be in [0, window) = [0, 12)"),
        ({"window": 4, "overlap": 4}, "--overlap must be in [0, window) = [0, 4)"),
        ({"control": "audio"}, "--control must be one of"),
        ({"version": "v0"}, "--version must be one of"),
        ({"dtype": "float8"}, "--dtype must be one of"),
        ({"colour": "red"}, "unknown setting(s) colour"),
    ],
)
def test_each_bad_value_is_one_line_naming_its_option(values, message):
    with pytest.raises(HellomemeError) as error:
        from_values(values)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_usage_page_holds_the_options_table_as_declared():
    usage = (PROJECT_ROOT / "docs" / "usage.md").read_text()
    assert options_markdown() in usage, "docs/usage.md is out of date: paste settings.options_markdown() into it"
