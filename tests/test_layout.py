"""The package's layers: no import cycle (lazy imports included), and no layer imports one above it."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "igpt_batch"
# layer of each top-level name under igpt_batch; a module may import only its own layer or lower ones
LAYERS = {"__init__": 0, "errors": 0, "redact": 0, "uris": 0, "config_file": 0, "config": 0,
          "inputs": 1, "model": 1, "run": 2, "store": 3,
          "cli": 4, "cli_store": 4, "demo": 4, "probe": 4, "inspector": 4, "ray_data": 4, "train_demo": 4,
          "outliers": 4}
BASE = ["__init__", "errors", "redact", "uris", "config_file", "config"]  # the base, bottom first
APART = {("inputs", "model"), ("model", "inputs")}  # the two middle layers never import each other


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str) -> set[str]:
    """Every igpt_batch module this file imports, at any depth (function-level imports too)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("igpt_batch"):
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("igpt_batch"))
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {i for i in imports(p, m) if i in files and i != m} for m, p in files.items()}


def top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_layers_import_only_downwards():
    g = graph()
    bad = []
    for m, deps in g.items():
        for d in deps:
            a, b = top(m), top(d)
            upward = LAYERS[b] > LAYERS[a] or (a in BASE and b in BASE and BASE.index(b) > BASE.index(a))
            if upward or (a, b) in APART:
                bad.append(f"{m} -> {d}")
    assert sorted(bad) == []


def test_every_module_is_placed_and_every_package_says_what_it_is():
    for p in PKG.rglob("*.py"):
        assert top(module_name(p)) in LAYERS, p
    for init in PKG.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "\n" not in doc.strip(), init


def test_modules_and_functions_stay_small():
    """Modules of at most 300 lines and functions of at most 60, so each reads in one sitting."""
    long = []
    for p in PKG.rglob("*.py"):
        text = p.read_text()
        if text.count("\n") > 300:
            long.append(f"{p.relative_to(PKG)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{p.relative_to(PKG)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []
