"""The README and docs/*.md cite only code and files that exist; benchmarks/results/INDEX.md
names every results file and only files that exist; the README stays short.

Names are resolved from the sources (``ast``) first, so that a module that cannot be imported
here (Triton, CUDA) is still checked; an attribute the sources do not show (inherited, or a
lazy module attribute) is then looked up by importing the module. A failure lists every
missing name with the file and line that cites it.
"""

import argparse
import ast
import builtins
import functools
import glob
import fnmatch
import importlib
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = "megatron_eps"
RESULTS = os.path.join(ROOT, "benchmarks", "results")
INDEX = os.path.join(RESULTS, "INDEX.md")
README_MAX_LINES = 250
CODE_FOLDERS = ("megatron_eps", "benchmarks", "tests", "examples", "scripts", "configs")
# Transformer Engine cannot be installed on the machines that run these tests.
TRANSFORMER_ENGINE_NAMES = {"GroupedLinear"}
# Files and names of other projects the docs mention (a Hugging Face checkpoint, Megatron-LM
# beyond megatron-core, Apex), which are not installed where these tests run.
EXTERNAL_FILES = {
    "config.json", "pretrain_gpt.py", "gpt_static_inference.py", "gpt_dynamic_inference.py",
    "examples/inference/gpt/", "examples/inference/offline_inference.py",
    "examples/inference/launch_inference_server.py", "tools/run_text_generation_server.py",
    "megatron/core/dist_checkpointing/strategies/filesystem_async.py",
    "megatron/core/datasets/helpers.cpp",
    # Megatron-LM core_r0.19.0's tokenizers and text generation (newer than CI's megatron-core)
    "megatron/core/inference/text_generation_controllers/text_generation_controller.py",
    "megatron/core/tokenizers/text/text_tokenizer.py",
    "megatron/core/tokenizers/text/libraries/null_tokenizer.py",
    "megatron/core/transformer/attention.py",
    # the files of a Hugging Face tokenizer folder
    "tokenizer.json", "tokenizer_config.json",
}
# First components of dotted names that are not megatron-eps's: other packages, and the
# variables and profiler ranges the docs write about. Any other first component must name a
# module of megatron_eps (or a class or function of it), so a renamed module is caught.
EXTERNAL_ROOTS = {"torch", "nn", "Tensor", "Stream", "Event", "megatron", "np", "triton",
                  "cfg", "module", "model", "args", "eps_config", "eps", "MoELayer",
                  "gpt_builders", "tokenizer", "TextGenerationController", "Attention", "weight"}
EXTERNAL_NAMES = {"GPTModelBuilder", "GPTModelConfig", "_process_memory",
                  "fused_weight_gradient_mlp_cuda", "TokenizerConfig", "flash_attn_with_kvcache"}
FILE_SUFFIXES = (".py", ".json", ".yaml", ".yml", ".sh", ".md", ".txt", ".log", ".tgz", ".png",
                 ".ini", ".cfg", ".toml")


def _doc_files():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _backticked(path):
    """(line number, token) for every `code span` of a markdown file, code blocks left out."""
    spans, in_block = [], False
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            if not in_block:
                spans.extend((number, token) for token in re.findall(r"`([^`\n]+)`", line))
    return spans


class _Module:
    def __init__(self, dotted, path):
        self.dotted, self.path = dotted, path
        with open(path) as f:
            self.tree = ast.parse(f.read())
        self.names = set()
        self.classes = {}
        for node in self.tree.body:
            self.names.update(_bound_names(node))
            if isinstance(node, ast.ClassDef):
                self.classes[node.name] = _class_attributes(node)
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                # A lazy attribute (PEP 562): the names its body compares ``name`` with.
                self.names.update(leaf.value for leaf in ast.walk(node)
                                  if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str))


def _bound_names(node):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    targets = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    names = set()
    for target in targets:
        for leaf in ast.walk(target):
            if isinstance(leaf, ast.Name):
                names.add(leaf.id)
    if isinstance(node, (ast.If, ast.Try)):
        for child in ast.iter_child_nodes(node):
            names.update(_bound_names(child))
    return names


def _class_attributes(cls):
    names = set()
    for node in cls.body:
        names.update(_bound_names(node))
    for node in ast.walk(cls):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
    return names


@functools.lru_cache(maxsize=None)
def _modules():
    """Every module and package of megatron_eps, by dotted name."""
    modules = {}
    for path in glob.glob(os.path.join(ROOT, PACKAGE, "**", "*.py"), recursive=True):
        relative = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        if relative[-1] == "__init__":
            relative = relative[:-1]
        modules[".".join(relative)] = _Module(".".join(relative), path)
    return modules


@functools.lru_cache(maxsize=None)
def _defined_anywhere():
    """Class and function names defined anywhere in megatron_eps -> the modules defining them."""
    where = {}
    for module in _modules().values():
        for node in module.tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                where.setdefault(node.name, []).append(module)
    return where


@functools.lru_cache(maxsize=None)
def _code_words():
    words = set()
    for folder in CODE_FOLDERS:
        for path in glob.glob(os.path.join(ROOT, folder, "**", "*"), recursive=True):
            if path == os.path.abspath(__file__):
                continue  # this test names missing names on purpose
            if os.path.isfile(path) and path.endswith((".py", ".sh", ".yaml", ".json")):
                with open(path, errors="replace") as f:
                    words.update(re.findall(r"[A-Za-z_]\w*", f.read()))
    return words


def _has_attribute_by_import(dotted_module, attributes):
    try:
        value = importlib.import_module(dotted_module)
        for attribute in attributes:
            value = getattr(value, attribute)
    except Exception:  # noqa: BLE001 - any failure means the cited name cannot be reached
        return False
    return True


def _resolve_in_module(module, attributes):
    """Whether ``module.attributes[0].attributes[1]...`` exists."""
    if not attributes:
        return True
    first, rest = attributes[0], attributes[1:]
    modules = _modules()
    if f"{module.dotted}.{first}" in modules:
        return _resolve_in_module(modules[f"{module.dotted}.{first}"], rest)
    if first in module.names:
        if not rest:
            return True
        if first in module.classes and len(rest) == 1 and rest[0] in module.classes[first]:
            return True
    return _has_attribute_by_import(module.dotted, attributes)


def _candidate_modules(head):
    """Modules a citation's first component may name: the package itself, a module or package
    whose dotted name ends with it, or the modules that define a class or function of that
    name (then the component is an attribute of the module)."""
    modules = _modules()
    if head == PACKAGE:
        return [(modules[PACKAGE], [])]
    found = [(module, []) for dotted, module in modules.items() if dotted.endswith("." + head)]
    found += [(module, [head]) for module in _defined_anywhere().get(head, [])]
    return found


def _dotted_citation_exists(token):
    parts = token.split(".")
    candidates = _candidate_modules(parts[0])
    if not candidates:
        # torch._grouped_mm, cfg.replace, ...; anything else is a module that is gone
        return None if parts[0] in EXTERNAL_ROOTS else False
    for module, prefix in candidates:
        rest = parts[1:]
        # the longest run of components that names a submodule
        while rest and f"{module.dotted}.{rest[0]}" in _modules() and not prefix:
            module, rest = _modules()[f"{module.dotted}.{rest[0]}"], rest[1:]
        if _resolve_in_module(module, prefix + rest):
            return True
    return False


def _path_exists(token, doc_path):
    token = token.rstrip("/")
    pattern = token.replace("{", "*").replace("}", "*")
    bases = [ROOT, os.path.dirname(doc_path), os.path.join(ROOT, PACKAGE), RESULTS]
    return any(glob.glob(os.path.join(base, pattern)) for base in bases)


@functools.lru_cache(maxsize=None)
def _repository_basenames():
    names = set()
    for folder, _, files in os.walk(ROOT):
        if "/." in folder[len(ROOT):]:
            continue
        names.update(files)
    return names


def _missing_citations(doc_path):
    missing = []
    rel = os.path.relpath(doc_path, ROOT)
    for line, raw in _backticked(doc_path):
        token = raw.strip()
        token = re.sub(r"\(.*\)$", "", token)  # a call: `choose_backend(requested, ...)`
        if (re.search(r"[<>~$\s]|^[/.-]|://", token) or token in EXTERNAL_FILES
                or token in EXTERNAL_NAMES):
            continue  # placeholders, absolute, hidden or generated paths, flags, shell lines
        if re.fullmatch(r"[\w.*{},/-]+", token) is None:
            continue
        looks_like_path = "/" in token or token.endswith(FILE_SUFFIXES)
        if looks_like_path:
            if "/" in token:
                exists = _path_exists(token, doc_path)
            else:
                exists = bool(fnmatch.filter(_repository_basenames(), token))
            if not exists:
                missing.append(f"{rel}:{line}: file `{raw}`")
            continue
        if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", token):
            if _dotted_citation_exists(token) is False:
                missing.append(f"{rel}:{line}: name `{raw}`")
            continue
        if re.fullmatch(r"[A-Z][a-z0-9]+[A-Z]\w*|[A-Z][A-Z0-9]*[a-z]\w*[A-Z]\w*", token):
            if token not in _defined_anywhere() and not _defined_outside(token):
                missing.append(f"{rel}:{line}: class `{raw}`")
            continue
        if re.fullmatch(r"_?[a-z][a-z0-9]*(_[a-z0-9]+)+", token):
            if token not in _code_words():
                missing.append(f"{rel}:{line}: name `{raw}`")
    return missing


