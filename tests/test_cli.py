"""The command line's skeleton: version, help, info."""

from __future__ import annotations

import re
import subprocess
import sys

from typer.testing import CliRunner

from hellomeme_cli import __version__
from hellomeme_cli.cli import app
from hellomeme_cli.settings import AnimateSettings, all_settings
from hellomeme_cli.versions import DEFAULT_IMAGE_VERSION, DEFAULT_VIDEO_VERSION, VERSIONS

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
    assert set(help_rows()) == {"--version", "--debug", "--help", "info", "animate", "demo", "image", "batch", "track", "app", "weights"}
    assert set(help_rows("weights")) == {"--help", "list", "fetch", "presets", "verify", "import", "lock", "make-tiny"}


def test_animate_help_lists_every_declared_setting_with_its_default():
    """The options and their shown defaults are the declarations of settings.py, the same on
    animate, image and batch."""
    declared = {setting.flags[0].split("/")[0]: setting for setting in all_settings()}
    rows = help_rows("animate")
    assert set(rows) == {"reference", "drive", "--output", "--force", "--help", *declared}
    assert {flag: rows[flag] for flag in declared} == {flag: f"({setting.shown_default})" for flag, setting in declared.items()} | {
        "--version": f"({DEFAULT_VIDEO_VERSION})"
    }
    assert declared["--steps"].default is None and AnimateSettings().resolved("steps") == VERSIONS[DEFAULT_VIDEO_VERSION].defaults.steps
    image, batch = help_rows("image"), help_rows("batch")
    assert image["--version"] == f"({DEFAULT_IMAGE_VERSION})"
    for flag in set(declared) - {"--version"}:
        assert image[flag] == rows[flag]
        assert batch[flag] == rows[flag]


def test_info_names_torch_and_devices():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0
    assert "torch" in result.stdout and "cpu" in result.stdout
    assert "video: v1, v2, v3, v4, v5, v5b (default v2); image: v1, v2, v3, v4, v5, v5b, v5c (default v5)" in result.stdout


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "hellomeme_cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout
