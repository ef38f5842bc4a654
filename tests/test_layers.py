"""The package's layers are a contract: every import of a diffseg_engine module goes to its own layer or a lower
one, the import graph has no cycle, and torch is imported only where it is allowed.

Read with `ast` (nothing is imported), so a lazy import inside a function counts as much as one at the top.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: package folder -> where its files lie (train/ and export/ are installed as diffseg_engine.train / .export)
ROOTS = {"diffseg_engine": REPO / "diffseg_engine", "diffseg_engine.train": REPO / "train",
         "diffseg_engine.export": REPO / "export"}

#: Lowest first. A module may import modules of its own layer or of a lower one. Layers that share a rank sit
#: side by side and may not import each other (backends and export).
LAYERS: dict[str, int] = {
    "diffseg_engine": 0,              # the package root: __version__ only
    "diffseg_engine.core": 1,         # errors, noise streams, ensemble statistics, the step loop, host, progress
    "diffseg_engine.io": 2,           # NIfTI, atomic writes, the output lock, partial runs
    "diffseg_engine.artifacts": 3,    # card, weights, ONNX file, step graph, TensorRT plan
    "diffseg_engine.inputs": 4,       # cases, geometry, preprocessing, input sanity, modality classifier
    "diffseg_engine.sampling": 5,     # schedules, the ensemble sampler, rounds, device noise
    "diffseg_engine.train": 6,        # the PyTorch network, training
    "diffseg_engine.backends": 7,     # runtimes of the step graph
    "diffseg_engine.export": 7,       # export to ONNX / TensorRT / Triton
    "diffseg_engine.maps": 8,         # ensemble maps, lesions, overview, output names
    "diffseg_engine.evaluation": 9,   # scoring against ground truth
    "diffseg_engine.pipeline": 10,    # options, models, segment, cohorts, evaluate, review page
    "diffseg_engine.api": 11,
    "diffseg_engine.cli": 12,
    "diffseg_engine.__main__": 13,
}
#: The only modules that may import torch.
TORCH_ALLOWED = ("diffseg_engine.train", "diffseg_engine.export", "diffseg_engine.backends.torch_ref",
                 "diffseg_engine.sampling.noise_device")


def _modules() -> dict[str, Path]:
    found = {}
    for pkg, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([pkg, *parts])
            if pkg == "diffseg_engine" and parts and parts[0] in ("train", "export"):
                continue
            found[name] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports_of(name: str, source: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in `source`, relative ones resolved, `from pkg import module`
    counted as an import of that module."""
    out = []
    package = name if name in MODULES and _is_package(name) else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, node.lineno))
            out += [(f"{target}.{a.name}", node.lineno) for a in node.names if f"{target}.{a.name}" in MODULES]
    return out


def layer_of(name: str) -> tuple[str, int] | None:
    """(layer name, rank) of a module: the longest LAYERS key it lies in."""
    best = None
    for key, rank in LAYERS.items():
        if (name == key or name.startswith(key + ".")) and (best is None or len(key) > len(best[0])):
            best = (key, rank)
    return best


def violations(name: str, source: str) -> list[str]:
    """Why the imports of module `name` break the contract (empty when they keep it)."""
    bad = []
    own = layer_of(name)
    for target, line in imports_of(name, source):
        if target.split(".")[0] == "torch" and not name.startswith(TORCH_ALLOWED):
            bad.append(f"{name}:{line} imports torch")
        if not target.startswith("diffseg_engine") or target == "diffseg_engine" and name == target:
            continue
        other = layer_of(target)
        if other is None or own is None:
            bad.append(f"{name}:{line} imports {target}, which is in no layer")
        elif other[0] != own[0] and other[1] >= own[1]:
            bad.append(f"{name}:{line} ({own[0]}) imports {target} ({other[0]}): not a lower layer")
    return bad


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {t for t, _ in imports_of(name, path.read_text()) if t in MODULES and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (a package importing its own __init__ chain is not one), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if node.startswith(nxt + "."):  # a module imports its parent package: Python's own order
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_module_lies_in_a_layer():
    assert [name for name in MODULES if layer_of(name) is None] == []


def test_flat_package_holds_only_the_entry_points():
    flat = sorted(p.name for p in ROOTS["diffseg_engine"].glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "api.py", "cli.py"]


def test_imports_only_go_down():
    bad = [v for name, path in MODULES.items() for v in violations(name, path.read_text())]
    assert bad == []


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_nothing_imports_the_cli():
    graph = import_graph()
    assert [n for n, deps in graph.items() if "diffseg_engine.cli" in deps and n != "diffseg_engine.__main__"] == []


# ---- the checks can fail --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, source, expected", [
    ("diffseg_engine.core.noise", "from ..pipeline.segment import x", "not a lower layer"),
    ("diffseg_engine.inputs.cases", "import diffseg_engine.sampling.sampler", "not a lower layer"),
    ("diffseg_engine.backends.ort", "from ..export.onnx_export import export_onnx", "not a lower layer"),
    ("diffseg_engine.backends.ort", "def f():\n    import torch\n", "imports torch"),
    ("diffseg_engine.maps.lesions", "from diffseg_engine import cli", "not a lower layer"),
])
def test_a_fabricated_bad_import_is_caught(name, source, expected):
    assert any(expected in v for v in violations(name, source))


def test_allowed_imports_pass():
    assert violations("diffseg_engine.pipeline.segment", "from ..core.errors import UsageError\n"
                                                          "from .cohort import x\nimport numpy") == []
    assert violations("diffseg_engine.backends.torch_ref", "import torch\nfrom ..train.step import build_step") == []


def test_a_fabricated_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
