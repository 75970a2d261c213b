"""What the tests share: harnesses, builders of files and configs, and checks of results.

Test modules import from here (`from support.flower import run_loopback`), never from one
another; pytest puts `tests/` on the path (`pythonpath` in pyproject.toml). The modules that
need an optional extra import it at their top, so a test module imports them after its own
`pytest.importorskip`:

- `support.data`: files the tests write (IDX nodes, R data, .mo catalogs) and their configs;
- `support.experiment`: a tiny experiment file;
- `support.llm`: a language-model user's `messages` file, its experiment, a tiny chat model;
- `support.results`: a finished run's numbers checked against its results folder;
- `support.steps`: one client step or one server update by hand;
- `support.flower` (needs flwr): a loopback Grid, a faulty ClientApp, resume checks;
- `support.federation`: a real SuperLink and SuperNodes on 127.0.0.1;
- `support.deployment` (needs flwr): the example Flower app and its experiment.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ROOT"]

ROOT = Path(__file__).resolve().parents[2]  # the repository root
