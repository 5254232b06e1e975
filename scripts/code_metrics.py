#!/usr/bin/env python
"""The size and shape of the code base: lines per package, the largest functions, files over the limit, and the
house (the import graph of `spu_peft.*`: its circles and the imports that run from a lower layer to a higher one).

    python scripts/code_metrics.py             # this checkout
    python scripts/code_metrics.py --root DIR  # another checkout (e.g. a worktree of main)

`tests/test_import_layering.py` asserts the house with `import_graph` and `layer_violations`.
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path

FILE_LIMIT = 400
# The layers of the house, lowest first: a module may import its own layer and the ones below, never one above.
# The process-group helpers of `distributed` serve the adapter's own layer (sharded tensors), so they sit below it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "kernels",
        (
            "constants",
            "versions",
            "adapter_folder",
            "config",
            "task_heads",
            "encoding",
            "blocks",
            "bsr",
            "sparse_linear",
            "state_sizes",
            "supports",
            "optim_state",
            "arrival",
            "fsdp_units",
            "distributed",
            "scoring",
            "memory",
            "integrity",
            "folders",
        ),
    ),
    (
        "adapter",
        (
            "merging",
            "layer",
            "mixed_batch",
            "bnb",
            "naming",
            "adapter_warnings",
            "budgets",
            "comparison",
            "injection",
            "vocabulary",
            "loading",
            "adapter_loader",
            "model",
            "compose",
            "hub",
        ),
    ),
    ("selection", ("selection", "selection_data", "trainer", "__init__")),
    ("continual", ("continual", "embedded")),
    ("studies", ("studies", "benchmarking", "analysis")),
)


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    """The layer index of a `spu_peft.*` module (its first name below `spu_peft`, `__init__` for the package)."""
    head = module.split(".")[1] if "." in module else "__init__"
    for index, (_, members) in enumerate(LAYERS):
        if head in members:
            return index
    raise ValueError(f"module `{module}` is in no layer of LAYERS; add its package or file there")


def _imported(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The `spu_peft` modules one import statement names: a name imported from a package is its submodule when
    there is one, else the package (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
    return found & modules


def import_graph(src: Path) -> dict[str, set[str]]:
    """Module -> the `spu_peft` modules it imports anywhere in its file (lazy imports included)."""
    files = {module_name(p, src): p for p in sorted((src / "spu_peft").rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        names = set().union(*(_imported(node, module, is_package, set(files)) for node in ast.walk(tree)))
        graph[module] = names - {module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, as the strongly connected components (Tarjan) with more than one module."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a module imports one of a higher layer."""
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def functions(path: Path) -> list[tuple[int, str]]:
    """(lines, qualified name) of every function and method of a file."""
    out = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out.append((child.end_lineno - child.lineno + 1, name))
                walk(child, name + ".")

    walk(ast.parse(path.read_text()), "")
    return out


def package_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    if rel.parts[0] == "src":
        return "spu_peft (core)" if len(rel.parts) == 3 else f"spu_peft.{rel.parts[2]}"
    return rel.parts[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="A checkout.")
    parser.add_argument("--most", type=int, default=10, help="How many of the largest functions to list.")
    root = parser.parse_args().root
    files = sorted(p for d in ("src", "benchmarks", "scripts") for p in (root / d).rglob("*.py"))
    lines = {p: len(p.read_text().splitlines()) for p in files}
    per_package: dict[str, int] = defaultdict(int)
    for path, n in lines.items():
        per_package[package_of(path, root)] += n
    print("| package | lines |\n|---|---:|")
    for name, n in sorted(per_package.items()):
        print(f"| {name} | {n:,} |")
    print(f"| all | {sum(per_package.values()):,} |")
    library = [p for p in files if p.parts[len(root.parts)] == "src"]
    print(f"\nLibrary files over {FILE_LIMIT} lines:")
    for path in library:
        if lines[path] > FILE_LIMIT:
            print(f"- {path.relative_to(root)}: {lines[path]}")
    ranked = sorted(((n, f"{p.relative_to(root)}:{name}") for p in files for n, name in functions(p)), reverse=True)
    print(f"\nThe {parser.parse_args().most} largest functions (lines):")
    for n, name in ranked[: parser.parse_args().most]:
        print(f"- {name}: {n}")
    graph = import_graph(root / "src")
    print(f"\nHouse: {len(graph)} modules, {sum(map(len, graph.values()))} imports")
    print(f"- circles: {circles(graph) or 'none'}")
    print(f"- imports from a lower layer to a higher one: {layer_violations(graph) or 'none'}")


if __name__ == "__main__":
    main()
