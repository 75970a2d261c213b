"""How alike the clients' first gradients are: why a router has nothing to go on at first.

For each client of an experiment, the gradient of its training loss with respect to every
LoRA B factor of one fresh adaptor (B = 0, A at its seeded init, as FLoRAL's adaptors start),
on all its training data at once. Prints the cosine between every two clients, then the same
with the clients' mean gradient removed, and how much of a client's gradient the mean is.

    python scripts/first_gradients.py configs/translations-family.toml --seed 0

Settings as in scripts/llm_family.sh (rank 8 on every linear layer, no bias); `--set` as in
`floral run`. One forward and backward per client: about a minute for the translations task.
"""

from __future__ import annotations

import argparse

import torch

from floral.experiment import build_setup, load_config
from floral.train.objective import get_objective

FAMILY = [
    'method.include=["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", '
    '"*.up_proj", "*.down_proj"]',
    "method.rank=8",
    "method.bias=false",
    'method.layer_types=["linear"]',
]


def client_gradients(
    config_path: str, seed: int, overrides: list[str]
) -> tuple[torch.Tensor, list[int]]:
    """(K, D) gradients of the B factors, and the clients' clusters."""
    sets = [*FAMILY, "method.name=local-adaptor", "method.train_base=false", f"seed={seed}"]
    config = load_config(config_path, [*sets, *overrides])
    _, task, model = build_setup(config)
    loss = get_objective(task.kind).loss
    factors = [p for name, p in model.named_parameters() if name.endswith("lora_B")]
    rows = []
    for client in task.clients:
        grads = torch.autograd.grad(loss(model(client.x_train), client.y_train), factors)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows), [client.cluster for client in task.clients]


def cosines(vectors: torch.Tensor) -> torch.Tensor:
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    return unit @ unit.T


def show(title: str, matrix: torch.Tensor, clusters: list[int]) -> None:
    print(title)
    print("      " + " ".join(f"{k}/{c}".rjust(6) for k, c in enumerate(clusters)))
    for k, row in enumerate(matrix):
        print(f"{k}/{clusters[k]}".rjust(6) + " ".join(f"{v:6.2f}" for v in row.tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gradients, clusters = client_gradients(args.config, args.seed, args.overrides)
    mean = gradients.mean(dim=0)
    print(f"seed {args.seed}: {len(clusters)} clients (client/cluster)")
    show("cosine of the first gradients", cosines(gradients), clusters)
    show("cosine with the clients' mean gradient removed", cosines(gradients - mean), clusters)
    share = float(mean.norm() / gradients.norm(dim=1).mean())
    print(f"length of the mean gradient / mean length of a client's: {share:.2f}")


if __name__ == "__main__":
    main()
