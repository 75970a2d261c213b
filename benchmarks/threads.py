"""One intra-op thread against torch's default, for training steps of growing size.

    python benchmarks/threads.py [--widths 20,200,800,2000,4000] [--batch 32] [--steps 200]

For an MLP of each hidden width (784 inputs, two hidden layers, 10 outputs, as the MNIST
experiments' model grown), it times the same SGD steps on the same batches with
torch.set_num_threads(1) and with torch's default, alternating in the same process, and prints
the wall-time ratio default / one thread with the step's work (parameters x batch size). Where
the ratio crosses 1 is where `engine.threads = 0` (automatic) switches from one thread to
torch's default (floral.train.device.SMALL_STEP_WORK).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from floral.train.device import SMALL_STEP_WORK, default_threads


def mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def steps_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
                  steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    start = time.perf_counter()
    for i in range(steps):
        rows = slice((i * batch) % (len(x) - batch), (i * batch) % (len(x) - batch) + batch)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="20,200,800,2000,4000")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    default = torch.get_num_threads()
    torch.manual_seed(0)
    x, y = torch.randn(4096, 784), torch.randint(0, 10, (4096,))
    print(f"torch {torch.__version__}, default threads {default}, batch {args.batch}, "
          f"{args.steps} SGD steps, median of {args.repeats} alternating repeats")
    print(f"{'width':>6} {'work':>12} {'1 thread s':>11} {'default s':>10} {'ratio':>6}  auto")
    for width in (int(w) for w in args.widths.split(",")):
        model = mlp(width)
        work = sum(p.numel() for p in model.parameters()) * args.batch
        one, many = [], []
        steps_seconds(model, x, y, args.batch, 10, 1)  # warm-up
        for _ in range(args.repeats):
            one.append(steps_seconds(model, x, y, args.batch, args.steps, 1))
            many.append(steps_seconds(model, x, y, args.batch, args.steps, default))
        a, b = statistics.median(one), statistics.median(many)
        auto = default_threads(model, args.batch) or default
        print(f"{width:>6} {work:>12,} {a:>11.3f} {b:>10.3f} {b / a:>6.2f}  {auto}")
    torch.set_num_threads(default)
    print(f"automatic rule: one thread below {SMALL_STEP_WORK:,} parameters x examples per step")


if __name__ == "__main__":
    main()
