"""The package's layers (docs/architecture.md, "Module map"): every import, including the ones
inside functions, points to a module of the same layer or a lower one, and the imports form no
cycle; importing the decode step's selection loads neither numba nor the disk store."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tiercache

ROOT = Path(tiercache.__file__).parent

#: Each module's layer, by its dotted name or the longest prefix of it listed here.
LAYERS = {
    "tiercache.errors": 0, "tiercache.blocks": 0, "tiercache.paths": 0, "tiercache.capacity": 0,
    "tiercache.io": 1, "tiercache.kernels": 1, "tiercache.opcount": 1,
    "tiercache.spec": 2, "tiercache.config": 2, "tiercache.fingerprint": 2,
    "tiercache.tiers": 3, "tiercache.retrieval": 3,
    "tiercache.decode": 4,
    "tiercache.hf": 5, "tiercache.contexts": 5,
    "tiercache.generation": 6, "tiercache.stream": 6, "tiercache.jobs": 6,
    "tiercache.distributed": 6, "tiercache.evaluation": 6, "tiercache.corpus": 6, "tiercache.stopping": 6,
    "tiercache.models": 6, "tiercache.video": 6,
    "tiercache.cli": 7,
    "tiercache": 8,  # the package's front door: its names are imported lazily, on first use
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to docs/architecture.md's module map")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every tiercache module -> the tiercache modules it imports anywhere in its body."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import mod`` imports the module pkg.mod when there is one.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            found.update(t for t in targets if t.split(".")[0] == "tiercache" and t != name)
        graph[name] = {t if t in modules else t.rpartition(".")[0] for t in found}
    return graph


def test_every_import_points_to_the_same_layer_or_below():
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in imports().items() for t in targets
              if not (m == "tiercache" or t == "tiercache") and layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_imports_form_no_cycle():
    graph = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if t == "tiercache":  # every module's parent package; it imports its names lazily
                continue
            assert state.get(t) != 1, "import cycle: " + " -> ".join(path[path.index(t):] + [t])
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_selector_loads_neither_numba_nor_the_disk_store():
    code = ("import sys, tiercache.retrieval.selector; "
            "print(sorted(m for m in ('numba', 'tiercache.io.store', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent).stdout
    assert out.strip() == "[]"
