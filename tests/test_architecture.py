"""The package's shape: imports point one way. Read from the source (every `import`, also those inside
functions), so a cycle shows here before it shows as an ImportError in one import order."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ddp_finetune"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str, modules: dict) -> str | None:
    """The module (or package) of the package that a dotted name refers to, if any."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_package = path.name == "__init__.py"
        package = mod if is_package else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    root = ".".join(base + ([node.module] if node.module else []))
                else:
                    root = node.module or ""
                # `from pkg import submodule` imports the submodule; `from mod import name` the module
                subs = [f"{root}.{a.name}" for a in node.names if f"{root}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [*subs, root]
            for t in targets:
                found = _resolve(t, modules)
                if found and found != mod and not (found == "ddp_finetune" and t != "ddp_finetune"):
                    graph[mod].add(found)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_config_imports_no_torch_and_no_loss_implementation():
    """`ddp-finetune -h` and config loading stay light: the config types its loss fields from
    losses.kinds (plain Literals) and reaches the loss checks only when it validates."""
    import subprocess
    import sys

    code = "import sys, ddp_finetune.config; assert 'torch' not in sys.modules, 'torch'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "ok", out.stderr


LAYERS = [
    ("ddp_finetune", "ddp_finetune.errors", "ddp_finetune.files", "ddp_finetune.distributed", "ddp_finetune.out_paths"),
    ("ddp_finetune.losses",),
    ("ddp_finetune.config",),
    ("ddp_finetune.models", "ddp_finetune.data"),
    ("ddp_finetune.training",),
    ("ddp_finetune.inference",),
    ("ddp_finetune.commands",),
]
"""Bottom to top: a module imports its own layer or the ones below, never one above (the map in
docs/architecture.md). `ddp_finetune` itself names its public API by strings, imported on first use;
`__main__` only calls the command line."""


def _layer(module: str) -> int:
    if module == "ddp_finetune.__main__":
        return len(LAYERS) - 1
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > len(best[1]):
                    best = (i, name)
    assert best is not None, f"{module} belongs to no layer: put it in a sub-package (or add it to LAYERS)"
    return best[0]


def test_imports_point_down_the_layers():
    upward = [
        f"{mod} -> {dep}"
        for mod, deps in import_graph().items()
        for dep in deps
        if _layer(dep) > _layer(mod) and dep != "ddp_finetune"
    ]
    assert not upward, upward


def test_every_module_is_in_a_layer_folder():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "distributed", "errors", "files", "out_paths"], top


def test_the_map_names_every_module():
    """docs/architecture.md is the newcomer's map: every module of the package has its line there."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py") and p.name not in doc
    ]
    assert not missing, f"docs/architecture.md does not name {missing}"
