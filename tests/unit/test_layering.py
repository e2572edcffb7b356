"""The package layers only look down, and no module imports itself back through others.

Every ``import`` / ``from ... import`` statement of forge_dist (function-level ones included: a
lazy import is still a dependency) is read with ast, never executed. A module may import its own
package's modules and those of a strictly lower layer; packages that share a layer (config and
data) stay independent. docs/DEVELOPING.md shows the same order.
"""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set

import forge_dist

ROOT = pathlib.Path(forge_dist.__file__).parent

# lowest first; a module belongs to the longest prefix that names it
LAYERS: List[List[str]] = [
    ["forge_dist.errors", "forge_dist.presets"],
    ["forge_dist.registry", "forge_dist.atomic"],
    ["forge_dist.variants"],  # the variant registries: config validates against them, model fills them
    ["forge_dist.ops"],
    # pure rank <-> coordinate arithmetic, no torch.distributed: ParallelConfig validates world sizes with it
    ["forge_dist.parallel.topology"],
    ["forge_dist.config", "forge_dist.data"],
    ["forge_dist.model"],
    ["forge_dist.parallel"],
    ["forge_dist.dist"],
    ["forge_dist.io"],
    ["forge_dist.inference"],
    ["forge_dist.train"],
    ["forge_dist.testing", "forge_dist"],  # the test helpers and the package's top-level facade
]


def _modules() -> Dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("forge_dist",) + path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _target(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(name: str) -> Set[str]:
    """The forge_dist modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        out |= {_target(f) for f in found if f == "forge_dist" or f.startswith("forge_dist.")}
    out.discard(name)
    return out


def layer_of(name: str):
    """(layer index, the prefix that placed it)."""
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (i, prefix)
    assert best is not None, f"{name} is in no layer; add its package to LAYERS"
    return best


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_layers_only_look_down():
    wrong = []
    for name, deps in sorted(GRAPH.items()):
        layer, prefix = layer_of(name)
        for dep in sorted(deps):
            dep_layer, dep_prefix = layer_of(dep)
            if dep_layer > layer or (dep_layer == layer and dep_prefix != prefix):
                wrong.append(f"{name} ({prefix}) imports {dep} ({dep_prefix})")
    assert not wrong, "imports that look up or sideways:\n" + "\n".join(wrong)


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_checks_catch_what_they_guard():
    """The walker sees lazy imports and the checks fail on a cycle and on an upward import."""
    assert "forge_dist.model.softmax" in GRAPH["forge_dist.inference.generate"]  # imported inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("forge_dist.parallel.topology")[0] < layer_of("forge_dist.config.parallel")[0]
    assert layer_of("forge_dist.ops.scores")[0] < layer_of("forge_dist.model.attention.core")[0]
    assert layer_of("forge_dist.inference.sample")[0] < layer_of("forge_dist.train.cli")[0]
