"""Forward+backward time of the fused adaptor mixture, the base model alone, and a loop.

On the MNIST MLP (784-200-10, batch 32) with C = 4 adaptors of rank rho = 1% on both Linear
layers, one training step's forward and backward (cross-entropy) is timed for:

- base:  the plain MLP;
- fused: the MLP after `floral.adapters.attach` (router noise on, as in training);
- loop:  the same mixture computed by a Python loop over the C adaptors;
- lora:  for reference, a single adaptor (C = 1, plain LoRA, no router).

The variants run interleaved, in a shuffled order per block, in the same process; each figure
is the median (and the minimum) over timed blocks of steps. The same is printed for the first
layer (784 -> 200) on its own.

    python benchmarks/mixture_layer.py [--threads 1] [--blocks 21] [--steps 100] [--batch 32]
                                       [--clock wall|cpu]

`--clock cpu` times with this thread's CPU time instead of the wall clock: on a shared machine
it leaves out the time the process waits for a core (not the slowdown other processes cause
through shared caches).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from floral.adapters import AdapterSpec, attach

BATCH, NUM_ADAPTORS, RHO = 32, 4, 0.01


class LoopMixtureLinear(nn.Module):
    """The mixture y = base(x) + sum_c pi_c (x A_c^T B_c + b_c), one adaptor at a time."""

    def __init__(self, adapted: nn.Module, router: nn.Module) -> None:
        super().__init__()
        self.base = adapted.base
        self.lora_A = adapted.lora_A
        self.lora_B = adapted.lora_B
        self.lora_bias = adapted.lora_bias
        object.__setattr__(self, "router", router)

    def forward(self, x: Tensor) -> Tensor:
        pi = self.router.weights()
        out = self.base(x)
        for c in range(self.lora_A.shape[0]):
            hidden = x @ self.lora_A[c].t()
            out = out + pi[c] * (hidden @ self.lora_B[c] + self.lora_bias[c])
        return out


def build_variants(layers: list[nn.Module]) -> dict[str, nn.Module]:
    base = nn.Sequential(*layers)
    fused = attach(copy.deepcopy(base), AdapterSpec(num_adaptors=NUM_ADAPTORS, rank=RHO))
    with torch.no_grad():
        for name, parameter in fused.named_parameters():
            if "lora" in name:
                parameter.normal_(0.0, 0.05)  # nonzero B, so no variant is a no-op
    loop = copy.deepcopy(fused)
    for index, module in enumerate(loop):
        if hasattr(module, "lora_A"):
            loop[index] = LoopMixtureLinear(module, loop.floral_router)
    lora = attach(copy.deepcopy(base), AdapterSpec(num_adaptors=1, rank=RHO))
    variants = {"base": base, "fused": fused, "loop": loop, "lora": lora}
    return {name: model.train() for name, model in variants.items()}


def training_step(model: nn.Module, x: Tensor, loss_of: Callable[[Tensor], Tensor]) -> None:
    for parameter in model.parameters():
        parameter.grad = None
    loss_of(model(x)).backward()


def time_variants(
    variants: dict[str, nn.Module],
    x: Tensor,
    loss_of: Callable[[Tensor], Tensor],
    blocks: int,
    steps: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per step of each variant in each timed block; blocks interleave the variants."""
    for model in variants.values():
        for _ in range(steps):
            training_step(model, x, loss_of)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffler = random.Random(0)
    for _ in range(blocks):
        shuffler.shuffle(order)
        for name in order:
            start = clock()
            for _ in range(steps):
                training_step(variants[name], x, loss_of)
            samples[name].append((clock() - start) / steps)
    return samples


def report(title: str, samples: dict[str, list[float]]) -> None:
    medians = {name: statistics.median(times) for name, times in samples.items()}
    minima = {name: min(times) for name, times in samples.items()}
    print(f"\n{title}")
    print(f"  {'':<6} {'median':>9} {'min':>9}  (us/step)")
    for name in samples:
        print(f"  {name:<6} {medians[name] * 1e6:9.1f} {minima[name] * 1e6:9.1f}")
    for numerator, denominator in (("fused", "base"), ("fused", "loop"), ("lora", "base")):
        print(
            f"  {numerator}/{denominator} = {medians[numerator] / medians[denominator]:.3f}"
            f" (median), {minima[numerator] / minima[denominator]:.3f} (min)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--blocks", type=int, default=21, help="timed blocks per variant")
    parser.add_argument("--steps", type=int, default=100, help="steps per timed block")
    parser.add_argument("--batch", type=int, default=BATCH, help="examples per step")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: time.thread_time")
    args = parser.parse_args()
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={args.batch}, "
        f"C={NUM_ADAPTORS}, rho={RHO}, median of {args.blocks} blocks x {args.steps} steps, "
        f"{args.clock} clock"
    )

    x = torch.randn(args.batch, 784)
    labels = torch.randint(0, 10, (args.batch,))
    mlp = build_variants([nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 10)])
    ranks = [m.rank for m in mlp["fused"].modules() if hasattr(m, "rank")]
    samples = time_variants(mlp, x, lambda out: F.cross_entropy(out, labels), args.blocks,
                            args.steps, clock)
    report(f"MLP 784-200-10 (ranks {ranks}), forward+backward of cross-entropy", samples)

    layer = build_variants([nn.Linear(784, 200)])
    samples = time_variants(layer, x, lambda out: out.square().mean(), args.blocks, args.steps,
                            clock)
    report("Linear 784 -> 200 alone, forward+backward of mean square", samples)


if __name__ == "__main__":
    main()
