"""The forward of K copies of one model at once, as tensor ops over their stacked tensors.

K clients train the same model with different tensors. Stack each tensor to (K, ...), one row
per client, and put the K minibatches one after another, client-major, as one batch of K * b
rows: layers that treat rows independently (activations, dropout, pooling, flatten) then run
unchanged on the whole batch, and each layer with tensors runs as one batched product over the
client axis (`bmm`/`baddbmm`), client k's rows against client k's tensors. Compared with
`torch.func.vmap` of `functional_call`, nothing is traced or unflattened per call: the model's
own forward runs once, with its layers' tensors and forwards swapped for the stacked ones.

Covered: `nn.Linear`, `AdaptedLinear` over an `nn.Linear` (the fused mixture, with the router's
pi per client), the `Router`, containers, and layers that treat rows independently (a fixed
list of torch's, and modules that say so with the class attribute `floral_row_wise = True`:
their forward is their children's plus row-wise tensor ops). `stacked_forward` returns None for
a model with anything else (convolutions, norms, embeddings, forward hooks), which the batched
engine then runs through vmap.

Numbers: a batched product adds up the same terms as one client's product, but a BLAS may
block a batched product differently, so results match one client's forward to float32
rounding, not always bit for bit. Router noise comes from one generator per client where the
caller gives them (the draws of each client's own step), else as one draw of shape (K, C).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from floral.adapters.attach import adaptor_table
from floral.adapters.layers import AdaptedLinear
from floral.adapters.router import Router, close_router_hook, mixture, refresh_router_hook

__all__ = [
    "ROW_WISE_MARK",
    "StackedForward",
    "stacked_forward",
    "stacked_mixture",
    "stacked_mixture_weights",
]

# A module class attribute: the module's own forward treats each row of its input (axis 0)
# independently, apart from what its children compute.
ROW_WISE_MARK = "floral_row_wise"

_ROW_WISE: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
    nn.AvgPool2d,
)

TensorDict = dict[str, Tensor]
LayerForward = Callable[["_Context", nn.Module, str, Tensor], Tensor]


class _Context:
    """What the layers of one stacked forward share: the client count and each layer's pi."""

    def __init__(self, clients: int, stacked: Collection[str]) -> None:
        self.clients = clients
        self.stacked = stacked
        self.pi: Tensor | None = None  # (K, C) or, per layer, (K, L, C)

    def rows(self, module: nn.Module, prefix: str, attr: str) -> Tensor | None:
        """The module's tensor `attr` as (K, ...): stacked, or the model's own broadcast."""
        value: Tensor | None = getattr(module, attr)
        if value is None or f"{prefix}{attr}" in self.stacked:
            return value
        return value.expand(self.clients, *value.shape)

    def layer_pi(self, layer: AdaptedLinear) -> Tensor | None:
        pi = self.pi
        if pi is None or pi.dim() == 2:
            return pi
        return pi[:, layer.layer_index]


