"""The command line's skeleton: version, help, info."""

from __future__ import annotations

import re
import subprocess
import sys

from typer.testing import CliRunner

from hellomeme_cli import __version__
from hellomeme_cli.cli import CLIP_ONLY, app
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
    animate, image and batch; a picture has no clip-only options."""
    declared = {setting.flags[0].split("/")[0]: setting for setting in all_settings()}
    rows = help_rows("animate")
    assert set(rows) == {"reference", "drive", "--output", "--force", "--help", *declared}
    assert {flag: rows[flag] for flag in declared} == {flag: setting.shown_default for flag, setting in declared.items()} | {
        "--version": DEFAULT_VIDEO_VERSION
    }
    assert declared["--steps"].default is None and AnimateSettings().resolved("steps") == VERSIONS[DEFAULT_VIDEO_VERSION].defaults.steps
    image, batch = help_rows("image"), help_rows("batch")
    assert image["--version"] == DEFAULT_IMAGE_VERSION
    clip_only = {declared[flag].flags[0].split("/")[0] for flag in declared if declared[flag].name in CLIP_ONLY}
    assert clip_only == {"--fps", "--max-frames", "--window", "--overlap", "--smooth", "--smooth-pose", "--smooth-expression"}
    assert not clip_only & set(image)
    for flag in set(declared) - {"--version"}:
        assert batch[flag] == rows[flag]
        assert flag in clip_only or image[flag] == rows[flag]


def test_help_shows_defaults_once_bracketed_and_switches_without_a_type():
    text = runner.invoke(app, ["animate", "--help"], env={"COLUMNS": "250"}).stdout
    assert "[default: (" not in text and "[default: the version's (25)]" in text
    assert "<bool>" not in "".join(line for line in text.splitlines() if "--help" not in line)  # typer's own --help keeps it
    assert re.search(r"│ --paste-back\s+Blend", text) and re.search(r"│ --steps\s+<int>\s+Denoising", text)


def test_listing_into_a_closed_pipe_is_not_an_error():
    """`hellomeme weights list | head -1`: the reader leaving early ends the listing quietly, exit 0."""
    for command in (["weights", "list"], ["weights", "presets"]):
        process = subprocess.Popen([sys.executable, "-m", "hellomeme_cli", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert process.stdout.readline()
        process.stdout.close()
        assert process.wait(timeout=60) == 0 and process.stderr.read() == "", command


def test_info_names_torch_and_devices():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0
    assert "torch" in result.stdout and "cpu" in result.stdout
    assert "video: v1, v2, v3, v4, v5, v5b (default v2); image: v1, v2, v3, v4, v5, v5b, v5c (default v5)" in result.stdout


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "hellomeme_cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout
