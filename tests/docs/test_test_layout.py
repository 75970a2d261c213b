"""The tests' own layout: test modules in a folder per layer, what they share in `support`.

A static scan (`ast`) of every Python file under tests/: only conftest.py sits directly in
tests/; every other file outside tests/support is a test module (test_*.py) or a conftest.py;
no file imports a test module (`test_*`, `conftest`, or through a layer folder such as
`flower.test_flower_resume`), and no file outside tests/support imports an underscore name
from it (a module or a name starting with `_`). Each check also runs on a planted violation.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support import ROOT

TESTS = ROOT / "tests"
SUPPORT = "support"


def _layers(tests: Path) -> set[str]:
    """The folders of tests/ that hold test modules: importable by name, never to be imported."""
    return {p.name for p in tests.iterdir() if p.is_dir() and p.name != SUPPORT
            and not p.name.startswith((".", "_"))}


def _imports(tree: ast.AST) -> list[tuple[int, str, list[str], int]]:
    """(line, module, imported names, relative level) of every import in `tree`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, [], 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            found.append((node.lineno, node.module or "", names, node.level))
    return found


def _is_test_module(module: str, layers: set[str]) -> bool:
    parts = module.split(".")
    return (parts[0] in layers
            or any(p.startswith("test_") or p == "conftest" for p in parts))


def layout_problems(tests: Path) -> list[str]:
    """One line per file that breaks the layout, `path:line: what`, paths relative to tests/."""
    problems = []
    layers = _layers(tests)
    for path in sorted(tests.rglob("*.py")):
        relative = path.relative_to(tests)
        in_support = relative.parts[0] == SUPPORT
        if len(relative.parts) == 1 and path.name != "conftest.py":
            problems.append(f"{relative}: only conftest.py sits directly in tests/; a test "
                            "module goes to its layer's folder, a helper to tests/support")
        elif not in_support and not (path.name.startswith("test_") or path.name == "conftest.py"):
            problems.append(f"{relative}: a helper module beside the tests; "
                            "what tests share goes to tests/support")
        tree = ast.parse(path.read_text(), str(path))
        for line, module, names, level in _imports(tree):
            where = f"{relative.as_posix()}:{line}"
            if level and not in_support:
                problems.append(f"{where}: a relative import in a test module")
                continue
            if _is_test_module(module, layers):
                problems.append(f"{where}: imports the test module {module}; "
                                "move what it shares to tests/support")
            if in_support or module.split(".")[0] != SUPPORT:
                continue
            private = [p for p in module.split(".") if p.startswith("_")]
            private += [n for n in names if n.startswith("_")]
            if private:
                problems.append(f"{where}: imports {', '.join(private)} from {module}; "
                                "give it a public name in support")
    return problems


def test_the_tests_keep_their_layout():
    assert layout_problems(TESTS) == []


def test_support_is_a_package_and_the_layers_mirror_floral():
    assert (TESTS / SUPPORT / "__init__.py").is_file()
    floral = {p.name for p in (ROOT / "src" / "floral").iterdir() if (p / "__init__.py").is_file()}
    # Every package of floral has its folder of tests; flower and docs are layers of their own.
    assert floral <= _layers(TESTS), floral - _layers(TESTS)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A tests/ folder that keeps the layout; each test below plants one violation in it."""
    (tmp_path / "conftest.py").write_text("import pytest\n")
    (tmp_path / "support").mkdir()
    (tmp_path / "support" / "__init__.py").write_text("")
    (tmp_path / "support" / "flower.py").write_text(
        "from support import ROOT\n\n\ndef run_loopback(): ...\n\n\ndef _grid(): ...\n")
    (tmp_path / "flower").mkdir()
    (tmp_path / "flower" / "test_resume.py").write_text(
        "from support.flower import run_loopback\n\n\ndef test_it(): run_loopback()\n")
    (tmp_path / "flower" / "test_lineages.py").write_text("def test_it(): ...\n")
    assert layout_problems(tmp_path) == []
    return tmp_path


@pytest.mark.parametrize("code", [
    "from test_resume import Stop",
    "import test_resume",
    "from flower.test_resume import Stop",
    "from flower import test_resume",
    "import flower.test_resume as resume",
    "from conftest import thing",
    "def test_it():\n    from test_resume import Stop",
])
def test_a_test_module_importing_another_is_found(tree: Path, code: str):
    (tree / "flower" / "test_lineages.py").write_text(code + "\n")
    (problem,) = layout_problems(tree)
    assert problem.startswith("flower/test_lineages.py:") and "imports the test module" in problem


@pytest.mark.parametrize("code", [
    "from support.flower import _grid",
    "from support.flower import run_loopback, _grid as grid",
    "from support._private import helper",
    "import support._private",
])
def test_an_underscore_name_from_support_is_found(tree: Path, code: str):
    (tree / "flower" / "test_lineages.py").write_text(code + "\n")
    (problem,) = layout_problems(tree)
    assert problem.startswith("flower/test_lineages.py:1:") and "public name" in problem


def test_a_relative_import_in_a_test_module_is_found(tree: Path):
    (tree / "flower" / "test_lineages.py").write_text("from . import test_resume\n")
    (problem,) = layout_problems(tree)
    assert "relative import" in problem


@pytest.mark.parametrize("name", ["test_top.py", "helpers.py"])
def test_a_file_directly_in_tests_is_found(tree: Path, name: str):
    (tree / name).write_text("def test_it(): ...\n")
    (problem,) = layout_problems(tree)
    assert problem.startswith(f"{name}: only conftest.py")


def test_a_helper_module_beside_the_tests_is_found(tree: Path):
    (tree / "flower" / "helpers.py").write_text("def helper(): ...\n")
    (problem,) = layout_problems(tree)
    assert problem.startswith("flower/helpers.py: a helper module")
