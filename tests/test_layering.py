"""The package's import layering, checked by parsing every module's imports (function-local ones too).

LAYERS lists the modules of ``lowprec`` bottom-up; a module may import only from its own layer or a
lower one, the imports form no cycle, and no module imports the package facade (``lowprec/__init__``,
which sits above everything and re-exports the public names). A new module goes into LAYERS.
No module, and no script, reads a name starting with ``_`` from another lowprec module
(``from m import _x`` or ``m._x``): what another module needs is public.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lowprec"
FACADE = "lowprec"  # lowprec/__init__.py

# Bottom-up. Names are module paths inside lowprec ("kernels.luq"); "kernels.*" covers the subpackage.
LAYERS: list[tuple[str, ...]] = [
    ("_common",),
    ("luq", "nm", "intq", "baselines", "packing", "weight_nm", "fp4", "hadamard"),  # reference functions
    ("kernels", "kernels.*"),  # Triton twins
    ("dispatch",),
    ("estimators",),
    ("stats", "noise"),  # noise: the noise-to-signal ratio r (pure math on tensors)
    ("verdicts", "scaling"),  # pure statistics (scipy): paired tests and Holm; scaling-law fits
    ("recipes",),
    ("forward", "backward"),  # a layer's GEMM operands and δ routing (pure functions)
    ("qgemm", "layers", "layers_mha", "layers_hf", "layers_fn"),  # qgemm: the per-GEMM state and the one backward
    ("convert",),
    ("data", "models", "chargpt", "hf_models", "model_defaults", "zoo", "tasks", "squad", "translation", "mlm", "task_loop", "text_data", "runs", "logging", "config", "distributed", "checkpoint", "provenance",
     "summary", "adapt", "noise_full", "optim", "evaluation", "budget",
     "preflight", "allocator"),
    ("tables", "train", "table_md", "adapt_table", "scaling_table", "dry_run"),
    ("prepare",),  # run preparation: config -> baseline -> train -> record (run.py's body)
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) if parts else FACADE


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py")) if "__pycache__" not in p.parts}


MODULES = _modules()


def _layer(mod: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if any(fnmatchcase(mod, n) for n in names):
            return i
    return None


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _resolve_from(mod: str | None, node: ast.ImportFrom) -> str | None:
    """The lowprec module ``from X import ...`` in ``mod`` names ("" for the package root), or None if outside."""
    if node.level == 0 or mod is None:
        name = node.module or ""
        if name == "lowprec":
            return ""
        return name[len("lowprec."):] if name.startswith("lowprec.") else None
    here = [] if mod == FACADE else mod.split(".")
    if not _is_package(mod):
        here = here[:-1]
    if node.level > 1:
        here = here[: len(here) - (node.level - 1)]
    return ".".join(here + ([node.module] if node.module else []))


def _target(base: str, name: str | None) -> str:
    """Module that ``from base import name`` reads from: the submodule when it is one, else ``base``."""
    sub = f"{base}.{name}" if base and name else (name or base)
    if name is not None and sub in MODULES:
        return sub
    return base or FACADE


def _parsed(mod: str) -> ast.Module:
    return ast.parse(MODULES[mod].read_text(), filename=str(MODULES[mod]))


def _imports(mod: str, tree: ast.Module | None = None):
    """(line, imported lowprec module, names read from it) for every import in ``mod``, nested ones included.

    ``mod`` None: a file outside the package (a script), whose imports are all absolute.
    """
    for node in ast.walk(_parsed(mod) if tree is None else tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "lowprec" or a.name.startswith("lowprec."):
                    yield node.lineno, (a.name[len("lowprec."):] or FACADE) if a.name != "lowprec" else FACADE, ()
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(mod, node)
            if base is None:
                continue
            for a in node.names:
                t = _target(base, a.name)
                yield node.lineno, t, (() if t != (base or FACADE) else (a.name,))


def _edges() -> dict[str, set[str]]:
    return {m: {t for _, t, _ in _imports(m) if t != m} for m in MODULES}


def test_every_module_has_a_layer():
    missing = [f"lowprec/{MODULES[m].relative_to(PKG)} (module {m!r})" for m in MODULES
               if m != FACADE and _layer(m) is None]
    assert not missing, ("modules not in LAYERS of tests/test_layering.py; add each to the layer it belongs to:\n  "
                         + "\n  ".join(missing))


def test_imports_go_down_the_layers():
    bad = []
    for m in MODULES:
        if m == FACADE:
            continue
        for line, t, _ in _imports(m):
            if t == m:
                continue
            where = f"lowprec/{MODULES[m].relative_to(PKG)}:{line}"
            if t == FACADE:
                bad.append(f"{where}: {m} imports the package facade (lowprec/__init__); import the module instead")
            elif t not in MODULES:
                bad.append(f"{where}: {m} imports lowprec.{t}, which does not exist")
            elif None not in (_layer(m), _layer(t)) and _layer(t) > _layer(m):
                bad.append(f"{where}: {m} (layer {_layer(m)}) imports {t} (layer {_layer(t)}, higher)")
    assert not bad, "imports from a higher layer:\n  " + "\n  ".join(bad)


def test_no_import_cycle():
    edges = _edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in MODULES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles among lowprec modules: " + "; ".join(" <-> ".join(c) for c in cycles)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_aliases(mod: str | None, tree: ast.Module) -> dict[str, str]:
    """Local names bound to lowprec modules by imports in ``mod`` (any scope)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "lowprec" or a.name.startswith("lowprec."):
                    aliases[a.asname or "lowprec"] = (a.name[len("lowprec."):] or FACADE) if a.asname else FACADE
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(mod, node)
            if base is None:
                continue
            for a in node.names:
                sub = f"{base}.{a.name}" if base else a.name
                if sub in MODULES:
                    aliases[a.asname or a.name] = sub
    return aliases


def _dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _private_reads(mod: str | None, tree: ast.Module, where: str) -> list[str]:
    bad = []
    for line, t, names in _imports(mod, tree):
        for n in names:
            if t != mod and _private(n):
                bad.append(f"{where}:{line}: from {t} import {n}")
    aliases = _module_aliases(mod, tree)
    for node in ast.walk(tree):
        chain = _dotted(node) if isinstance(node, ast.Attribute) else None
        if not chain or chain[0] not in aliases:
            continue
        cur = aliases[chain[0]]
        for part in chain[1:]:
            sub = part if cur == FACADE else f"{cur}.{part}"
            if sub in MODULES:
                cur = sub
                continue
            if cur != mod and _private(part):
                bad.append(f"{where}:{node.lineno}: {cur}.{part}")
            break
    return bad


def test_no_private_name_read_across_modules():
    bad = []
    for m in MODULES:
        bad += _private_reads(m, _parsed(m), f"lowprec/{MODULES[m].relative_to(PKG)}")
    for path in sorted([*ROOT.glob("scripts/*.py"), ROOT / "run.py"]):
        if path.exists():
            bad += _private_reads(None, ast.parse(path.read_text(), filename=str(path)), str(path.relative_to(ROOT)))
    assert not bad, "private names read from another lowprec module (make them public):\n  " + "\n  ".join(
        sorted(set(bad)))
