"""The engine's batched round vs a bare batched loop written out by hand, same clients.

    python benchmarks/bare_batched.py [--method fedavg|floral] [--rounds 20] [--repeats 7]

configs/synthetic-mlp.toml at its defaults (20 clients, all sampled and trained as one batch,
`engine.batch_clients = "auto"`), through the local engine and through a loop that does the
same work with nothing of floral's engine: stack every client's tensors on a leading axis,
forward and backward as batched products (`bmm`), the SGD update on the stacked tensors, then
the server's mean of the stacked result. For FLoRAL the loop also writes out the router (each
client's noise from a generator seeded as the engine seeds that client), the fused mixture,
the preconditioned factor gradients (rank 1: a division) and the pi-weighted mean of each
adaptor. Both start from the same tensors, take the same batches in the same order, and the
script checks that they end with the same global tensors (to float rounding) before timing.
It prints this process's CPU time per round, median and minimum over alternating repeats, and
the ratio engine / bare loop (goal: at most 1.15x median).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from floral.engines.driver import client_seed, sample_clients
from floral.experiment import build_engine, load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic-mlp.toml"
LAYERS = ("fc1", "fc2")  # the MLP's two linear layers, ReLU between them
EPS = 1e-5  # FLoRAL's precondition_eps


def engine_for(method: str, seed: int = 0):
    """The local engine at the config's defaults, never evaluating."""
    config = load_config(CONFIG, [f"method.name={method}", "engine.eval_every=1000000000",
                                  f"seed={seed}"])
    engine, task = build_engine(config)
    return engine, task, config


class BareLoop:
    """One federation of the config's clients, written with torch alone."""

    def __init__(self, method: str, engine, task, config) -> None:
        self.floral = method == "floral"
        self.task, self.train, self.seed = task, config.train, config.seed
        self.global_ = {n: t.clone() for n, t in engine.global_state.items()}
        clients = len(task.clients)
        self.logits = torch.stack([engine.local.private_state(k)["floral_router.logits"]
                                   for k in range(clients)]) if self.floral else None
        self.x = torch.stack([c.x_train for c in task.clients])
        self.y = torch.stack([c.y_train for c in task.clients])
        self.round = 0

    def run_round(self) -> None:
        self.round += 1
        train = self.train
        clients = sample_clients(self.seed, self.round, len(self.task.clients),
                                 train.clients_per_round)
        k = len(clients)
        tensors = {n: t.expand(k, *t.shape).clone().requires_grad_(True)
                   for n, t in self.global_.items()}
        logits = self.logits[clients].clone().requires_grad_(True) if self.floral else None
        seeds = [client_seed(self.seed, self.round, c) for c in clients]
        orders = [torch.Generator().manual_seed(s) for s in seeds]
        noise = [torch.Generator().manual_seed(s) for s in seeds]
        x, y = self.x[clients], self.y[clients]
        rows = torch.arange(k).unsqueeze(1)
        n = x.shape[1]
        for _ in range(train.local_epochs):
            steps = zip(*[torch.randperm(n, generator=g).split(train.batch_size) for g in orders])
            for pieces in steps:
                index = torch.stack(pieces)
                self._step(tensors, logits, x[rows, index], y[rows, index], noise)
        self._aggregate(tensors, logits, clients)

    def _step(self, tensors: dict[str, Tensor], logits: Tensor | None, x: Tensor, y: Tensor,
              noise: list[torch.Generator]) -> None:
        pi = None
        if logits is not None:  # U[0, 1) router noise per client, then softmax
            draws = torch.stack([torch.rand(logits.shape[1:], generator=g) for g in noise])
            pi = torch.softmax(logits + draws, dim=-1)
        h = x
        for i, layer in enumerate(LAYERS):
            h = self._linear(tensors, layer, h, pi)
            if i == 0:
                h = torch.relu(h)
        losses = F.mse_loss(h, y, reduction="none").flatten(1).mean(1)
        trained = list(tensors.values()) + ([logits] if logits is not None else [])
        grads = dict(zip([*tensors, "logits"], torch.autograd.grad(losses.sum(), trained)))
        with torch.no_grad():
            if self.floral:
                for layer in LAYERS:  # rank 1: (B B^T + eps)^-1 and (A A^T + eps)^-1 divide
                    a, b = tensors[f"{layer}.lora_A"], tensors[f"{layer}.lora_B"]
                    grads[f"{layer}.lora_A"] /= (b * b).sum(-1, keepdim=True) + EPS
                    grads[f"{layer}.lora_B"] /= (a * a).sum(-1, keepdim=True) + EPS
                logits.sub_(grads["logits"], alpha=self.train.router_lr)
            for name, value in tensors.items():
                adaptor = name.rpartition(".")[2].startswith("lora_")
                value.sub_(grads[name], alpha=self.train.adaptor_lr or self.train.lr
                           if adaptor else self.train.lr)

    def _linear(self, tensors: dict[str, Tensor], layer: str, x: Tensor,
                pi: Tensor | None) -> Tensor:
        if not self.floral:
            w, b = tensors[f"{layer}.weight"], tensors[f"{layer}.bias"]
            return torch.baddbmm(b.unsqueeze(1), x, w.mT)
        w, b = tensors[f"{layer}.base.weight"], tensors[f"{layer}.base.bias"]
        a, up = tensors[f"{layer}.lora_A"], tensors[f"{layer}.lora_B"]  # (K, C, 1, in|out)
        bias = b + torch.einsum("kc,kco->ko", pi, tensors[f"{layer}.lora_bias"])
        out = torch.baddbmm(bias.unsqueeze(1), x, w.mT)
        hidden = torch.bmm(x, a.squeeze(2).mT) * pi.unsqueeze(1)  # (K, b, C)
        return out + torch.bmm(hidden, up.squeeze(2))

    @torch.no_grad()
    def _aggregate(self, tensors: dict[str, Tensor], logits: Tensor | None,
                   clients: list[int]) -> None:
        """Equal data sizes: the mean of the clients' tensors; an adaptor weighted by pi."""
        pi = torch.softmax(logits, dim=-1) if logits is not None else None
        for name, value in tensors.items():
            old = self.global_[name]
            if pi is not None and name.rpartition(".")[2].startswith("lora_"):
                weight = pi.reshape(*pi.shape, *(1,) * (old.dim() - 1))
                total = weight.sum(0)
                delta = ((value - old) * weight).sum(0) / torch.where(total > 0, total, 1)
                self.global_[name] = old + delta
            else:
                self.global_[name] = old + (value - old).mean(0)
        if logits is not None:
            self.logits[clients] = logits.detach()


def cpu_seconds(run_round, rounds: int) -> float:
    start = time.process_time()
    for _ in range(rounds):
        run_round()
    return (time.process_time() - start) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["fedavg", "floral"], default="floral")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the engine's choice for this model (`engine.threads = 0`)
    engine, task, config = engine_for(args.method)
    bare = BareLoop(args.method, engine, task, config)
    for _ in range(args.rounds):
        engine.run_round()
        bare.run_round()
    diff = max((bare.global_[n] - v).abs().max().item() for n, v in engine.global_state.items())
    times: dict[str, list[float]] = {"bare": [], "engine": []}
    for _ in range(args.repeats):
        engine, task, config = engine_for(args.method)
        bare = BareLoop(args.method, engine, task, config)
        times["bare"].append(cpu_seconds(bare.run_round, args.rounds))
        times["engine"].append(cpu_seconds(engine.run_round, args.rounds))
    print(f"configs/synthetic-mlp.toml, method {args.method}: {len(task.clients)} clients per "
          f"round in one batch, {args.rounds} rounds, {args.repeats} repeats, one thread")
    print(f"final global max |engine - bare| = {diff:.2e}")
    for name, values in times.items():
        print(f"{name:<7} {1e3 * statistics.median(values):.2f} ms CPU per round (median), "
              f"{1e3 * min(values):.2f} ms (min)")
    ratio = statistics.median(times["engine"]) / statistics.median(times["bare"])
    best = min(times["engine"]) / min(times["bare"])
    print(f"ratio engine / bare = {ratio:.3f}x median, {best:.3f}x min  (goal <= 1.15x)")


if __name__ == "__main__":
    main()
