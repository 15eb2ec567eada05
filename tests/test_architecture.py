"""The structure docs/architecture.md describes, checked against the code.

Read from the source with ``ast`` (nothing is imported or run): the import
graph has no circles and points down the layers, and a media's write state is
changed in one module only.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "velocityfs"

# Which packages a package may not import: the adapters never import each other
# or what sits above them; the service, catalog and store layers import no adapter.
ABOVE_ADAPTERS = {"velocityfs.daemon", "velocityfs.cli"}
ADAPTERS = {"velocityfs.fs", "velocityfs.api"}
FORBIDDEN = {
    "velocityfs.fs": ABOVE_ADAPTERS | {"velocityfs.api"},
    "velocityfs.api": ABOVE_ADAPTERS | {"velocityfs.fs"},
    "velocityfs.service": ABOVE_ADAPTERS | ADAPTERS,
    "velocityfs.catalog": ABOVE_ADAPTERS | ADAPTERS | {"velocityfs.service"},
    "velocityfs.store": ABOVE_ADAPTERS | ADAPTERS | {"velocityfs.service"},
}

# A media node's write state (fs/nodes.py, MediaNode) and who may change it.
WRITE_STATE = {"size", "settled", "charged", "held", "dirty", "writers"}
WRITE_STATE_OWNER = PACKAGE / "fs" / "grants.py"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, ast.Module]:
    return {
        module_name(path): ast.parse(path.read_text(), str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
        if "migrations" not in path.parts
    }


def imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """The package's own modules that ``tree`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name in modules)
    return found


def graph() -> dict[str, set[str]]:
    trees = sources()
    modules = set(trees)
    return {name: imports(tree, modules) - {name} for name, tree in trees.items()}


def test_the_import_graph_has_no_circles() -> None:
    edges = graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name]):
            if state.get(target) == 1:
                circles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for name, targets in graph().items():
        for layer, forbidden in FORBIDDEN.items():
            if name != layer and not name.startswith(layer + "."):
                continue
            for target in targets:
                if any(target == f or target.startswith(f + ".") for f in forbidden):
                    wrong.append(f"{name} imports {target}")
    assert not wrong


def test_only_fs_grants_changes_a_media_nodes_write_state() -> None:
    """Assignments to a node's size, grant, lease or writer count, and its lock taken,
    anywhere in the mount but fs/grants.py (the package's other layers have
    columns of the same names; they are not nodes, and are not looked at)."""
    found = []
    for path in sorted((PACKAGE / "fs").glob("*.py")):
        if path == WRITE_STATE_OWNER:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            elif isinstance(node, ast.AsyncWith):
                targets = [item.context_expr for item in node.items]
            for target in targets:
                for part in ast.walk(target):
                    changed = isinstance(part, ast.Attribute) and (
                        part.attr in WRITE_STATE
                        or (isinstance(node, ast.AsyncWith) and part.attr == "lock")
                    )
                    if changed:
                        found.append(f"{path.name}:{node.lineno} {ast.unparse(target)}")
    assert not found, "write state changed outside fs/grants.py: " + ", ".join(found)


def test_the_architecture_checks_see_what_they_look_for() -> None:
    """The checks above would pass on an empty package: make sure they read this one."""
    edges = graph()
    assert "velocityfs.fs.operations" in edges["velocityfs.fs.filesystem"]
    assert "velocityfs.api.server" in edges["velocityfs.daemon"]
    owner = ast.parse(WRITE_STATE_OWNER.read_text())
    assigned = {
        part.attr
        for node in ast.walk(owner)
        if isinstance(node, (ast.Assign, ast.AugAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        for part in ast.walk(target)
        if isinstance(part, ast.Attribute)
    }
    assert assigned >= WRITE_STATE
