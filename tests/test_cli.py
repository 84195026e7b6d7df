"""The command line's skeleton: version, help, info."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from hellomeme_cli import __version__
from hellomeme_cli.cli import app

runner = CliRunner()


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"hellomeme {__version__}"


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "info" in result.stdout


def test_info_names_torch_and_devices():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0
    assert "torch" in result.stdout and "cpu" in result.stdout


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "hellomeme_cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout


def test_bad_input_is_one_red_line_and_exit_code_1(tmp_path):
    env = {"HELLOMEME_HOME": str(tmp_path / "home")}
    missing = tmp_path / "nowhere.task"
    result = subprocess.run(
        [sys.executable, "-m", "hellomeme_cli", "weights", "import", str(missing)],
        capture_output=True, text=True, env={**os.environ, **env},
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {missing}: no such file or folder"
    assert "Traceback" not in result.stderr + result.stdout
