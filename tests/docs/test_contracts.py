"""The layer contracts can fail: each check passes on floral as it is and breaks on a violation
planted in a copy of the package.

- import-linter (.importlinter): engines import no method module but the method contract, a
  method module written after the contract included; only floral.llm imports Hugging Face.
- Hugging Face packages loaded by name (`require("transformers")`, `importlib.import_module`),
  which import-linter cannot see: every module outside floral.llm is imported, and a small
  experiment run, in a fresh interpreter that must end without them; and no call outside
  floral.llm names them.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

SRC = ROOT / "src"
HUGGING_FACE = ("transformers", "peft", "datasets")
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"
# Imports every floral module outside floral.llm, runs the experiment given on the command
# line (if any) with floral's CLI, and fails naming any Hugging Face package then loaded.
PROBE = f"""
import importlib, pkgutil, sys
import floral

for module in pkgutil.walk_packages(floral.__path__, "floral."):
    if module.name.startswith("floral.llm"):
        continue
    try:
        importlib.import_module(module.name)
    except ModuleNotFoundError as error:  # the Flower engine without the flower extra
        if (error.name or "").partition(".")[0] not in ("flwr", "ray"):
            raise
if len(sys.argv) > 1:
    from floral.cli import main

    assert main(sys.argv[1:]) == 0
loaded = sorted({{name.partition(".")[0] for name in sys.modules}} & set({HUGGING_FACE!r}))
print("loaded:", *loaded)
sys.exit(1 if loaded else 0)
"""


def run(code: str, src: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter, in `cwd`, that imports floral from `src`."""
    # The repository root too: the contracts name the `scripts` package beside floral.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT)])}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def lint(src: Path, cwd: Path, contract: str) -> subprocess.CompletedProcess[str]:
    """lint-imports with the project's contracts, on the floral package under `src`."""
    args = ("--no-cache", "--contract", contract, str(ROOT / ".importlinter"))
    return run(LINT, src, cwd, *args)


def hugging_face_calls(src: Path) -> list[str]:
    """`path:line` of every call outside floral.llm, in the floral package under `src`, whose
    first argument names a Hugging Face module: `require("peft")`,
    `importlib.import_module("transformers.x")`, `__import__(...)`."""
    found = []
    for path in sorted((src / "floral").rglob("*.py")):
        relative = path.relative_to(src)
        if relative.parts[:2] == ("floral", "llm"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            first = node.args[0]
            if (isinstance(first, ast.Constant) and isinstance(first.value, str)
                    and first.value.partition(".")[0] in HUGGING_FACE):
                found.append(f"{relative.as_posix()}:{node.lineno}")
    return found


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of the floral package, to plant violations in; returns the folder holding it."""
    shutil.copytree(SRC / "floral", tmp_path / "floral",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def plant(src: Path, module: str, code: str) -> None:
    """Append `code` to `module` of the package under `src`, creating the module if new."""
    path = src.joinpath(*module.split(".")).with_suffix(".py")
    existing = path.read_text() if path.exists() else ""
    path.write_text(existing + "\n" + code + "\n")


# -- import-linter -------------------------------------------------------------------------------

CONTRACTS = ("engines-know-no-method", "hf-only-in-llm")


@pytest.mark.parametrize("contract", CONTRACTS)
def test_floral_keeps_the_contracts(tmp_path: Path, contract: str) -> None:
    result = lint(SRC, tmp_path, contract)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("contract", "plants", "chain"), [
    # A method module the contract has never heard of, imported by an engine.
    ("engines-know-no-method",
     {"floral.methods.brand_new": "class BrandNew: ...",
      "floral.engines.driver": "from floral.methods.brand_new import BrandNew"},
     "floral.engines.driver -> floral.methods.brand_new"),
    # The registry: it imports every method.
    ("engines-know-no-method", {"floral.engines.local": "from floral.methods import get_method"},
     "floral.engines.local -> floral.methods"),
    # A method module reached through the method contract that engines may import.
    ("engines-know-no-method",
     {"floral.methods.brand_new": "class BrandNew: ...",
      "floral.methods.base": "from floral.methods.brand_new import BrandNew"},
     "floral.methods.base -> floral.methods.brand_new"),
    ("hf-only-in-llm", {"floral.data.planted": "import transformers"},
     "floral.data.planted -> transformers"),
], ids=["new-method-module", "registry", "through-the-method-contract", "transformers"])
def test_a_planted_import_breaks_its_contract(
    copy: Path, contract: str, plants: dict[str, str], chain: str
) -> None:
    for module, code in plants.items():
        plant(copy, module, code)
    result = lint(copy, copy, contract)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0 kept, 1 broken" in result.stdout
    assert chain in result.stdout


# -- Hugging Face loaded by name -----------------------------------------------------------------

def test_no_module_outside_llm_loads_hugging_face(tmp_path: Path) -> None:
    experiment = ["run", str(ROOT / "configs" / "synthetic-mlp.toml"), "--quiet",
                  "--out", str(tmp_path / "run"), "--set", "train.rounds=2"]
    result = run(PROBE, SRC, tmp_path, *experiment)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "run").is_dir()  # the experiment ran


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="needs transformers, the llm extra")
def test_a_module_loading_transformers_by_name_is_caught(copy: Path) -> None:
    # A name no scan of the source sees, and no `import` for import-linter.
    plant(copy, "floral.data.planted",
          'import importlib\nimportlib.import_module("trans" + "formers")')
    result = run(PROBE, copy, copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "loaded: transformers" in result.stdout


def test_only_llm_calls_name_hugging_face() -> None:
    assert hugging_face_calls(SRC) == []


def test_a_call_naming_hugging_face_outside_llm_is_found(copy: Path) -> None:
    plant(copy, "floral.train.planted",
          "from floral.llm.deps import require\n\n\n"
          'def tokenizer():\n    return require("transformers").AutoTokenizer')
    plant(copy, "floral.data.planted",
          'import importlib\nPEFT = importlib.import_module("peft.tuners")')
    assert hugging_face_calls(copy) == ["floral/data/planted.py:3", "floral/train/planted.py:6"]
