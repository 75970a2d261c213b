"""Adapted models under torch.compile: one graph, and no recompiles per layer, client or round.

The fast tests count with dynamo's CompileCounter (no code generation) and compare with the
"aot_eager" backend; the inductor test is marked slow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
import torch._dynamo as dynamo
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter

from floral.adapters import AdapterSpec, Router, RouterSpec, attach
from floral.data import ClientData
from floral.data.task import FederatedTask
from floral.methods import get_method
from floral.train.loop import train_epochs
from floral.train.objective import next_token_loss
from floral.train.state import StateSlots

VOCAB = 40
# name -> (C, per-layer router); routers draw noise, as in training.
VARIANTS = {"lora": (1, False), "mixture": (4, False), "per-layer": (4, True)}
LossFn = Callable[[Tensor, Tensor], Tensor]
Built = tuple[nn.Module, Tensor, Tensor, LossFn]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()  # counts start from zero, whatever compiled before
    yield
    dynamo.reset()


def spec(variant: str, **options: object) -> AdapterSpec:
    count, per_layer = VARIANTS[variant]
    router = RouterSpec(per_layer=per_layer, noise=0.5)
    return AdapterSpec(num_adaptors=count, rank=2, router=router, **options)  # type: ignore[arg-type]


def mlp(variant: str) -> Built:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    attach(model, spec(variant))
    randomize_(model)
    return model, torch.randn(8, 6), torch.randint(0, 3, (8,)), nn.functional.cross_entropy


def llama(variant: str) -> Built:
    pytest.importorskip("transformers")  # the `llm` extra; without it these cases skip
    from floral.llm.model import build_causal_lm

    torch.manual_seed(0)
    model = build_causal_lm("tiny-llama", VOCAB)
    attach(model, spec(variant, layer_types=("linear",)))
    randomize_(model)
    tokens = torch.randint(0, VOCAB, (4, 7))
    return model, tokens[:, :-1], tokens[:, 1:], next_token_loss


def floral_method_mlp(variant: str) -> Built:
    """The model as the FLoRAL method builds it for an engine."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    task = FederatedTask("toy", "classification", (6,), 3, 4, [ClientData(0, 0, x, y, x, y)])
    count, per_layer = VARIANTS[variant]
    method = get_method("floral", {"num_adaptors": count, "per_layer_router": per_layer,
                                   "rank": 2})
    model = method.build_model(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)),
                               task)
    randomize_(model)
    return model, x, y, nn.functional.cross_entropy


BUILDERS = {"mlp": mlp, "llama": llama}


def randomize_(model: nn.Module) -> None:
    # Nonzero B factors and router logits, so pi matters to every output.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora" in name or "router" in name:
                parameter.normal_(0.0, 0.5)


def explain(model: nn.Module, x: Tensor) -> Any:  # dynamo's ExplainOutput
    return dynamo.explain(model)(x)


def compiled_module(model: nn.Module, backend: Any) -> nn.Module:
    # torch.compile of a module is an OptimizedModule, though typed as a callable.
    return cast(nn.Module, torch.compile(model, backend=backend))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("builder", list(BUILDERS))
