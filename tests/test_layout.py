"""The layout shows the design: no import cycles between sdstream's modules, and a loop that knows nothing of
files, model loading or a model's words."""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGE = ROOT / "sdstream"


def _module(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path, module_level_only: bool = True) -> set[str]:
    """The sdstream modules PATH imports (at module level, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            for alias in node.names:
                found.add(target + "." + alias.name if (PACKAGE.parent / (target + "." + alias.name).replace(
                    ".", "/")).with_suffix(".py").exists() else target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m == "sdstream" or m.startswith("sdstream.")}


def test_no_import_cycles():
    graph = {_module(p): imports(p) for p in PACKAGE.rglob("*.py")}
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_loop_knows_no_files_loading_or_vocabulary():
    loop = imports(PACKAGE / "core" / "loop.py", module_level_only=False)
    assert loop <= {"sdstream.core.schedulers", "sdstream.core.state", "sdstream.core.families"}, loop
    hooks = imports(PACKAGE / "core" / "hooks.py", module_level_only=False)
    assert hooks <= {"sdstream.core.loop", "sdstream.core.state", "sdstream.core.families.base", "sdstream.inputs",
                     "sdstream.masks", "sdstream.models.clip"}, hooks
    core = PACKAGE / "core"
    sources = [core / "loop.py", core / "hooks.py", *(core / "families").glob("*.py")]
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
             for path in sources for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)}
    assert not calls & {"open", "Path", "from_pretrained", "load_pipeline", "write_text", "save", "mkdir"}, calls
