"""The import graph as a contract (style-anchors.md §3.2), checked by walking every module of src/moeflow with ast.

    config (stdlib only) -> ops -> routing, dispatch, experts -> layers -> models -> {interop, train} -> cli
    parallel: ops, config, routing, dispatch, experts, layers (+ torch.distributed); nothing below train imports it
    analysis: ops, config, the Routing type; sim: config and stdlib/numpy only

Also: torch.distributed only under parallel/ and train/; matplotlib only in analysis/plots.py (or a plots_<topic>.py
sibling) and transformers only under interop/, both imported lazily (inside a function), so `import moeflow` never
pays for them.
A new top-level package must be given a row in ALLOWED before it can land: that is deliberate.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moeflow"

CORE = {"config", "ops", "routing", "dispatch", "experts", "layers"}
# which moeflow packages each package may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "ops": {"config"},
    "routing": {"config", "ops"},
    "dispatch": {"config", "ops", "routing"},  # the dispatcher reads the Routing record
    "experts": {"config", "ops"},
    "layers": {"config", "ops", "routing", "dispatch", "experts"},
    "models": CORE,
    "interop": CORE | {"models"},
    "parallel": CORE,
    "analysis": {"config", "ops", "routing"},
    # compressed experts are experts (core), fitted from a layer's weights and the analysis' similarity/clusters
    "compress": CORE | {"analysis"},
    "sim": {"config"},
    "train": CORE | {"models", "interop", "parallel", "analysis", "compress"},  # loading a compressed run
    "tasks": CORE | {"models", "interop", "parallel", "analysis", "train", "compress"},
    "cli": CORE | {"models", "interop", "parallel", "analysis", "train", "tasks", "sim", "compress", "__init__"},
    "__init__": CORE | {"models", "interop"},  # `import moeflow`: no parallel/, train/, analysis/ or cli/
    "__main__": {"cli"},
}
# single modules allowed beyond their package's row
ALLOWED_MODULES: dict[str, set[str]] = {
    "analysis": {"moeflow.models.config"},  # the run report describes the model from its (stdlib-only) config
}
DISTRIBUTED_OK = {"parallel", "train"}
# third-party modules each package may not import (stdlib and these aside, anything goes)
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "config": {"torch", "numpy"},  # a stdlib-only leaf: configs load without torch
    "sim": {"torch"},  # the simulator works on plain arrays
}


def package_of(module: str) -> str:
    """'moeflow.routing.topk' -> 'routing'; 'moeflow.layers' -> 'layers'; 'moeflow' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    """Dotted module name of a file under src/moeflow (packages named by their __init__'s package)."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    """Whether the file is a package's __init__ (relative imports resolve against the package itself)."""
    return path.name == "__init__.py"


def imports_of(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """(absolute module, line, lazy) for every import, including importlib.import_module("literal") calls.

    `lazy` is True for imports inside a function body (they run only when the function is called).
    """
    out: list[tuple[str, int, bool]] = []
    base = module.split(".") if is_package else module.split(".")[:-1]

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, lazy) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - node.level + 1]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, node.lineno, lazy))
            # `from torch import distributed` / `from moeflow import layers` import submodules by name
            out.extend((f"{target}.{a.name}", node.lineno, lazy) for a in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__"):
                out.append((node.args[0].value, node.lineno, lazy))
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name) \
                and node.value.id == "torch":
            out.append(("torch.distributed", node.lineno, lazy))  # `torch.distributed.x` without an import
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return out


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """Every layering rule the module's source breaks, one message each."""
    pkg = package_of(module)
    if pkg not in ALLOWED:
        return [f"{module}: package '{pkg}' has no row in test_layering.ALLOWED; decide what it may import"]
    where = module.replace(".", "/")
    problems = []
    for target, line, lazy in imports_of(ast.parse(source), module, is_package):
        top = target.split(".")[0]
        at = f"{where}.py:{line} imports {target}"
        if target == "torch.distributed" or target.startswith("torch.distributed."):
            if pkg not in DISTRIBUTED_OK:
                problems.append(f"{at}: torch.distributed is allowed only under parallel/ and train/")
        elif top == "matplotlib":
            # analysis/plots.py, a plots/ package, or a sibling plots_<topic>.py (e.g. plots_lang.py)
            if module != "moeflow.analysis.plots" and not module.startswith(("moeflow.analysis.plots.",
                                                                              "moeflow.analysis.plots_")):
                problems.append(f"{at}: matplotlib is allowed only in analysis/plots.py")
            elif not lazy:
                problems.append(f"{at}: import matplotlib inside the plotting functions (lazily)")
        elif top == "transformers":
            if pkg != "interop":
                problems.append(f"{at}: transformers is allowed only under interop/")
            elif not lazy:
                problems.append(f"{at}: import transformers inside functions (lazily): it is an optional extra")
        elif top in FORBIDDEN_THIRD_PARTY.get(pkg, ()):
            problems.append(f"{at}: {pkg} may not depend on {top}")
        elif top == "moeflow":
            dep = package_of(target) if target != "moeflow" else "__init__"
            extra = ALLOWED_MODULES.get(pkg, set())
            if dep != pkg and dep not in ALLOWED[pkg] and not any(target == m or target.startswith(m + ".")
                                                                    for m in extra):
                problems.append(f"{at}: {pkg} may import only {sorted(ALLOWED[pkg]) or 'the standard library'}")
        elif pkg == "config" and top not in sys.stdlib_module_names and top != "__future__":
            problems.append(f"{at}: config must import only the standard library")
    return problems


def all_modules() -> list[Path]:
    """Every .py file of the package."""
    return sorted(SRC.rglob("*.py"))


def test_the_package_is_where_we_think() -> None:
    """Guard against walking an empty tree (the test would pass vacuously)."""
    names = {module_name(p) for p in all_modules()}
    assert {"moeflow.config", "moeflow.layers", "moeflow.routing.base", "moeflow.ops.capacity"} <= names


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_module_respects_layering(path: Path) -> None:
    """No upward import, no torch.distributed / matplotlib / transformers outside their homes."""
    assert violations(module_name(path), path.read_text(), _is_package(path)) == []


def test_import_moeflow_stays_light() -> None:
    """`import moeflow` (and the core) loads no optional extra and none of the training or parallel code."""
    code = ("import sys, moeflow, moeflow.layers, moeflow.routing\n"
            "heavy = ('matplotlib', 'transformers', 'safetensors', 'moeflow.parallel', 'moeflow.train', "
            "'moeflow.analysis', 'moeflow.cli')\n"
            "print(sorted(m for m in sys.modules if m.startswith(heavy)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("module, source, expected", [
    ("moeflow.ops.x", "import torch.distributed as dist", "torch.distributed is allowed only"),
    ("moeflow.layers", "from torch import distributed", "torch.distributed is allowed only"),
    ("moeflow.routing.x", "import torch\ndef f():\n    torch.distributed.barrier()", "torch.distributed"),
    ("moeflow.models.x", "import importlib\nimportlib.import_module('torch.distributed')", "torch.distributed"),
    ("moeflow.ops.losses", "from moeflow.routing import Routing", "ops may import only"),
    ("moeflow.ops.losses", "from ..layers import MoELayer", "ops may import only"),
    ("moeflow.routing.topk", "from .. import layers", "routing may import only"),
    ("moeflow.routing.topk", "import moeflow", "routing may import only"),
    ("moeflow.experts", "from moeflow.dispatch import LocalDispatcher", "experts may import only"),
    ("moeflow.layers", "from moeflow.models import llama", "layers may import only"),
    ("moeflow.models.llama", "from moeflow.train import trainer", "models may import only"),
    ("moeflow.config", "import torch", "config may not depend on torch"),
    ("moeflow.config", "import yaml", "config must import only the standard library"),
    ("moeflow.config", "from moeflow.ops import capacity", "config may import only"),
    ("moeflow.analysis.stats", "import matplotlib.pyplot as plt", "matplotlib is allowed only"),
    ("moeflow.analysis.plots", "import matplotlib.pyplot as plt", "lazily"),
    ("moeflow.models.llama", "def f():\n    import transformers", "transformers is allowed only"),
    ("moeflow.interop.hf", "from transformers import AutoModel", "lazily"),
    ("moeflow.sim.cost", "import torch", "sim may not depend on torch"),
    ("moeflow.analysis.stats", "from moeflow.models.llama import Llama", "analysis may import only"),
    ("moeflow.newpkg.x", "import os", "has no row"),
])
def test_the_checker_catches_violations(module, source, expected) -> None:
    """The rules bite: each synthetic module breaks one rule and is reported."""
    found = violations(module, source)
    assert any(expected in v for v in found), found


@pytest.mark.parametrize("module, source", [
    ("moeflow.routing.topk", "from moeflow.routing.base import Router\nfrom moeflow.ops.losses import z_loss"),
    ("moeflow.routing", "from .base import Router"),
    ("moeflow.parallel.ep", "import torch.distributed as dist\nfrom moeflow.dispatch import LocalDispatcher"),
    ("moeflow.analysis.plots", "def plot():\n    import matplotlib.pyplot as plt"),
    ("moeflow.interop.hf", "def load():\n    from transformers import AutoModel"),
    ("moeflow.config", "from __future__ import annotations\nimport dataclasses\nfrom fractions import Fraction"),
    ("moeflow.analysis.report", "from moeflow.models.config import ModelConfig"),
])
def test_the_checker_accepts_allowed_imports(module, source) -> None:
    """Allowed patterns pass (relative imports resolve within the package)."""
    assert violations(module, source, is_package=module == "moeflow.routing") == []
