"""The package layout holds: imports run one way (cli -> features -> core), with no circles.

Every ``import`` of a crdiff module counts, at module level or inside a function (a lazy import is still a
dependency), except those under ``if TYPE_CHECKING:`` (annotations only, never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"crdiff_cli": ROOT / "crdiff_cli", "crdiff_cli.exporters": ROOT / "exporters"}

CORE = ("crdiff_cli.errors", "crdiff_cli.defaults", "crdiff_cli.validation", "crdiff_cli.pruning",
        "crdiff_cli.storage", "crdiff_cli.runtime")
FEATURES = ("crdiff_cli.dual", "crdiff_cli.pipelines", "crdiff_cli.search", "crdiff_cli.evaluation",
            "crdiff_cli.scorers", "crdiff_cli.exporters", "crdiff_cli.comfyui", "crdiff_cli.deploy")
COMMANDS = ("crdiff_cli.cli",)


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "crdiff_cli" and parts[0] == "exporters":
                continue
            name = ".".join((package, *parts)).removesuffix(".__init__")
            modules[name] = path
    return modules


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The crdiff modules ``name`` imports (a ``from package import module`` names the module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("crdiff_cli"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("crdiff_cli"):
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name and not (m == "crdiff_cli" and name != "crdiff_cli")}


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def layer(module: str) -> int | None:
    for rank, prefixes in enumerate((CORE, FEATURES, COMMANDS)):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_known_imports():
    edges = graph()
    assert "crdiff_cli.pruning.spec" in edges["crdiff_cli.dual.unet"]
    assert "crdiff_cli.exporters.metadata" in edges["crdiff_cli.exporters.bake"]
    assert "crdiff_cli.cli.shared" in edges["crdiff_cli.cli.commands.generate"]


def test_no_import_cycles():
    edges = graph()
    for modules in edges.values():  # a package's __init__ does not import its modules here: no edge back
        modules.discard("crdiff_cli")
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_module_has_a_layer():
    unplaced = [m for m in graph() if layer(m) is None and m not in ("crdiff_cli", "crdiff_cli.__main__")]
    assert not unplaced


def test_imports_run_one_way():
    """Core imports no feature or command; features import no command (exporters included)."""
    wrong = [(m, dep) for m, deps in graph().items() for dep in deps
             if layer(m) is not None and layer(dep) is not None and layer(dep) > layer(m)]
    assert not wrong, "\n".join(f"{m} imports {dep}" for m, dep in wrong)


@pytest.mark.parametrize("package", ["pruning", "dual", "pipelines", "search", "evaluation", "storage", "runtime",
                                     "cli", "cli.commands", "scorers"])
def test_every_subpackage_says_what_it_owns(package):
    init = ROOT / "crdiff_cli" / package.replace(".", "/") / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
