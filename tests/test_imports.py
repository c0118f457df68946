"""The package's shape (issue 29): no import circle in release/ (imports inside functions
count; imports only for type checking do not), no module reaching into another's private names,
and no module past 600 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

RELEASE = Path(__file__).resolve().parent.parent / "release"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for p in RELEASE.rglob("*.py"):
        parts = p.relative_to(RELEASE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:`."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for inner in node.body:
                for sub in ast.walk(inner):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        lines.add(sub.lineno)
    return lines


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(release module imported, names imported from it, line) for every runtime import."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            if target in modules:
                found.append((target, names, node.lineno))
            for n in names:  # `from . import quantize`
                if f"{target}.{n}" in modules:
                    found.append((f"{target}.{n}", [], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name in modules]
    return [f for f in found if f[0] != name]


def test_no_import_circle_in_the_package():
    modules = _modules()
    graph = {m: {t for t, _n, _l in _imports(m, p, modules)} for m, p in modules.items()}
    # a package's __init__ re-exports its modules: an edge into the package stands for them
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t) :] + [t]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_uses_another_modules_private_names():
    modules = _modules()
    offences = []
    for m, p in modules.items():
        for target, names, line in _imports(m, p, modules):
            offences += [
                f"{p.name}:{line} imports {target}.{n}" for n in names if n.startswith("_") and n != "__version__"
            ]
        tree = ast.parse(p.read_text())
        aliases = {
            a.asname or a.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level
            for a in node.names
            if f"{m.rsplit('.', 1)[0]}.{a.name}" in modules or f"release.{a.name}" in modules
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
            ):
                offences.append(f"{p.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not offences, "\n".join(offences)


def test_modules_stay_small():
    sizes = {p.relative_to(RELEASE).as_posix(): len(p.read_text().splitlines()) for p in _modules().values()}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not over, f"over {MAX_LINES} lines: {over}"


# what each stage folder may import of the others (each folder's docstring says the same)
NEVER = {
    "release.check": ("release.build", "release.verify", "release.publish", "release.awq"),
    "release.publish": ("release.build", "release.verify", "release.awq"),
    "release.verify": ("release.build", "release.serving", "release.publish", "release.check"),
    "release.serving": ("release.build", "release.publish", "release.check"),
    "release.awq": ("release.build", "release.verify", "release.check", "release.publish", "release.serving"),
    "release.evaluation": ("release.build", "release.verify", "release.check", "release.publish", "release.awq"),
}


def test_stages_import_only_what_their_folders_allow():
    modules = _modules()
    offences = []
    for name, path in modules.items():
        for stage, banned in NEVER.items():
            if name == stage or name.startswith(stage + "."):
                for target, _names, line in _imports(name, path, modules):
                    if any(target == b or target.startswith(b + ".") for b in banned):
                        offences.append(f"{path.relative_to(RELEASE.parent)}:{line} imports {target}")
    assert not offences, "\n".join(offences)


def test_the_layout_page_names_every_engine_module_and_benchmark():
    """docs/layout.md, the repository's map: every module of release/awq and every benchmark
    (a .py or .sh in benchmarks/) is named there, so a new one cannot be left off the map."""
    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "layout.md").read_text()
    modules = [p.stem for p in (root / "release" / "awq").glob("*.py") if p.stem != "__init__"]
    benchmarks = [
        p.stem for p in (root / "benchmarks").iterdir() if p.suffix in (".py", ".sh") and p.stem != "__init__"
    ]
    missing = [name for name in modules + benchmarks if not re.search(rf"\b{re.escape(name)}\b", page)]
    assert not missing, f"docs/layout.md does not name {missing}"
