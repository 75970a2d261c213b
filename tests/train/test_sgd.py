"""floral's SGD: torch's update bit for bit, and a plain run never imports torch's compiler."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from support import ROOT
from support.experiment import TINY

from floral.train.sgd import SGD

SETTINGS = [
    {},
    {"weight_decay": 1e-2},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-3},
    {"momentum": 0.5, "nesterov": True},
    {"maximize": True, "weight_decay": 1e-2},
]


def _params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=generator))
            for shape in ((7, 5), (5,), (3, 2, 4))]


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
def test_sgd_takes_torch_sgd_steps_bit_for_bit(settings):
    ours, theirs = _params(0), _params(0)
    groups = [{"params": ours[:2], "lr": 0.1}, {"params": ours[2:], "lr": 0.03}]
    optimizer = SGD(groups, lr=0.1, **settings)
    reference = torch.optim.SGD([{"params": theirs[:2], "lr": 0.1},
                                 {"params": theirs[2:], "lr": 0.03}], lr=0.1, **settings)
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=generator) for p in ours]
        for mine, other, grad in zip(ours, theirs, grads):
            mine.grad, other.grad = grad.clone(), grad.clone()
        if step == 2:  # a tensor without a gradient keeps its value and its buffer
            ours[1].grad = theirs[1].grad = None
        optimizer.step()
        reference.step()
        optimizer.zero_grad()
        reference.zero_grad()
    for mine, other in zip(ours, theirs):
        assert torch.equal(mine, other)
    assert isinstance(optimizer, torch.optim.SGD)


def test_sgd_refuses_what_torch_refuses():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="more than one parameter group"):
        SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(ValueError, match="non-leaf"):
        SGD([p * 2], lr=0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        SGD([p], lr=0.1, nesterov=True)


def _imports_dynamo(tmp_path, *overrides: str) -> bool:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    sets = "".join(f", '--set', {o!r}" for o in overrides)
    script = textwrap.dedent(f"""
        import sys
        from floral.cli import main
        main(['run', {str(config)!r}, '--quiet', '--out', {str(tmp_path / "out")!r}{sets}])
        print('torch._dynamo' in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    return done.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("batch_clients", ["0", "4"])
def test_a_plain_run_never_imports_torch_compiler(tmp_path, batch_clients):
    # ~1.3 CPU-seconds of import, which used to land in the first round.
    assert not _imports_dynamo(tmp_path, f"engine.batch_clients={batch_clients}")
