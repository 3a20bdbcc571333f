"""The core's imports: nothing under megatron_eps/ outside bench/ and testing/ imports the
benchmark-only package, and the pipeline core does not import the inference harness."""

import ast
import os

import megatron_eps

ROOT = os.path.dirname(megatron_eps.__file__)
# The inference harness (prefill CLI, model configs, SDPA attention) sits beside the core.
HARNESS = "megatron_eps.inference"
CLIS = ("megatron_eps.experts.calibrate", "megatron_eps.calibrate.cli")


def _modules():
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def _imports(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_core_does_not_import_benchmark_helpers_or_the_harness():
    offenders = []
    for module, path in _modules():
        if module.startswith(("megatron_eps.bench", "megatron_eps.testing")):
            continue
        for imported in _imports(path):
            if imported.startswith("megatron_eps.bench"):
                offenders.append((module, imported))
            in_harness = module == HARNESS or module.startswith(HARNESS + ".")
            # the calibration CLIs resolve model-config names like the prefill CLI
            if not in_harness and module not in CLIS and (
                imported == HARNESS or imported.startswith(HARNESS + ".")
            ):
                offenders.append((module, imported))
    assert not offenders, offenders
