"""`hellomeme comfyui install COMFYUI_DIR`: writes ComfyUI's `custom_nodes/hellomeme/`, a loader of the
nodes from the hellomeme-cli package installed in ComfyUI's Python (so upgrading the package
upgrades the nodes, and nothing is installed when ComfyUI imports them) and the example workflows,
which ComfyUI's Templates menu lists; `--remove` takes that folder away again."""

from __future__ import annotations

import shutil
from pathlib import Path

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.media.files import write_atomically

PACK = "hellomeme"  # the folder in custom_nodes, and so the name ComfyUI's Templates menu shows
MARK = "Written by `hellomeme comfyui install`"
EXAMPLES = Path(__file__).with_name("example_workflows")
LOADER = f'''"""{MARK}: hellomeme's ComfyUI nodes, from the hellomeme-cli package of the Python ComfyUI runs in."""

try:
    from hellomeme_cli.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as error:
    raise ImportError(f"hellomeme's nodes need hellomeme-cli in ComfyUI's Python: python -m pip install hellomeme-cli ({{error}})") from error

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


def example_workflows(api_format: bool = False) -> list[Path]:
    """The example workflows: in ComfyUI's saved-workflow format (what the Templates menu opens), or
    their API-format twins (`*_api.json`, what POST /prompt takes)."""
    return sorted(path for path in EXAMPLES.glob("*.json") if path.stem.endswith("_api") == api_format)


def install(comfyui: Path) -> list[Path]:
    """Write (or rewrite) `custom_nodes/hellomeme/` in the ComfyUI folder; returns the files written."""
    target = _custom_nodes(comfyui) / PACK
    _refuse_foreign(target)
    workflows = target / "example_workflows"
    workflows.mkdir(parents=True, exist_ok=True)
    written = [write_atomically(target / "__init__.py", LOADER)]
    # Copies, not links: ComfyUI serves the folder as static files, and aiohttp does not follow links out of it.
    shipped = example_workflows()
    for stale in set(workflows.glob("*.json")) - {workflows / path.name for path in shipped}:
        stale.unlink()
    written += [write_atomically(workflows / path.name, path.read_bytes()) for path in shipped]
    return written


def remove(comfyui: Path) -> Path:
    """Take `custom_nodes/hellomeme/` away; returns it."""
    target = _custom_nodes(comfyui) / PACK
    if not target.exists():
        raise HellomemeError(f"{target}: not there, nothing to remove")
    _refuse_foreign(target)
    shutil.rmtree(target)
    return target


def _custom_nodes(comfyui: Path) -> Path:
    """The custom_nodes folder of a ComfyUI checkout (made if missing) or of a --base-directory."""
    comfyui = Path(comfyui).expanduser()
    folder = comfyui / "custom_nodes"
    if folder.is_dir():
        return folder
    if (comfyui / "main.py").is_file():
        folder.mkdir()
        return folder
    raise HellomemeError(f"{comfyui}: not a ComfyUI folder (no main.py, no custom_nodes folder)")


def _refuse_foreign(target: Path) -> None:
    loader = target / "__init__.py"
    if target.exists() and not (loader.is_file() and MARK in loader.read_text(errors="replace")):
        raise HellomemeError(f"{target}: not written by `hellomeme comfyui install` (another pack?); move it away first")
