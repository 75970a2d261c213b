"""The package as a user installs it: typed, lazy top-level names, a console command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import floral


def test_py_typed_ships_with_the_package():
    assert (Path(floral.__file__).parent / "py.typed").exists()


@pytest.mark.parametrize("name", [n for n in floral.__all__ if n != "__version__"])
def test_top_level_names_resolve(name):
    assert getattr(floral, name) is not None


def test_unknown_top_level_name_is_an_attribute_error():
    with pytest.raises(AttributeError):
        floral.does_not_exist  # noqa: B018


def test_console_command_runs():
    out = subprocess.run(
        [sys.executable, "-m", "floral.cli", "methods"], capture_output=True, text=True, check=True
    ).stdout
    assert "floral-oracle" in out
