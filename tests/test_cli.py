"""The command line's skeleton: version, help, info."""

from __future__ import annotations

import re
import subprocess
import sys

from typer.testing import CliRunner

from hellomeme_cli import __version__
from hellomeme_cli.cli import app
from hellomeme_cli.settings import CLIP_ONLY, CLIP_OUTPUT, AnimateSettings, all_settings
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
    assert set(help_rows()) == {"--version", "--debug", "--help", "info", "animate", "demo", "image", "batch", "eval", "compare", "track", "app", "weights", "comfyui"}
    assert set(help_rows("weights")) == {"--help", "list", "fetch", "presets", "verify", "import", "lock", "make-tiny"}


def test_animate_help_lists_every_declared_setting_with_its_default():
    """The options and their shown defaults are the declarations of settings.py, the same on
    animate, image and batch; a picture has no clip-only options."""
    declared = {setting.flags[0].split("/")[0]: setting for setting in all_settings()}
    rows = help_rows("animate")
    assert set(rows) == {"REFERENCE", "DRIVE", "--output", "--force", "--help", *declared}
    assert {flag: rows[flag] for flag in declared} == {flag: setting.shown_default for flag, setting in declared.items()} | {
        "--version": DEFAULT_VIDEO_VERSION
    }
    assert declared["--steps"].default is None and AnimateSettings().resolved("steps") == VERSIONS[DEFAULT_VIDEO_VERSION].defaults.steps
    image, batch = help_rows("image"), help_rows("batch")
    assert image["--version"] == DEFAULT_IMAGE_VERSION
    clip_only = {declared[flag].flags[0].split("/")[0] for flag in declared if declared[flag].name in (*CLIP_ONLY, *CLIP_OUTPUT)}
    assert clip_only == {
        "--fps", "--max-frames", "--window", "--overlap", "--smooth", "--smooth-pose", "--smooth-expression",
        "--format", "--sticker", "--max-kb", "--quality", "--loop",  # how a clip is written; a picture's suffix says its format
    }
    assert not clip_only & set(image)
    for flag in set(declared) - {"--version"}:
        assert batch[flag] == rows[flag]
        assert flag in clip_only or image[flag] == rows[flag]


def test_help_shows_defaults_once_bracketed_and_switches_without_a_type():
    text = runner.invoke(app, ["animate", "--help"], env={"COLUMNS": "250"}).stdout
    assert "[default: (" not in text and "[default: the version's (25)]" in text
    assert re.search(r"│ --paste-back\s+Blend", text) and re.search(r"│ --steps\s+N\s+Denoising", text)


def _commands(group=None, path=()):
    """Every command line's words, the groups' own included (`()`, `("weights",)`, `("weights", "list")`, ...)."""
    import typer.main

    group = group or typer.main.get_command(app)
    yield path
    for name, command in getattr(group, "commands", {}).items():
        yield from _commands(command, (*path, name))


def test_help_reads_in_80_columns_in_panels_that_follow_the_data_flow():
    """No `<bool>` in any help, usage naming the arguments as `REFERENCE DRIVE`, and the run options of
    animate, image and batch in panels in the order of the data flow, each setting in its declared one."""
    from hellomeme_cli.settings import PANELS

    for words in _commands():
        text = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "80"}).stdout
        assert "<bool>" not in text and "{" not in text.splitlines()[1], (words, text)
        assert max(len(line) for line in text.splitlines()) <= 80, words
    for command, usage in (("animate", "REFERENCE DRIVE"), ("image", "REFERENCE DRIVE_IMAGE"), ("batch", "[INPUT_DIR]"), ("track", "DRIVE"), ("eval", "CLIP"), ("compare", "REFERENCE DRIVE")):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"}).stdout
        assert f"Usage: hellomeme {command} [OPTIONS] {usage}" in text
        panels = re.findall(r"╭─ (.+?) ─", text)
        assert panels[-1] == "Help" and "Options" not in panels, (command, panels)
        ours = [panel for panel in panels if panel in PANELS]
        assert ours == sorted(ours, key=PANELS.index), (command, panels)  # in the order of the data flow
        if command in ("animate", "batch"):
            assert ours == list(PANELS), (command, panels)
    sections = re.split(r"╭─ ", runner.invoke(app, ["animate", "--help"], env={"COLUMNS": "250"}).stdout)
    in_panel = {section.split(" ─")[0]: set(re.findall(r"│ (--[\w-]+)", section)) for section in sections[1:]}
    for setting in all_settings():
        assert setting.flags[0].split("/")[0] in in_panel[setting.panel], setting.name
    assert {"--output", "--force"} <= in_panel["Input and output"]


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


