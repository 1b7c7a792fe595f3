"""The layering holds: import-linter's contracts (pyproject.toml, [tool.importlinter]) and torch
kept out of the light layers at import time.

- The contracts: a layer imports only the layers below it (cli, train, report, eval, store,
  planner, model, data, config, then the base modules), with one exception (planner.verify runs
  train's own step); the torch-free layers never write `import torch`; config and the tokenizing
  workers never reach torch by any path. import-linter is a dev dependency: this test fails,
  not skips, without it.
- Module level: `fitgpt plan`, `fitgpt --help`, the config and `fitgpt prepare`'s workers must
  start without torch (seconds of import, gigabytes on disk that a planning machine may not
  have). import-linter cannot tell a lazy import inside a function from one at module level, so
  a fresh interpreter imports every module of those packages and torch must not be loaded.
- Each subpackage's __init__ is a docstring and nothing else, so that importing one module of a
  layer never drags in its siblings (fitgpt.model.shape without torch, say).
- The README's Layout names every module under its layer, and only modules that exist.

docs/architecture.md describes the layers; bench/draw_layers.py draws them.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

# Packages whose modules must import without torch; the modules that need it are left out.
TORCH_FREE = ["fitgpt.cli", "fitgpt.config", "fitgpt.data.prepare", "fitgpt.planner"]
NEEDS_TORCH = {"fitgpt.planner.verify", "fitgpt.planner.tracker"}

LINT = """\
import sys
from importlinter.cli import lint_imports
sys.exit(lint_imports(config_filename="pyproject.toml", no_cache=True))
"""


def test_import_contracts_hold():
    """Guards against a lower layer importing a higher one, and torch creeping into the light
    layers (import-linter's report names each import and its line)."""
    try:
        import importlinter  # noqa: F401
    except ImportError as e:  # a dev dependency: the README's test command installs it
        raise AssertionError("import-linter is missing: pip install -e '.[dev]'") from e
    proc = subprocess.run([sys.executable, "-c", LINT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200"})  # unwrapped lines
    if proc.returncode:
        report = proc.stdout + proc.stderr
        pytest.fail("import-linter (lint-imports): " + report.split("\nContracts\n", 1)[-1], pytrace=False)


# Run in a fresh interpreter: records the stack of the first import of torch, if any.
IMPORT_ALL = """\
import importlib, pkgutil, sys, traceback

class Watch:
    stack = None
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and Watch.stack is None:
            Watch.stack = [f for f in traceback.format_stack() if "<frozen" not in f]
        return None

sys.meta_path.insert(0, Watch())
skip = set(sys.argv[2].split(","))
names = []
for pkg_name in sys.argv[1].split(","):
    pkg = importlib.import_module(pkg_name)
    names.append(pkg_name)
    for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
        if info.name not in skip:
            names.append(info.name)
for name in names:
    importlib.import_module(name)
    if "torch" in sys.modules:
        print(f"importing {name} imported torch:")
        print("".join(Watch.stack or []))
        sys.exit(1)
print("\\n".join(names))
"""


def test_light_layers_import_no_torch_at_module_level():
    """Guards `fitgpt plan` and `fitgpt prepare` against a module-level `import torch`, direct or
    through another module (the failure shows the chain of imports that reached torch)."""
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL, ",".join(TORCH_FREE), ",".join(NEEDS_TORCH)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        pytest.fail(proc.stdout + proc.stderr, pytrace=False)
    imported = set(proc.stdout.split())
    # not vacuous: the walk found the modules that matter
    assert {"fitgpt.cli.main", "fitgpt.config.load", "fitgpt.planner.plan", "fitgpt.planner.gpus",
            "fitgpt.data.prepare.pipeline", "fitgpt.data.prepare.encode"} <= imported
    assert not imported & NEEDS_TORCH


def test_subpackage_inits_are_docstrings_only():
    """Guards against an __init__ that imports its modules: `import fitgpt.config.schema` would
    then load whatever the package's other modules load."""
    inits = sorted((ROOT / "fitgpt").rglob("__init__.py"))
    assert len(inits) >= 11
    for path in inits:
        tree = ast.parse(path.read_text())
        name = path.parent.relative_to(ROOT).as_posix()
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not imports, f"{name}/__init__.py imports: keep it a docstring"
        if name != "fitgpt":  # a layer says what it owns, what it may import, its entry points
            doc = ast.get_docstring(tree) or ""
            assert "Owns:" in doc and "May import:" in doc, f"{name}/__init__.py: say what the layer owns"


def test_architecture_picture_is_current():
    """Guards docs/architecture.svg against drifting from the code: it is redrawn from the import
    graph by bench/draw_layers.py, which fails here if the committed picture differs."""
    proc = subprocess.run([sys.executable, "bench/draw_layers.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode:
        pytest.fail(proc.stdout + proc.stderr, pytrace=False)


def layout_blocks() -> tuple[str, dict[str, str]]:
    """The README's Layout code block, and its lines grouped under each `fitgpt/LAYER/` line."""
    section = (ROOT / "README.md").read_text().split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    blocks: dict[str, str] = {}
    layer = None
    for line in block.splitlines():
        m = re.match(r"fitgpt/(\w+)/\s", line + " ")
        layer = m.group(1) if m else layer if line.startswith(" ") else None
        if layer:
            blocks[layer] = blocks.get(layer, "") + line + "\n"
    return block, blocks


def test_readme_layout_names_every_module():
    """Guards the README's map of the package against drifting from the files: a new module
    must be given a line, a removed or renamed one must lose its line."""
    block, blocks = layout_blocks()
    pkg = ROOT / "fitgpt"
    missing = []
    for path in sorted(pkg.rglob("*.py")):
        parts = path.relative_to(pkg).parts
        if path.name.startswith("__") or parts[0] == "configs":
            continue
        text = blocks.get(parts[0], "") if len(parts) > 1 else block
        if not re.search(rf"\b{re.escape(path.stem)}\b", text):
            missing.append(path.relative_to(ROOT).as_posix())
    assert not missing, f"not in the README's Layout: {missing}"
    named = [(layer, f) for layer, text in blocks.items() for f in re.findall(r"\b\w+\.py\b", text)]
    gone = [f"{layer}/{f}" for layer, f in named if not list((pkg / layer).rglob(f))]
    assert not gone, f"the README's Layout names files that do not exist: {gone}"
