"""The package's layers and their one import rule each (README, Architecture), checked on every import.

Every `import` / `from ... import` of the package's own modules is read with `ast`, including imports inside
functions and under `TYPE_CHECKING`, and checked against the table below. The forwarding modules kept for one
release are the only exceptions.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sae_lens_ctx"
ROOT = "sae_lens_ctx"

LAYERS = {"core": 0, "inputs": 1, "clients": 1, "stages": 2, "pipeline": 3}
"""Layer → rank: a module may import its own layer's modules and lower ranks only (inputs and clients are
side by side and may not import each other); apps (the top-level modules) may import anything."""

MAY_IMPORT = {
    "core": {"core"},
    "inputs": {"core", "inputs"},
    "clients": {"core", "clients"},
    "stages": {"core", "inputs", "clients", "stages"},
    "pipeline": {"core", "inputs", "clients", "stages", "pipeline"},
}
APPS = {"api", "results", "cli", "bench", "workspace", "__init__", "__main__"}
FORWARDERS = {"explain.__init__", "explain.prompts", "explain.serve"}
"""Paths users type, kept working for one release (they forward to the new homes)."""


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every package import in the file, wherever it stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = [ROOT, *path.relative_to(PACKAGE).with_suffix("").parts]
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = package[:-1] if package[-1] == "__init__" else package
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == ROOT or target.startswith(ROOT + "."):
                for alias in node.names:  # `from pkg import module` imports that module
                    sub = PACKAGE.joinpath(*f"{target}.{alias.name}".split(".")[1:])
                    is_module = sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()
                    found.append((node.lineno, f"{target}.{alias.name}" if is_module else target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith(ROOT + ".")]
    return found


def _layer(module: str) -> str | None:
    """`sae_lens_ctx.stages.attribute` → 'stages'; an app or the package itself → None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _stage(module: str) -> str | None:
    """The stage a `stages.*` module belongs to (`stages.mine.scan` → 'mine')."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module(path)
        if name in FORWARDERS:
            continue
        top = name.split(".")[0]
        if top in APPS:
            continue
        assert top in LAYERS, f"{path}: a module outside the layers ({', '.join(LAYERS)}) and the apps"
        me = f"{ROOT}.{name.removesuffix('.__init__')}"
        for line, target in _imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
            layer = _layer(target)
            if layer is None:
                found.append(f"{where}: an app or the package root (apps import the layers, never the reverse)")
            elif layer not in MAY_IMPORT[top]:
                found.append(f"{where}: {top}/ may import only {', '.join(sorted(MAY_IMPORT[top]))}")
            elif top == "stages" and _stage(target) and _stage(me) and _stage(target) != _stage(me):
                found.append(f"{where}: a stage never imports another stage")
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        me = f"{ROOT}.{_module(path).removesuffix('.__init__')}"
        graph[me] = {t for _, t in _imports(path)}
    return graph


def test_every_import_follows_its_layers_rule():
    assert violations() == []


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    known = set(graph)

    def resolve(target):  # `from pkg.mod import name` may name a module or a name in it
        while target not in known and "." in target:
            target = target.rsplit(".", 1)[0]
        return target

    edges = {m: {resolve(t) for t in ts} - {m} for m, ts in graph.items()}
    # a package's __init__ importing its own submodules is how a package is built, not a circle
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_rule_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself can fail: a core module importing a stage inside a function is reported."""
    fake = tmp_path / "sae_lens_ctx"
    (fake / "core").mkdir(parents=True)
    (fake / "stages").mkdir()
    (fake / "core" / "bad.py").write_text("def f():\n    from ..stages import score\n")
    (fake / "stages" / "score.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert any("core/ may import only core" in v for v in violations())


@pytest.mark.parametrize("module", ["sae_lens_ctx", "sae_lens_ctx.core.config", "sae_lens_ctx.core.layout",
                                    "sae_lens_ctx.core.llm", "sae_lens_ctx.core.records"])
def test_core_imports_without_torch(module):
    code = f"import sys, {module}; bad = [m for m in ('torch', 'transformers', 'sae_lens', 'transformer_lens') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