class StackedForward:
    """`(stacked tensors, x of K * b rows, K) -> output of K * b rows`, client-major."""

    def __init__(self, model: nn.Module, layers: list[tuple[nn.Module, str, LayerForward]],
                 router: tuple[Router, str] | None, tables: dict[str, tuple[dict, str]]) -> None:
        self.model, self.layers, self.router, self.tables = model, layers, router, tables

    def __call__(self, tensors: Mapping[str, Tensor], x: Tensor, clients: int,
                 generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """`generators`: one per client, for its router noise (see `stacked_mixture`)."""
        with self.bound(tensors, clients) as forward:
            return forward(x, generators)

    @contextmanager
    def bound(self, tensors: Mapping[str, Tensor],
              clients: int) -> Iterator[Callable[..., Tensor]]:
        """`forward(x, generators=None)` over `tensors`, which are swapped into the model once
        for every forward of the block (a batch's SGD steps update them in place): the
        model's own tensors are back when the block ends."""
        context = _Context(clients, tensors.keys())
        own: dict[str, Tensor] = {}
        if self.router is not None:
            router, prefix = self.router
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        def forward(x: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
            if self.router is not None:
                context.pi = stacked_mixture(self.router[0], own, clients,
                                             generators=generators)
            # The model's own forward, without its router hooks: pi is drawn above.
            return self.model.forward(x)

        with self._swapped(tensors, context):
            try:
                yield forward
            finally:
                context.pi = None  # its autograd graph

    @contextmanager
    def _swapped(self, tensors: Mapping[str, Tensor], context: _Context) -> Iterator[None]:
        saved = []
        try:
            for name, value in tensors.items():
                table, attr = self.tables[name]
                saved.append((table, attr, table[attr]))
                table[attr] = value
            for module, prefix, forward in self.layers:
                module.forward = _bound(forward, context, module, prefix)  # type: ignore[method-assign]
            yield
        finally:
            for module, _, _ in self.layers:
                module.__dict__.pop("forward", None)
            for table, attr, value in saved:
                table[attr] = value


def _bound(forward: LayerForward, context: _Context, module: nn.Module,
           prefix: str) -> Callable[[Tensor], Tensor]:
    return lambda x: forward(context, module, prefix, x)


def stacked_forward(model: nn.Module, stacked: Collection[str]) -> StackedForward | None:
    """The stacked forward of `model` whose tensors named in `stacked` come stacked, or None
    when the model has a layer this module does not cover."""
    hooks = {refresh_router_hook, close_router_hook}
    if set(model._forward_pre_hooks.values()) - hooks or set(model._forward_hooks.values()) - hooks:
        return None
    layers: list[tuple[nn.Module, str, LayerForward]] = []
    router: tuple[Router, str] | None = None
    covered: set[str] = set()  # prefixes of modules a layer forward computes in full
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if any(prefix.startswith(done) for done in covered):
            continue
        if module is not model and (module._forward_pre_hooks or module._forward_hooks
                                    or module._backward_hooks):
            return None
        if isinstance(module, Router):
            router = (module, prefix)
            covered.add(prefix)
        elif type(module) is AdaptedLinear and type(module.base) is nn.Linear:
            layers.append((module, prefix, _adapted_linear))
            covered.add(prefix)
        elif type(module) is nn.Linear:
            layers.append((module, prefix, _linear))
            covered.add(prefix)
        elif not _row_wise(module):
            return None
    tables = {}
    for name in stacked:
        module_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(module_name)
        table = owner._parameters if attr in owner._parameters else owner._buffers
        if attr not in table:
            return None
        tables[name] = (table, attr)
    return StackedForward(model, layers, router, tables)


def _row_wise(module: nn.Module) -> bool:
    if module._parameters or module._buffers:
        return False
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return True
    if type(module) in (nn.ModuleList, nn.ModuleDict):
        return True
    if type(module) is nn.Flatten:
        return module.start_dim != 0 and module.end_dim != 0
    return type(module) in _ROW_WISE or getattr(type(module), ROW_WISE_MARK, False)


def stacked_mixture(router: Router, tensors: Mapping[str, Tensor], clients: int,
                    noisy: bool | None = None,
                    generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """The routers' pi of K clients, (K, C) or per layer (K, L, C), from their stacked tensors
    (`tensors`: local name -> (K, ...); the others are the router's own), as `Router` draws
    it: fixed weights when set, else softmax((logits + U[0, noise)) / temperature); with a
    shared adaptor, times `active`, then 1. Noisy in training mode, unless `noisy` says.

    The noise of client k comes from `generators[k]` when given (seeded as its step alone
    seeds torch's generator: the same draws, call after call, as that step's forwards make),
    else from one draw of torch's generator for all K."""
    def value(name: str) -> Tensor:
        found = tensors.get(name)
        if found is not None:
            return found
        own = getattr(router, name)
        return own.expand(clients, *own.shape)

    fixed, logits = value("fixed"), value("logits")
    active = None
    if router.shared:  # one flag per client, against pi's (K, C) or (K, L, C)
        pi_dim = fixed.dim() if fixed.numel() > 0 else logits.dim()
        active = value("active").reshape((clients,) + (1,) * (pi_dim - 1))
    noise = router.noise if (router.training if noisy is None else noisy) else 0.0
    if noise > 0 and generators is not None and fixed.numel() == 0:
        draws = torch.stack([torch.rand(logits.shape[1:], generator=g, dtype=logits.dtype,
                                        device=logits.device) for g in generators])
        logits, noise = torch.add(logits, draws, alpha=noise), 0.0  # as `mixture` adds it
    return mixture(logits, fixed, active, noise, router.temperature)


@torch.no_grad()
def stacked_mixture_weights(model: nn.Module, tensors: Mapping[str, Tensor],
                            clients: int) -> dict[str, Tensor] | None:
    """`mixture_weights` of K clients from their stacked tensors (name -> (K, ...); the others
    are the model's own): adaptor parameter name -> the (K, C) eval-mode pi of its layer, one
    draw for all K. None when a layer mixes with a router other than the model's one."""
    table = adaptor_table(model)
    pi = None
    if table.router is not None:
        router, prefix = table.router
        own = {name[len(prefix):]: value for name, value in tensors.items()
               if name.startswith(prefix)}
        pi = stacked_mixture(router, own, clients, noisy=False)
    weights = {}
    for name, layer in table.layers.items():
        if layer.router is None:
            reference = layer.adaptor_parameters()[name.rpartition(".")[2]]
            weights[name] = torch.ones(clients, layer.num_adaptors, dtype=reference.dtype,
                                       device=reference.device)
        elif pi is None or table.router is None or layer.router is not table.router[0]:
            return None
        else:
            weights[name] = pi if pi.dim() == 2 else pi[:, layer.layer_index]
    return weights


def _linear(context: _Context, module: Any, prefix: str, x: Tensor) -> Tensor:
    weight = _required(context.rows(module, prefix, "weight"))
    bias = context.rows(module, prefix, "bias")
    return _batched_linear(context.clients, x, weight, bias)


def _batched_linear(clients: int, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Client k's rows of x times its weight (K, out, in), plus its bias (K, out)."""
    out = _product(x.reshape(clients, -1, x.shape[-1]), weight, bias)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _product(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(K, n, in) rows times (K, out, in) weights, plus (K, out) biases: (K, n, out)."""
    if bias is None:
        return torch.bmm(rows, weight.mT)
    return torch.baddbmm(bias.unsqueeze(1), rows, weight.mT)


def _adapted_linear(context: _Context, layer: Any, prefix: str, x: Tensor) -> Tensor:
    """`AdaptedLinear.forward` per client: base(x) + alpha * sum_c pi_c (B_c A_c x + b_c)."""
    clients, alpha = context.clients, layer.alpha
    base, base_prefix = layer.base, f"{prefix}base."
    pi = context.layer_pi(layer)
    bias = _mixed_bias(context.rows(base, base_prefix, "bias"),
                       context.rows(layer, prefix, "lora_bias"), pi, alpha)
    rows = x.reshape(clients, -1, x.shape[-1])
    weight = _required(context.rows(base, base_prefix, "weight"))
    out = _product(rows, weight, bias)
    a = _required(context.rows(layer, prefix, "lora_A"))
    b = _required(context.rows(layer, prefix, "lora_B"))
    hidden = torch.bmm(rows, a.flatten(1, 2).mT)  # (K, n, C*r)
    if pi is not None:
        scale = pi if layer.rank == 1 else pi.repeat_interleave(layer.rank, dim=1)
        hidden = hidden * scale.unsqueeze(1)
    out = torch.baddbmm(out, hidden, b.flatten(1, 2), alpha=alpha)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _required(value: Tensor | None) -> Tensor:
    if value is None:
        raise ValueError("a layer without its weight")
    return value


def _mixed_bias(base_bias: Tensor | None, lora_bias: Tensor | None, pi: Tensor | None,
                alpha: float) -> Tensor | None:
    """`AdaptedLayer._mixed_bias` per client: (K, out) or None."""
    if lora_bias is None:
        return base_bias
    if pi is None:
        if base_bias is None:
            return lora_bias[:, 0] * alpha
        return base_bias.add(lora_bias[:, 0], alpha=alpha)
    mixed = pi.unsqueeze(1)  # (K, 1, C)
    if base_bias is None:
        return torch.bmm(mixed, lora_bias).squeeze(1) * alpha
    return torch.baddbmm(base_bias.unsqueeze(1), mixed, lora_bias, alpha=alpha).squeeze(1)


def client_losses(loss_fn: Callable[[Tensor, Tensor], Tensor], out: Tensor, y: Tensor,
                  clients: int) -> Tensor:
    """Each client's mean loss (K,) over its rows of a client-major batch."""
    if loss_fn is F.cross_entropy and y.dim() == 1 and not y.is_floating_point():
        return F.cross_entropy(out, y, reduction="none").view(clients, -1).mean(1)
    if loss_fn is F.mse_loss and out.shape == y.shape:
        return F.mse_loss(out, y, reduction="none").view(clients, -1).mean(1)
    return torch.stack([loss_fn(o, t) for o, t in zip(out.chunk(clients), y.chunk(clients))])
