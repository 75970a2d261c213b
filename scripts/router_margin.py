"""How a finished `floral-em` run's adaptors judge each client, on its training samples and on
its test samples.

    python scripts/router_margin.py results/paper/mnist5k-rotate-5pct/floral-em/seed0

For every client, the loss of its samples under each adaptor alone (the E-step's comparison).
Prints the cluster recovery (ARI) of the client's assignment, of the adaptor with the lowest
loss on its training samples and of the one with the lowest loss on its test samples, and the
mean margin of the assigned adaptor (the best other adaptor's loss minus its own): a margin
that is large on the training samples but about zero on the test samples means the adaptors
are judged on what they memorized, not on what tells the clusters apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from floral.config import tomllib
from floral.experiment import build_setup, resolve_config
from floral.methods.floral_em import FIXED, adaptor_losses
from floral.train.objective import get_objective
from floral.train.recovery import adjusted_rand_index


def margin(losses: torch.Tensor, chosen: int) -> float:
    others = torch.cat([losses[:chosen], losses[chosen + 1:]])
    return float(others.min() - losses[chosen])


def main() -> None:
    run = Path(sys.argv[1])
    config = resolve_config(tomllib.loads((run / "config.toml").read_text()))
    _, task, model = build_setup(config)
    state = load_file(run / "state.safetensors")
    model.load_state_dict(
        {k.removeprefix("global/"): v for k, v in state.items() if k.startswith("global/")},
        strict=False,
    )
    loss = get_objective(task.kind).loss
    truth, assigned, by_train, by_test, train_margin, test_margin = [], [], [], [], [], []
    for client in task.clients:
        fixed = state.get(f"private/{client.client_id}/{FIXED}")
        if fixed is None or fixed.max() < 1:
            continue  # never sampled: no assignment
        chosen = int(fixed.argmax())
        on_train = adaptor_losses(model, client.x_train, client.y_train, loss)
        on_test = adaptor_losses(model, client.x_test, client.y_test, loss)
        truth.append(client.cluster)
        assigned.append(chosen)
        by_train.append(int(on_train.argmin()))
        by_test.append(int(on_test.argmin()))
        train_margin.append(margin(on_train, chosen))
        test_margin.append(margin(on_test, chosen))
    print(f"clients with an assignment: {len(truth)} of {len(task.clients)}")
    for name, labels in [("assigned", assigned), ("lowest training loss", by_train),
                         ("lowest test loss", by_test)]:
        print(f"ARI, {name}: {adjusted_rand_index(np.asarray(truth), np.asarray(labels)):.2f}")
    print(f"margin of the assigned adaptor, training samples: "
          f"{sum(train_margin) / len(train_margin):.3f}")
    print(f"margin of the assigned adaptor, test samples: "
          f"{sum(test_margin) / len(test_margin):.3f}")


if __name__ == "__main__":
    main()
