"""The package's layout: rooms whose imports go one way, with no circle between modules or rooms.

Every import counts, at module level, under TYPE_CHECKING or inside a function: a lazy import is
still a circle of rooms.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hellomeme_cli"
ROOMS = ("models", "media", "weights", "face", "samplers", "batch", "quality", "comfyui")
DOCS = PACKAGE.parent / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    parts = ("hellomeme_cli", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative / "__init__.py").exists()


def imports_of(path: Path) -> set[str]:
    """Every module of the package that `path` imports, anywhere in it."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("hellomeme_cli")}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) + "." if node.level else ""
            source = (base + (node.module or "")).strip(".")
            if not source.startswith("hellomeme_cli"):
                continue
            submodules = {f"{source}.{alias.name}" for alias in node.names if is_module(f"{source}.{alias.name}")}
            found |= submodules
            if len(submodules) < len(node.names):  # a name defined in `source` itself
                found.add(source)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) - {module_name(path)} for path in PACKAGE.rglob("*.py")}


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "hellomeme_cli"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        trail.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return trail[trail.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        trail.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walk_sees_lazy_and_type_checking_imports():
    edges = graph()
    assert "hellomeme_cli.batch.on_ray" in edges["hellomeme_cli.batch.run"]  # imported inside run_batch
    assert "hellomeme_cli.app" in edges["hellomeme_cli.cli"]  # imported inside the app command
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_itself_through_others():
    assert find_cycle(graph()) is None


def test_rooms_import_one_way():
    rooms: dict[str, set[str]] = {}
    for module, targets in graph().items():
        rooms.setdefault(room_of(module), set()).update(room_of(target) for target in targets if room_of(target) != room_of(module))
    assert find_cycle(rooms) is None
    assert not rooms["models"], "the networks import nothing else of the package"
    for low, high in [("models", "media"), ("media", "weights"), ("weights", "face"), ("face", "samplers"), ("samplers", "engine"), ("pipeline", "engine")]:
        assert high not in rooms.get(low, set()), f"{low} imports {high}"


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_says_what_lives_there_and_what_it_may_import(room):
    doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text()))
    assert doc and "May import:" in doc
    assert f"`{room}/`" in DOCS.read_text()


def test_the_architecture_page_lists_every_module():
    text = DOCS.read_text()
    listed = {name for name in re.findall(r"`([\w/]+\.py)`", text) if not name.startswith("tests/")}
    actual = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    listed.discard("__init__.py")
    assert listed == actual, f"missing from docs/architecture.md: {sorted(actual - listed)}; not in the package: {sorted(listed - actual)}"


def test_the_readme_layout_names_every_room_and_module_once_and_only_paths_that_exist():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("## Layout"):readme.index("## Licence")]
    first_cells = re.findall(r"^\| (`[^|]+`) \|", table, re.MULTILINE)
    paths = [path for cell in first_cells for path in re.findall(r"`([^`]+)`", cell)]
    assert len(paths) == len(set(paths)), "a path is listed twice"
    assert all((PACKAGE.parent / path).exists() for path in paths), [path for path in paths if not (PACKAGE.parent / path).exists()]
    top = {f"hellomeme_cli/{room}/" for room in ROOMS}
    top |= {f"hellomeme_cli/{path.name}" for path in PACKAGE.glob("*.py") if path.name != "__init__.py"}
    assert top <= set(paths), f"missing from the README's layout: {sorted(top - set(paths))}"
