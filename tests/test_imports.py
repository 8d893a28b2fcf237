"""The rooms of the house (DESIGN.md, Layout): which package may import which, read from the source files'
import statements, and the CLI's promise that `--help` does not import JAX."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxllm"

# room -> modules it must never import (directly, at any depth inside the function bodies too): the model is
# importable by research code without the trainer's I/O, and the tokenizer stands on its own.
FORBIDDEN = {
    "model": ("jaxllm.checkpoint", "jaxllm.weights", "jaxllm.trainer", "jaxllm.objectives", "jaxllm.data",
              "jaxllm.run_setup", "jaxllm.inference"),
    "tokenizer": ("jaxllm.model", "jaxllm.checkpoint", "jaxllm.weights", "jaxllm.trainer", "jaxllm.objectives"),
    "data": ("jaxllm.model", "jaxllm.checkpoint", "jaxllm.weights", "jaxllm.trainer", "jaxllm.objectives"),
}


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement in the file (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_does_not_import_forbidden_modules(room):
    offences = []
    for path in sorted((PACKAGE / room).rglob("*.py")):
        for name in imported_modules(path):
            for banned in FORBIDDEN[room]:
                if name == banned or name.startswith(banned + "."):
                    offences.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not offences, "\n".join(sorted(set(offences)))


def test_no_private_names_imported_across_modules():
    """`from jaxllm.x import _private` couples a module to another's internals."""
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxllm"):
                offences += [f"{path.relative_to(PACKAGE.parent)}: from {node.module} import {a.name}"
                             for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offences, "\n".join(offences)


def _modules_loaded_by(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["serve", "--help"],
                                  ["convert", "--help"], ["data", "--help"], ["tokenizer", "--help"]])
def test_cli_help_does_not_import_jax(argv):
    code = ("import contextlib, io\nfrom jaxllm.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try:\n        main({argv!r})\n    except SystemExit:\n        pass")
    loaded = _modules_loaded_by(code)
    heavy = sorted(m for m in loaded if m.split(".")[0] in ("jax", "orbax", "grain", "flax", "optax"))
    assert not heavy, f"`jaxllm {' '.join(argv)}` imported {heavy[:5]}"


def test_package_import_is_lazy_but_complete():
    """`import jaxllm` loads no JAX; every name in `jaxllm.__all__` still resolves on first use."""
    assert not {m for m in _modules_loaded_by("import jaxllm") if m.split(".")[0] == "jax"}
    import jaxllm
    missing = [name for name in jaxllm.__all__ if getattr(jaxllm, name, None) is None]
    assert not missing, missing
