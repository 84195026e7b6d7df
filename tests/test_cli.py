"""The command line's skeleton: version, help, info."""

from __future__ import annotations

import re
import subprocess
import sys

from typer.testing import CliRunner

from hellomeme_cli import __version__
from hellomeme_cli.cli import app
from hellomeme_cli.pipeline import AnimateSettings

runner = CliRunner()


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"hellomeme {__version__}"


def help_rows(*command: str) -> dict[str, str | None]:
    """The `--help` of a command as {first word of each row: its shown default or None}: options
    under their long name, commands and arguments under their name."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    rows = {}
    for line in result.stdout.splitlines():
        row = re.match(r"│ (?:\*\s+)?([\w-]+)(?:\s+-\w\b)?.*?(?:\[default: ([^\]]+)\])?\s*│$", line)
        if row:
            rows[row[1]] = row[2]
    return rows


def test_help_lists_every_command_and_no_other():
    assert set(help_rows()) == {"--version", "--help", "info", "animate", "image", "batch", "track", "weights"}
    assert set(help_rows("weights")) == {"--help", "list", "fetch", "verify", "import", "lock", "make-tiny"}


def test_animate_help_lists_the_generation_options_with_the_library_defaults():
    settings = AnimateSettings()
    defaults = {
        "--steps": settings.steps, "--guidance": settings.guidance, "--trans-ratio": settings.trans_ratio,
        "--window": settings.window, "--overlap": settings.overlap, "--face-index": settings.face_index,
        "--size": settings.size, "--control": settings.models.control, "--dtype": settings.models.dtype,
        "--device": settings.models.device, "--crop": "crop", "--smooth": "smooth", "--paste-back": "no-paste-back",
    }
    assert settings.crop and settings.smoothing and not settings.paste_back
    without_default = {
        "--output", "--seed", "--fps", "--max-frames", "--prompt", "--negative-prompt", "--checkpoint", "--lora", "--vae",
        "--compile", "--low-memory", "--channels-last",
    }
    rows = help_rows("animate")
    assert {"reference", "drive", "--force", "--help"} | without_default | set(defaults) == set(rows)
    assert {option: rows[option] for option in defaults} == {option: str(value) for option, value in defaults.items()}
    assert all(rows[option] is None for option in without_default)
    shared = set(defaults) - {"--device"}  # batch has --devices
    for command in ("image", "batch"):  # the same options, built by the same function
        other = help_rows(command)
        assert {option: other.get(option, "absent") for option in shared} == {option: rows[option] for option in shared}


def test_info_names_torch_and_devices():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0
    assert "torch" in result.stdout and "cpu" in result.stdout


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "hellomeme_cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout
