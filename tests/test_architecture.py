"""The package layout keeps its promises (docs/design.md, "Layers"): imports only go down the layers
of the table in docs/design.md, no private name crosses modules, modules and functions stay small,
every module has a literal ``__all__``, no module is named like a public function, and the type
checker passes on ``fxnorm/``."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

import fxnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "fxnorm")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
#: a function longer than MAX_FUNCTION_LINES says why in its docstring with these words
LONG_REASON = "Long because"


@dataclass
class Module:
    name: str  # fxnorm.graph.calls
    path: str
    tree: ast.Module
    source: str


def _modules() -> list[Module]:
    found = []
    for folder, _, files in os.walk(PACKAGE):
        for file in sorted(files):
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            with open(path) as f:
                source = f.read()
            found.append(Module(name, path, ast.parse(source), source))
    return sorted(found, key=lambda m: m.name)


MODULES = _modules()
NAMES = {m.name for m in MODULES}


def _layer_table() -> dict[str, int]:
    """``{"fxnorm.graph": 2, ...}`` from the layer table of docs/design.md."""
    with open(os.path.join(ROOT, "docs", "design.md")) as f:
        text = f.read()
    table: dict[str, int] = {}
    for match in re.finditer(r"^\| (\d) \| ((?:`[\w_]+`(?:, )?)+) \|", text, flags=re.M):
        for name in re.findall(r"`([\w_]+)`", match.group(2)):
            table["fxnorm" if name == "__init__" else f"fxnorm.{name}"] = int(match.group(1))
    return table


LAYERS = _layer_table()


def _unit(name: str) -> str:
    """The layer-table entry a module belongs to: ``fxnorm.graph.calls`` -> ``fxnorm.graph``."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def _imports(module: Module) -> list[tuple[str, list[str], int]]:
    """Every fxnorm import of a module (top level and inside functions): (module, names, line)."""
    package = module.name if module.path.endswith("__init__.py") else module.name.rpartition(".")[0]
    found = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "fxnorm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "fxnorm":
                found.append((target, [a.name for a in node.names], node.lineno))
    return found


def test_the_layer_table_names_every_package_and_top_level_module():
    units = {_unit(m.name) for m in MODULES}
    assert units <= set(LAYERS), f"not in the layer table of docs/design.md: {sorted(units - set(LAYERS))}"
    assert set(LAYERS) <= units, f"the layer table names what does not exist: {sorted(set(LAYERS) - units)}"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_imports_go_down_the_layers(module: Module):
    here = _unit(module.name)
    bad = []
    for target, names, line in _imports(module):
        # "from fxnorm.graph import tracing" names a module: judge the module, not the package
        targets = [f"{target}.{n}" if f"{target}.{n}" in NAMES else target for n in names or [""]]
        for full in targets:
            there = _unit(full)
            if there == here or there not in LAYERS:
                continue
            if LAYERS[there] >= LAYERS[here]:
                bad.append(f"line {line}: {full} (layer {LAYERS[there]}) from {here} (layer {LAYERS[here]})")
    assert not bad, "imports that do not go down the layers:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_no_private_name_is_imported_from_another_module(module: Module):
    bad = [f"line {line}: {name} from {target}" for target, names, line in _imports(module)
           for name in names if name.startswith("_") and not name.startswith("__") and target != module.name]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_modules_are_small(module: Module):
    lines = module.source.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{module.name} has {lines} lines (at most {MAX_MODULE_LINES}): split it"


def _code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> int:
    body = function.body
    docstring = ast.get_docstring(function) is not None
    start = body[1].lineno if docstring and len(body) > 1 else body[0].lineno
    if docstring and len(body) == 1:
        return 0
    lines = source[start - 1: function.end_lineno]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_functions_are_short_or_say_why(module: Module):
    source = module.source.splitlines()
    long = []
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            count = _code_lines(node, source)
            if count > MAX_FUNCTION_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
                long.append(f"{node.name} (line {node.lineno}): {count} lines of code")
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines of code without '{LONG_REASON} ...' in their "
                      "docstring:\n" + "\n".join(long))


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_every_module_has_a_literal_all_of_names_it_defines(module: Module):
    values = [node.value for node in module.tree.body if isinstance(node, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)]
    values += [node.value for node in module.tree.body if isinstance(node, ast.AnnAssign)
               and isinstance(node.target, ast.Name) and node.target.id == "__all__" and node.value is not None]
    if module.name.endswith("__main__") or (module.path.endswith("__init__.py") and module.name != "fxnorm"
                                             and "__all__" not in module.source):
        return  # a package's __init__ may be a docstring only
    assert len(values) == 1, f"{module.name} needs exactly one __all__ = [...]"
    value = values[0]
    assert isinstance(value, (ast.List, ast.Tuple)) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts
    ), f"{module.name}.__all__ must be a literal list of strings"
    names = [e.value for e in value.elts]  # type: ignore[attr-defined]
    assert len(names) == len(set(names)), f"{module.name}.__all__ lists a name twice"
    loaded = importlib.import_module(module.name)
    missing = [n for n in names if n not in vars(loaded)]
    assert not missing, f"{module.name}.__all__ names what it does not define: {missing}"


def test_no_module_is_named_like_a_public_function():
    functions = {name for name in fxnorm.__all__ if inspect.isfunction(getattr(fxnorm, name))}
    clashes = [m.name for m in MODULES if set(m.name.split(".")[1:]) & functions]
    assert not clashes, f"modules named like public functions (importing them would rebind the function): {clashes}"


def test_every_public_name_is_importable_from_fxnorm_and_documented():
    for name in fxnorm.__all__:
        obj = getattr(fxnorm, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert obj.__doc__ and obj.__doc__.strip(), f"fxnorm.{name} has no docstring"


def test_the_type_checker_passes_on_the_package():
    pytest.importorskip("mypy", reason="mypy is in the 'test' extra")
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"),
                             "--cache-dir", os.devnull, PACKAGE], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