def test_one_graph_without_breaks(builder: str, variant: str) -> None:
    model, x, _, _ = BUILDERS[builder](variant)
    model.train()
    explained = explain(model, x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    router = getattr(model, "floral_router", None)
    if router is not None:  # the compiled forward left no pi (and no autograd graph) behind
        assert router._pi is None and not router._forward_open


def test_method_built_model_is_one_graph() -> None:
    model, x, _, _ = floral_method_mlp("per-layer")
    explained = explain(model, x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def client_states(model: nn.Module, clients: int) -> list[dict[str, Tensor]]:
    """Each client's values of every parameter (as the engine loads them in place)."""
    generator = torch.Generator().manual_seed(1)
    return [
        {name: p.detach() + 0.1 * torch.randn(p.shape, generator=generator)
         for name, p in model.named_parameters()}
        for _ in range(clients)
    ]


@pytest.mark.parametrize(("builder", "variant"), [
    ("mlp", "lora"), ("mlp", "mixture"), ("mlp", "per-layer"), ("llama", "mixture"),
    ("method", "mixture"),
])
def test_clients_and_rounds_reuse_one_compiled_frame(builder: str, variant: str) -> None:
    build = floral_method_mlp if builder == "method" else BUILDERS[builder]
    model, x, y, loss_fn = build(variant)
    slots = StateSlots(model)
    counter = CompileCounter()
    compiled = compiled_module(model, counter)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    states = client_states(model, clients=3)
    for round_ in range(2):
        for client, state in enumerate(states):
            slots.load(state)  # the same tensors, new values: logits included
            train_epochs(compiled, optimizer, x, y, loss_fn, batch_size=4, epochs=1,
                         generator=torch.Generator().manual_seed(10 * round_ + client))
    assert counter.frame_count == 1
    compiled.eval()
    with torch.no_grad():
        compiled(x)
        compiled(x)
    assert counter.frame_count == 2  # evaluation compiles once
    train_epochs(compiled, optimizer, x, y, loss_fn, batch_size=4, epochs=1,
                 generator=torch.Generator().manual_seed(0))
    assert counter.frame_count == 2  # and back to training compiles nothing


def outputs_and_grads(model: nn.Module, run: nn.Module, x: Tensor, seed: int) -> list[Tensor]:
    for parameter in model.parameters():
        parameter.grad = None
    torch.manual_seed(seed)  # the router's noise
    out = run(x)
    out.square().mean().backward()
    return [out.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize(("builder", "backend", "variant"), [
    *[("mlp", "aot_eager", variant) for variant in VARIANTS],
    # aot_eager traces the backward too, which takes seconds on the Llama: there dynamo's
    # graph runs as it is.
    ("llama", "eager", "per-layer"),
])
def test_compiled_matches_eager(builder: str, backend: str, variant: str) -> None:
    model, x, _, _ = BUILDERS[builder](variant)
    compiled = compiled_module(model, backend)
    for mode in (model.train, model.eval):
        mode()
        for seed in (1, 2):  # the same noise in both, draw after draw
            eager = outputs_and_grads(model, model, x, seed)
            again = outputs_and_grads(model, compiled, x, seed)
            assert len(again) == len(eager)
            for want, got in zip(eager, again):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_noise_is_drawn_once_per_compiled_forward() -> None:
    model, x, _, _ = mlp("per-layer")
    compiled = compiled_module(model, "aot_eager")
    compiled(x)  # compiles
    torch.manual_seed(4)
    compiled(x)
    after_compiled = torch.get_rng_state()
    torch.manual_seed(4)
    # One draw of (L, C) noise, not one per layer.
    torch.rand_like(cast(Router, model.floral_router).logits)
    torch.testing.assert_close(after_compiled, torch.get_rng_state(), rtol=0, atol=0)


def test_regionally_compiled_blocks_do_not_recompile_per_layer() -> None:
    model, x, y, loss_fn = llama("per-layer")
    eager = outputs_and_grads(model, model, x, 3)
    counter = CompileCounter()
    for block in cast(nn.ModuleList, model.get_submodule("lm.model.layers")):
        block.compile(backend=counter)
    for _ in range(3):
        loss_fn(model(x), y).backward()
    assert counter.frame_count == 1  # one frame serves every block, each with its own row
    # The model's hooks ran eagerly: the same noisy pi as without compiling.
    torch.testing.assert_close(outputs_and_grads(model, model, x, 3), eager)


def test_layer_compiled_alone_draws_its_own_pi() -> None:
    model, x, _, _ = mlp("mixture")
    layer = model.get_submodule("0")
    model(x)  # an eager forward leaves its pi cached
    counter = CompileCounter()
    compiled = compiled_module(layer, counter)
    first, second = compiled(x), compiled(x)
    assert not torch.equal(first, second)  # fresh noise per call, not the model's stale pi
    model.eval()
    torch.testing.assert_close(compiled(x), layer(x))
    assert counter.frame_count == 2


@pytest.mark.slow
@pytest.mark.parametrize("builder", list(BUILDERS))
def test_inductor_matches_eager(builder: str) -> None:
    model, x, _, _ = BUILDERS[builder]("per-layer")
    model.eval()
    compiled = compiled_module(model, "inductor")
    eager = outputs_and_grads(model, model, x, 5)
    torch.testing.assert_close(outputs_and_grads(model, compiled, x, 5), eager,
                               rtol=1e-4, atol=1e-5)
