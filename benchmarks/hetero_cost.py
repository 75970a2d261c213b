"""Computation and communication per client and round of the methods in docs/heterogeneous.md.

    python benchmarks/hetero_cost.py [config] [--methods pfedlora,local-hetero,...]

For every method (the same `name:key=value` specs as `floral compare`), one client step of
each of the first five clients (on `hetero-cnn`, one per architecture) runs under PyTorch's
FLOP counter (matmuls and convolutions, forward and backward, and FDLoRA's fusion search). The
FLOPs per training sample of each client are then weighted by every client's number of training
samples, so the figure is the mean over clients of one round's local work. Communication is the
upload of one client step: the number of values it sends and its bytes as float32, both
without the aggregation weights (one scalar per tensor).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from floral.compare import parse_method_specs, plan_runs
from floral.config import tomllib
from floral.experiment import build_setup
from floral.methods import WEIGHT_SUFFIX
from floral.methods.base import ClientJob, split_roles
from floral.train.objective import get_objective
from floral.train.state import StateSlots

DEFAULT_METHODS = (
    "pfedlora,local-hetero,fedavg:model.name=hetero-cnn-0,local:model.name=hetero-cnn-0,"
    "local-adaptor:model.name=hetero-cnn-0,floral:model.name=hetero-cnn-0:num_adaptors=4,"
    "fdlora:model.name=hetero-cnn-0:train_base=true:layer_types=[\"linear\"]"
)
PROBES = 5  # clients 0..4: one of each architecture on hetero-cnn


def client_costs(config) -> tuple[float, int]:  # noqa: ANN001
    """(mean training FLOPs per client-round, values uploaded per client-round)."""
    method, task, model = build_setup(config)
    slots = StateSlots(model)
    global_names, private_names = split_roles(method.roles(model))
    global_state = slots.snapshot(global_names)
    initial = slots.snapshot(private_names)
    per_sample: list[float] = []
    uploaded = 0
    for k in range(PROBES):
        client = task.clients[k]
        private = method.init_private(initial, client)
        with FlopCounterMode(display=False) as counter:
            job = ClientJob(
                global_state, private, client, config.train, get_objective(task.kind), seed=k
            )
            update = method.client_step(slots, job)
        per_sample.append(counter.get_total_flops() / client.num_train)
        values = sum(t.numel() for n, t in update.upload.items() if not n.endswith(WEIGHT_SUFFIX))
        uploaded = max(uploaded, values)
    sizes = [c.num_train for c in task.clients]
    flops = sum(per_sample[k % PROBES] * n for k, n in enumerate(sizes)) / len(sizes)
    return flops, uploaded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/fmnist-dirichlet-hetero.toml")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with open(args.config, "rb") as f:
        base = tomllib.load(f)
    base.setdefault("name", "cost")
    runs = plan_runs(base, parse_method_specs(args.methods), [0], out=Path("unused"))
    print(f"{'method':52s} {'MFLOP/client-round':>19s} {'values up':>10s} {'KB up':>8s}")
    for run in runs:
        flops, values = client_costs(run.config)
        print(f"{run.method.label:52s} {flops / 1e6:19.1f} {values:10d} {4 * values / 1e3:8.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