@functools.lru_cache(maxsize=None)
def _defined_outside(name):
    """A class of Megatron-Core, torch or Transformer Engine the docs mention."""
    if name in TRANSFORMER_ENGINE_NAMES or hasattr(builtins, name):
        return True
    for package in ("megatron.core", "torch"):
        try:
            spec = importlib.util.find_spec(package)
        except Exception:  # noqa: BLE001
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        root = list(spec.submodule_search_locations)[0]
        if _class_defined_under(root, name):
            return True
    return False


@functools.lru_cache(maxsize=None)
def _class_sources(root):
    names = set()
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        with open(path, errors="replace") as f:
            names.update(re.findall(r"^\s*class (\w+)", f.read(), re.M))
    return names


def _class_defined_under(root, name):
    return name in _class_sources(root)


def test_docs_cite_only_existing_code_and_files():
    missing = []
    for doc in _doc_files():
        missing += _missing_citations(doc)
    assert not missing, "README/docs cite names or files that do not exist:\n" + "\n".join(missing)


def test_docs_links_reach_existing_files():
    broken = []
    for doc in _doc_files() + [INDEX]:
        with open(doc) as f:
            for number, line in enumerate(f, 1):
                for target in re.findall(r"\]\(([^)\s]+)\)", line):
                    if re.match(r"[a-z]+:", target) or target.startswith("#"):
                        continue
                    path = os.path.join(os.path.dirname(doc), target.split("#")[0])
                    if not os.path.exists(path):
                        broken.append(f"{os.path.relpath(doc, ROOT)}:{number}: link ({target})")
    assert not broken, "README/docs link to files that do not exist:\n" + "\n".join(broken)


def test_citation_check_catches_a_renamed_module_and_attribute(tmp_path):
    doc = tmp_path / "doc.md"
    # Existing names from the paths the package keeps stable (megatron_eps.config, .spec, .compat).
    doc.write_text("`megatron_eps.config.EPSConfig` `config.EPSConfig.from_args` "
                   "`spec.apply_eps` `megatron_eps/compat.py`\n"
                   "`megatron_eps.confg.EPSConfig` `selection.resolve_transport` `tokens_ready` "
                   "`pipeline/no_such_module.py` `EPSConfgError` `no_such_module.build_plan`\n")
    missing = _missing_citations(str(doc))
    assert [entry.split(": ", 1)[1] for entry in missing] == [
        "name `megatron_eps.confg.EPSConfig`", "name `selection.resolve_transport`",
        "name `tokens_ready`", "file `pipeline/no_such_module.py`", "class `EPSConfgError`",
        "name `no_such_module.build_plan`"]


def _index_paths():
    with open(INDEX) as f:
        text = f.read()
    # Each file row starts with its path relative to benchmarks/results/, in backticks.
    return re.findall(r"^\|\s*`([^`]+)`", text, re.M)


def test_results_index_names_every_file_and_only_existing_ones():
    assert os.path.exists(INDEX), "benchmarks/results/INDEX.md is missing"
    named = _index_paths()
    on_disk = sorted(os.path.relpath(os.path.join(folder, name), RESULTS)
                     for folder, _, files in os.walk(RESULTS) for name in files
                     if os.path.join(folder, name) != INDEX)
    unnamed = [path for path in on_disk if path not in named]
    absent = [path for path in named if not os.path.isfile(os.path.join(RESULTS, path))]
    duplicated = sorted({path for path in named if named.count(path) > 1})
    assert not unnamed, "files under benchmarks/results/ that INDEX.md does not name:\n" + \
        "\n".join(unnamed)
    assert not absent, "INDEX.md names files that do not exist:\n" + "\n".join(absent)
    assert not duplicated, "INDEX.md names these files twice:\n" + "\n".join(duplicated)


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_readme_settings_table_lists_exactly_the_eps_flags():
    from megatron_eps.arguments import add_eps_args

    parser = argparse.ArgumentParser()
    add_eps_args(parser)
    flags = {option for action in parser._actions for option in action.option_strings
             if option.startswith("--eps-")}
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    table = set(re.findall(r"^\| `(--eps-[\w-]+)", readme, re.M))
    assert table == flags, (f"README settings table lacks {sorted(flags - table)}, "
                            f"lists unknown {sorted(table - flags)}")


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