def test_info_says_whether_the_cpu_computes_bfloat16_natively(monkeypatch, tmp_path):
    """From the CPU's own report: an AMD EPYC with avx512_bf16, an Intel Xeon without, an Arm CPU with
    bf16, and a system without /proc/cpuinfo."""
    from hellomeme_cli import model_options

    reports = {
        "flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n": "native on this CPU (avx512_bf16): --dtype bfloat16 is faster than float32",
        "flags\t\t: fpu sse avx2 avx512f avx512_vnni\n": "not native on this CPU (no avx512_bf16, amx_bf16, bf16): --dtype bfloat16 is slower",
        "Features\t: fp asimd sve bf16 i8mm\n": "native on this CPU (bf16)",
        None: "unknown (no /proc/cpuinfo to tell)",
    }
    for report, said in reports.items():
        path = tmp_path / "cpuinfo"
        path.unlink(missing_ok=True)
        if report is not None:
            path.write_text("processor\t: 0\n" + report)
        monkeypatch.setattr(model_options, "CPU_REPORT", path)
        result = runner.invoke(app, ["info"])
        assert result.exit_code == 0 and said in result.stdout, result.stdout


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "hellomeme_cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout


HEAVY = ("torch", "diffusers", "transformers", "mediapipe", "cv2")


def modules_after(*command: str, cwd) -> tuple[int, str, set[str]]:
    """Exit code, stderr and which heavy libraries got imported, for one command line run in a fresh process."""
    script = (
        "import sys\nfrom hellomeme_cli.cli import main\nsys.argv = ['hellomeme', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as exit_:\n    code = exit_.code\n"
        f"print(code, *sorted(name for name in {HEAVY!r} if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, cwd=cwd)
    code, *imported = result.stdout.splitlines()[-1].split()
    return int(code), result.stderr, set(imported)


def test_bad_paths_are_answered_before_any_heavy_library_loads(tmp_path):
    """A mistyped path or a taken output is said at once: torch, diffusers, transformers, MediaPipe
    and OpenCV (seconds to import) are imported only once the inputs have passed."""
    (tmp_path / "ref.jpg").write_bytes(b"not checked yet")
    (tmp_path / "ref_clip_v2.mp4").write_bytes(b"")
    (tmp_path / "clip.mp4").write_bytes(b"")
    cases = {
        ("animate", "missing.jpg", "clip.mp4"): "missing.jpg: no such file",
        ("animate", "ref.jpg", "missing.mp4"): "missing.mp4: no such file",
        ("animate", "ref.jpg", "clip.mp4"): "ref_clip_v2.mp4: already exists",
        ("image", "ref.jpg", "missing.png"): "missing.png: no such file",
        ("animate", "ref.jpg", "clip.mp4", "--version", "v5c"): "v5c",
    }
    for command, message in cases.items():
        code, stderr, imported = modules_after(*command, cwd=tmp_path)
        assert code == 1 and message in stderr and len(stderr.strip().splitlines()) == 1, (command, stderr)
        assert imported == set(), (command, imported)
    assert modules_after("animate", "--help", cwd=tmp_path)[2] == set()
