"""floral's local training step on a causal LM against a bare transformers + PEFT loop.

    python benchmarks/llm_step.py [--device cpu|cuda] [--compile] [--steps N]
                                  [--size tiny|small|smollm2] [--blocks 7] [--batch 8]

A Llama-shaped model, randomly initialized from a transformers LlamaConfig, gets rank-8
adaptors on all its linear layers (q, k, v, o, gate, up, down; not the output head, which is
tied to the embeddings, as PEFT's "all-linear"); the base is frozen. The variants take the same
AdamW steps (torch.optim.AdamW over the trainable tensors) on the same batches:

- peft:     transformers + PEFT LoRA, written out by hand: zero_grad, forward, loss, backward,
            step, over a seeded permutation of the examples;
- floral-1: `floral.adapters.attach` with C = 1 (plain LoRA, no router), trained by
            `floral.train.loop.train_epochs`;
- floral-4: C = 4 adaptors of rank 8 mixed by a router (noise on, as in training), the FLoRAL
            mixture, same loop; the router's logits train too.

floral-1 starts from PEFT's factors, so both follow the same trajectory: the script prints the
largest difference of their mean losses. With `--compile` the three are also run compiled
(`torch.compile` of each model, default inductor), as separate copies. Variants run in
interleaved blocks of `--steps` steps, in a shuffled order per block, after one warm-up block
each (which is where compilation happens); tokens/s is the median over the timed blocks, and
each ratio is floral's time over PEFT's in the same run (goals: <= 1.10x for C = 1, <= 1.15x
for C = 4).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import peft
import torch
import transformers
from torch import Tensor, nn

from floral.adapters import (
    AdapterSpec,
    RouterSpec,
    adaptor_parameter_names,
    attach,
    router_parameter_names,
)
from floral.llm.model import CausalLM, module_patterns
from floral.train.device import Placement
from floral.train.loop import train_epochs
from floral.train.objective import next_token_loss

RANK, LR = 8, 1e-3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (LlamaConfig fields, sequence length)
SIZES: dict[str, tuple[dict[str, int], int]] = {
    "tiny": (dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=4096), 64),
    "small": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4, vocab_size=8192), 128),
    # SmolLM2-135M's shape.
    "smollm2": (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, vocab_size=49152), 256),
}

Step = Callable[[int], float]  # block seed -> mean loss of the block's steps


def base_model(size: str) -> nn.Module:
    fields, length = SIZES[size]
    config = transformers.LlamaConfig(**fields, max_position_embeddings=length,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def peft_model(base: nn.Module) -> nn.Module:
    config = peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=TARGETS)
    return peft.get_peft_model(copy.deepcopy(base), config)  # scaling lora_alpha / r = 1


def floral_model(base: nn.Module, num_adaptors: int) -> nn.Module:
    model = CausalLM(copy.deepcopy(base))
    spec = AdapterSpec(num_adaptors=num_adaptors, rank=RANK, alpha=1.0, bias=False,
                       layer_types=("linear",), include=tuple(module_patterns(TARGETS)),
                       router=RouterSpec(noise=1.0))
    attach(model, spec)
    trained = set(adaptor_parameter_names(model)) | set(router_parameter_names(model))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trained)  # a frozen base, as PEFT's
    return model


@torch.no_grad()
def copy_peft_factors(source: nn.Module, target: nn.Module) -> None:
    """PEFT's A (r, in) and B (out, r) into a C = 1 floral model's A (1, r, in), B (1, r, out)."""
    factors = dict(source.named_parameters())
    for name, parameter in target.named_parameters():
        if ".lora_" not in name:
            continue
        stem, _, factor = name.rpartition(".")  # lm.model.layers.0.self_attn.q_proj, lora_A
        peft_name = f"base_model.model.{stem[len('lm.'):]}.{factor}.default.weight"
        value = factors[peft_name]
        parameter.copy_((value if factor == "lora_A" else value.t()).unsqueeze(0))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def peft_step(model: nn.Module, run: Callable, x: Tensor, y: Tensor, batch: int) -> Step:
    """The bare loop: PEFT's model, AdamW, the same seeded batches as train_epochs."""
    optimizer = torch.optim.AdamW(trainable(model), lr=LR)

    def block(seed: int) -> float:
        model.train()
        losses = []
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        for index in order.split(batch):
            optimizer.zero_grad(set_to_none=True)
            loss = next_token_loss(run(input_ids=x[index], use_cache=False).logits, y[index])
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return torch.stack(losses).mean().item()

    return block


