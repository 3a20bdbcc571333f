"""The package's layer order: every import inside megatron_eps/ points down, and no modules import
each other in a loop.

Each layer holds units (a top-level module, or a folder with everything under it). A module may
import its own unit and any unit of a lower layer; units of one layer stand beside each other and
do not import each other. Imports inside functions count like the others.
"""

import ast
import os

import megatron_eps

ROOT = os.path.dirname(megatron_eps.__file__)
PACKAGE = "megatron_eps"

# Bottom to top.
LAYERS = [
    # plain helpers every layer may use
    ("ground", ["errors", "compat", "staging", "triton_launch", "timing", "provenance",
                "known_notices"]),
    # one pass over rows on the GPU (Triton), with the torch path beside it
    ("row kernels", ["row_kernels"]),
    # how rows travel between ranks; what the measurements and the cost model decide
    ("transports and policy", ["comm", "policy"]),
    ("experts", ["experts"]),
    ("settings", ["config"]),
    ("pipeline", ["pipeline"]),
    ("the layer", ["moe_layer"]),
    # what puts the layer into Megatron: its spec and its command-line flags
    ("wiring", ["spec", "arguments"]),
    # the layer spec and settings Megatron-LM's own scripts load
    ("Megatron-LM client", ["megatron_lm"]),
    # the shipped commands and the model harness they drive
    ("inference", ["inference"]),
    ("commands", ["calibrate", "launch", "bench"]),
    ("test harness", ["testing"]),
    ("package face", ["__init__"]),
]


def _layer_of_unit():
    return {unit: depth for depth, (_, units) in enumerate(LAYERS) for unit in units}


def _modules():
    """{dotted module name: path} of every module under megatron_eps/."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = path
    return found


def _unit(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _resolve(name, modules):
    """The module an imported name lands in: the longest known module prefix."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module, path, modules):
    """The megatron_eps modules that ``module`` imports (at the top or inside a function)."""
    is_package = path.endswith("__init__.py")
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _resolve(name, modules)
                if target is not None and target != module:
                    yield target


def _graph():
    modules = _modules()
    return {module: sorted(set(_imports(module, path, modules)))
            for module, path in modules.items()}


def test_every_module_has_a_layer():
    layers = _layer_of_unit()
    missing = sorted({_unit(m) for m in _modules()} - set(layers))
    assert not missing, f"units without a layer in LAYERS: {missing}"


def test_imports_point_down():
    layers = _layer_of_unit()
    wrong = []
    for module, imported in _graph().items():
        here = _unit(module)
        for target in imported:
            there = _unit(target)
            if there == here:
                continue
            if here not in layers or there not in layers or layers[there] >= layers[here]:
                side = "beside" if layers.get(there) == layers.get(here) else "above"
                wrong.append(f"{module} -> {target} ({there} is {side} {here})")
    assert not wrong, "imports that do not point down:\n" + "\n".join(wrong)


def _cycle(graph):
    """One import cycle of ``graph`` as a list of nodes, or None."""
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "modules importing each other: " + " -> ".join(cycle)


def test_no_cycle_between_folders():
    """Folders (and top-level modules) as single nodes: what a reader of the tree sees."""
    folder_graph = {}
    for module, imported in _graph().items():
        here = module.rsplit(".", 1)[0] if module.count(".") > 1 else module
        for target in imported:
            there = target.rsplit(".", 1)[0] if target.count(".") > 1 else target
            if there != here and not here.startswith(there + ".") and not there.startswith(here + "."):
                folder_graph.setdefault(here, set()).add(there)
    cycle = _cycle({k: sorted(v) for k, v in folder_graph.items()})
    assert cycle is None, "folders importing each other: " + " -> ".join(cycle)


def test_the_checker_sees_an_upward_import_and_a_cycle():
    """The checks above can fail: a layer-breaking edge and a loop are found."""
    assert _cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert _cycle({"a": ["b"], "b": []}) is None
    layers = _layer_of_unit()
    assert layers["comm"] < layers["pipeline"] < layers["moe_layer"] < layers["inference"]
