"""A language-model client's training step with its frozen base in float32 and in bfloat16.

    python benchmarks/llm_precision.py [--config configs/translations-64.toml] [--steps 3]
                                       [--blocks 3] [--method floral-oracle]

Both variants are built by floral from the same config (`model.dtype` float32 or bfloat16:
the frozen tensors are stored in that precision and the forward runs under autocast; the
adaptors, routers and optimizer states stay float32) and take AdamW steps with
`floral.train.loop.train_epochs` on client 0's batches (each cut to its last target, as in a
run). Variants alternate in blocks of `--steps` steps after one warm-up step each; the figure
is this process's CPU time per step, the median over the blocks, one thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from floral.experiment import build_setup, load_config, placement_of
from floral.train.loop import train_epochs
from floral.train.objective import get_objective


def variant(path: str, method: str, dtype: str) -> tuple:
    config = load_config(path, [f"model.dtype={dtype}", f"method.name={method}"])
    _, task, model = build_setup(config)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.train.lr)
    return model, optimizer, task.clients[0], placement_of(config), config.train.batch_size


def steps(setup: tuple, count: int, seed: int) -> float:
    """CPU seconds per step over `count` steps."""
    model, optimizer, client, placement, batch_size = setup
    n = min(count * batch_size, len(client.x_train))
    start = time.process_time()
    train_epochs(model, optimizer, client.x_train[:n], client.y_train[:n],
                 get_objective("causal-lm").loss, batch_size=batch_size, epochs=1,
                 generator=torch.Generator().manual_seed(seed), placement=placement,
                 crop=get_objective("causal-lm").crop)
    return (time.process_time() - start) / -(-n // batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/translations-64.toml")
    parser.add_argument("--method", default="floral-oracle")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per variant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    setups = {dtype: variant(args.config, args.method, dtype)
              for dtype in ("float32", "bfloat16")}
    for setup in setups.values():
        steps(setup, 1, seed=0)  # warm-up
    times: dict[str, list[float]] = {dtype: [] for dtype in setups}
    for block in range(args.blocks):
        for dtype, setup in setups.items():
            times[dtype].append(steps(setup, args.steps, seed=block + 1))
    print(f"torch {torch.__version__}, {args.config}, method {args.method}, threads 1, "
          f"median of {args.blocks} blocks x {args.steps} steps (CPU s/step)")
    for dtype, values in times.items():
        print(f"  base in {dtype:<9} {statistics.median(values):.3f}  (min {min(values):.3f})")
    ratio = statistics.median(times["bfloat16"]) / statistics.median(times["float32"])
    print(f"  bfloat16 / float32 = {ratio:.2f}")


if __name__ == "__main__":
    main()