def floral_step(model: nn.Module, run: nn.Module, x: Tensor, y: Tensor, batch: int) -> Step:
    optimizer = torch.optim.AdamW(trainable(model), lr=LR)
    placement = Placement(device=x.device)  # each batch moves to the model's device

    def block(seed: int) -> float:
        return train_epochs(run, optimizer, x, y, next_token_loss, batch_size=batch, epochs=1,
                            generator=torch.Generator().manual_seed(seed), placement=placement)

    return block


def build_variants(args: argparse.Namespace, x: Tensor, y: Tensor) -> dict[str, Step]:
    device = torch.device(args.device)
    base = base_model(args.size)
    steps: dict[str, Step] = {}
    for suffix, compiled in [("", False)] + ([(" compiled", True)] if args.compile else []):
        lora = peft_model(base).to(device)
        one = floral_model(base, 1)
        copy_peft_factors(lora, one)
        four = floral_model(base, 4)
        one, four = one.to(device), four.to(device)
        runs: list[Any] = [torch.compile(m) if compiled else m for m in (lora, one, four)]
        steps[f"peft{suffix}"] = peft_step(lora, runs[0], x, y, args.batch)
        steps[f"floral-1{suffix}"] = floral_step(one, runs[1], x, y, args.batch)
        steps[f"floral-4{suffix}"] = floral_step(four, runs[2], x, y, args.batch)
    return steps


def time_blocks(steps: dict[str, Step], blocks: int, device: torch.device,
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds and mean loss of each variant's blocks; block 0 is the warm-up, not timed."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    shuffler = random.Random(0)
    for block in range(blocks + 1):
        shuffler.shuffle(order)
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            losses[name].append(steps[name](block))  # .item(): waits for the device
            if block:
                seconds[name].append(time.perf_counter() - start)
    return seconds, losses


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report(seconds: dict[str, list[float]], losses: dict[str, list[float]], tokens: int) -> None:
    median = {name: statistics.median(times) for name, times in seconds.items()}
    best = {name: min(times) for name, times in seconds.items()}
    print(f"\n  {'':<18} {'tokens/s':>10} {'(best)':>10} {'last loss':>10}")
    for name in seconds:
        print(f"  {name:<18} {tokens / median[name]:10.0f} {tokens / best[name]:10.0f}"
              f" {losses[name][-1]:10.4f}")
    for suffix in ("", " compiled"):
        peft_name = f"peft{suffix}"
        if peft_name not in seconds:
            continue
        gap = max(abs(a - b) for a, b in zip(losses[f"floral-1{suffix}"], losses[peft_name]))
        print(f"\n  {suffix.strip() or 'eager'}: max |floral-1 - peft| of a block's mean loss = "
              f"{gap:.2e}")
        for count, goal in (("1", 1.10), ("4", 1.15)):
            name = f"floral-{count}{suffix}"
            print(f"  floral-{count} / peft = {median[name] / median[peft_name]:.3f}x median, "
                  f"{best[name] / best[peft_name]:.3f}x min  (goal <= {goal:.2f}x)")
    if "peft compiled" in seconds:
        for name in ("peft", "floral-1", "floral-4"):
            gain = median[name] / median[f"{name} compiled"]
            print(f"  {name}: compiled runs {gain:.2f}x as fast as eager (median)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--compile", action="store_true", help="also run each model compiled")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed block")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--blocks", type=int, default=7, help="timed blocks per variant")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()
    # transformers 5 warns, once per model, of a renamed method that PEFT still calls.
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    fields, length = SIZES[args.size]
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, fields["vocab_size"], (args.steps * args.batch, length + 1),
                           generator=generator).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft "
          f"{peft.__version__}; device {args.device}"
          + (f", threads {torch.get_num_threads()}" if device.type == "cpu" else "")
          + f"; size {args.size} ({fields['num_hidden_layers']} layers, hidden "
          f"{fields['hidden_size']}), rank {RANK} on {len(TARGETS)} linear layers per block; "
          f"batch {args.batch} x {length} tokens, {args.steps} AdamW steps per block, median "
          f"of {args.blocks} blocks after 1 warm-up")
    steps = build_variants(args, x, y)
    seconds, losses = time_blocks(steps, args.blocks, device)
    report(seconds, losses, args.steps * args.batch * length)


if __name__ == "__main__":
    main()
