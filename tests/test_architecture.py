"""The layout in docs/architecture.md holds: imports flow one way, no cycles, no module over 500 lines."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "symgen"
# The units of the map: a top-level module or a subpackage, and the shell and application layers.
# The "Shell" part of docs/architecture.md (and report).
SHELL = {"cli", "cli_common", "cli_audit", "cli_runs", "runs", "executors", "report"}
APPLICATION = {"experiments", "audit"}


def _unit(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return "symgen" if rel.parts == ("__init__",) else rel.parts[0]


def _imports(path: Path) -> set[str]:
    """Every ``symgen.X`` a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "symgen":
                if len(parts) > 1:
                    out.add(parts[1])
                else:
                    out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "symgen" and len(parts) > 1:
                    out.add(parts[1])
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        unit = _unit(path)
        graph.setdefault(unit, set()).update(i for i in _imports(path) if i != unit)
    return graph


def test_library_never_imports_the_shell_or_the_applications():
    graph = _graph()
    for unit, deps in graph.items():
        if unit in SHELL | APPLICATION | {"symgen"}:
            continue
        bad = deps & (SHELL | APPLICATION)
        assert not bad, f"library unit symgen.{unit} imports {sorted(bad)}"
    assert not graph["report"] & {"runs", "cli"}, "report draws and renders; it must not import runs or cli"
    assert not graph["audit"] & {"runs", "cli", "experiments"}, "the audit computes; the shell writes its runs"


def test_no_import_cycles_between_units():
    graph = _graph()
    graph.pop("symgen", None)  # the lazy package front door imports nothing eagerly

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        if node in stack:
            cycle = stack[stack.index(node) :] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        for dep in sorted(graph.get(node, ())):
            visit(dep, stack + [node], done)
        done.add(node)

    done: set[str] = set()
    for unit in sorted(graph):
        visit(unit, [], done)


def test_modules_hold_at_most_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these modules (one concept each, <= 500 lines): {long}"


def test_architecture_map_names_every_module():
    text = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        if rel.name == "__init__" and len(rel.parts) > 1:
            rel = rel.parent
        name = ".".join(rel.parts)
        if name in ("__init__", "audit.sections", "py") or name.endswith("__main__"):
            continue
        if f"`{name}`" not in text:
            missing.append(name)
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_units_import_only_units_listed_above_them_in_the_map():
    text = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    order = []
    for line in text.splitlines():
        if line.startswith("- `") and "`:" in line:
            name = line[3 : line.index("`", 3)]
            if "." not in name:
                order.append(name)
    rank = {u: i for i, u in enumerate(order)}
    graph = _graph()
    graph.pop("symgen", None)
    wrong = [f"{u} -> {d}" for u, deps in graph.items() for d in deps if rank.get(d, -1) >= rank.get(u, -1)]
    assert not wrong, f"imports against the order of docs/architecture.md: {wrong}"


# ---------------------------------------------------------------------------------------------
# Module level: inside a package, modules form no cycles and share no private names.


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _module_imports(path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import in a file, relative ones resolved."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    modules = {_module_name(p) for p in SRC.rglob("*.py")}
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("symgen"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, "", node.lineno) if sub in modules else (target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, "", node.lineno) for a in node.names if a.name.startswith("symgen"))
    return out


def test_no_import_cycles_between_modules_of_a_package():
    """Lazy (function-level) imports count: a cycle hidden in a function is still a cycle of concepts."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        me = _module_name(path)
        if path.name == "__init__.py":
            continue  # a package's front door re-exports its modules
        package = me.rpartition(".")[0]
        graph[me] = {
            t
            for t, _, _ in _module_imports(path)
            if t != me and t.rpartition(".")[0] == package and t != package and package != "symgen"
        }
    cycles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node) :] + [node]))
            return
        if node in done:
            return
        for dep in sorted(graph.get(node, ())):
            visit(dep, stack + [node], done)
        done.add(node)

    done: set[str] = set()
    for module in sorted(graph):
        visit(module, [], done)
    assert not cycles, "import cycles between modules: " + "; ".join(sorted(set(cycles)))


def test_no_module_imports_another_modules_private_names():
    """A name another module uses is not private: drop its underscore (and keep it out of ``__all__``)."""
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        for target, name, line in _module_imports(path):
            if name.startswith("_") and not name.startswith("__"):
                bad.append(f"{path.relative_to(SRC)}:{line} {target}.{name}")
    assert not bad, f"imports of private names ({len(bad)}): {bad}"
