"""The router: a client's private logits over the C adaptors, and the mixture weights pi."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from floral.adapters.spec import RouterSpec
from floral.errors import ConfigError

__all__ = ["Router", "close_router_hook", "refresh_router_hook"]


class Router(nn.Module):
    """Mixture weights pi = softmax((logits + U[0, noise)) / temperature) over C adaptors.

    `logits` has shape (C,), or (L, C) with one row per adapted layer when the spec asks for a
    per-layer router; it starts at zero (uniform pi). The noise is drawn from torch's global
    RNG in training mode only. After `fix(weights)` pi is exactly `weights` (oracle mode); the
    fixed weights live in the `fixed` buffer, so they travel with the state_dict.

    With `spec.shared` the layers hold one more adaptor, the shared one, and pi has C + 1
    entries: the C above times the `active` buffer (1 unless a method holds the routed
    adaptors out), then 1. The logits and the fixed weights stay C wide.

    pi is drawn once per forward of the model the router is attached to (`refresh`, called by a
    forward pre-hook), so every layer of one forward sees the same noisy pi. A layer called on
    its own gets a fresh pi whenever the logits, the mode or the grad mode changed since.

    Under torch.compile that check cannot run (tensor versions are data to dynamo, and reading
    them breaks the graph), so compiled code asks `traced_weights` instead: the one pi of the
    model's open forward (between its pre-hook and `close_router_hook`), otherwise a pi drawn
    on the spot. Nothing there is specialized per layer or per client.
    """

    logits: nn.Parameter
    fixed: Tensor
    active: Tensor  # with a shared adaptor only
    # The pi of the current forward, its rows for a per-layer router, and what it was drawn
    # under; all None until the first draw (see `_clear_cache`).
    _pi: Tensor | None
    _rows: tuple[Tensor, ...] | None
    _stamp: tuple[int, int, int, bool, bool] | None
    # True from the model's forward pre-hook to its forward hook: `_pi` belongs to this forward.
    _forward_open: bool

    def __init__(
        self, num_adaptors: int, spec: RouterSpec | None = None, num_layers: int = 1
    ) -> None:
        super().__init__()
        spec = spec if spec is not None else RouterSpec()
        spec.validate()
        if num_adaptors < 2:
            raise ConfigError(f"num_adaptors = {num_adaptors}: a router needs at least 2")
        self.num_adaptors = num_adaptors
        self.temperature = float(spec.temperature)
        self.noise = float(spec.noise)
        self.shared = bool(spec.shared)
        shape = (num_layers, num_adaptors) if spec.per_layer else (num_adaptors,)
        self.logits = nn.Parameter(torch.zeros(shape))
        self.register_buffer("fixed", torch.empty(0))
        if self.shared:
            # 0 holds the routed adaptors out (pi 0, so neither they nor the logits move) and
            # leaves the shared one alone; a server sets it, as a global tensor, when the
            # routed adaptors are worth routing to (floral.methods.floral_seeded).
            self.register_buffer("active", torch.ones(()))
        self._forward_open = False
        self._clear_cache()

    @property
    def per_layer(self) -> bool:
        return self.logits.dim() == 2

    def fix(self, weights: Tensor) -> None:
        """Oracle mode: from now on pi is exactly `weights`, of shape (C,) or, per layer, (L, C)."""
        weights = torch.as_tensor(weights)
        if tuple(weights.shape) not in {(self.num_adaptors,), tuple(self.logits.shape)}:
            raise ConfigError(
                f"router weights of shape {tuple(weights.shape)}: expected "
                f"({self.num_adaptors},) or {tuple(self.logits.shape)}"
            )
        self.fixed = weights.detach().to(self.logits).clone()
        self._clear_cache()

    def unfix(self) -> None:
        """Back to learned weights."""
        self.fixed = torch.empty(0, device=self.logits.device, dtype=self.logits.dtype)
        self._clear_cache()

    def refresh(self) -> Tensor:
        """Draw this forward's pi (noisy in training mode) and return it."""
        pi = self._compute(noisy=self.training)
        self._pi = pi
        self._rows = pi.unbind(0) if pi.dim() == 2 else None
        # No stamp in compiled code (it cannot be read there): such a pi is valid only while
        # the forward that drew it is open, and `close_forward` drops it.
        self._stamp = None if torch.compiler.is_compiling() else self._current_stamp()
        return pi

    def weights(self, layer_index: int = 0) -> Tensor:
        """The pi (C,) that layer `layer_index` uses in the current forward."""
        pi = self._pi
        # Inside the model's forward the pre-hook has just drawn pi: no stamp to check.
        if pi is None or (not self._forward_open and self._stamp != self._current_stamp()):
            pi = self.refresh()
        return pi if self._rows is None else self._rows[layer_index]

    def traced_weights(self, row: Tensor | None = None) -> Tensor:
        """`weights` for compiled code: the pi (C,) of the open forward, else a fresh draw.

        `row` is the layer's row of a per-layer router as a tensor of shape (1,): an int would
        be a constant to dynamo, so each layer of a regionally compiled model would recompile.
        """
        if not self._forward_open:
            pi = self._compute(noisy=self.training)  # a layer called on its own
        else:
            if self._pi is None:
                self.refresh()  # the first layer of a compiled forward draws its pi
            pi = cast(Tensor, self._pi)
        if pi.dim() == 1:
            return pi
        if row is None:
            raise ValueError("a per-layer router needs the layer's row")
        return pi.index_select(0, row).squeeze(0)

    def open_forward(self) -> None:
        """The model's forward starts: draw its pi, which every layer reads until it ends.

        In compiled code the first layer draws it instead: torch.compile runs the hooks of the
        model it compiles as frames of their own, and tensor ops here would be a second graph.
        """
        if torch.compiler.is_compiling():
            self._clear_cache()
        else:
            self.refresh()
        self._forward_open = True

    def close_forward(self) -> None:
        """The model's forward ended. A pi drawn in compiled code is dropped (it has no stamp
        to check later, and would keep its autograd graph alive); an eager one stays cached."""
        self._forward_open = False
        if self._stamp is None:
            self._clear_cache()

    def forward(self, x: Any) -> Any:
        """Identity. The router acts through `weights`; this only lets a router that sits in an
        nn.Sequential root (attach adds it as the last child) pass the output through."""
        return x

    def eval_weights(self) -> Tensor:
        """pi without noise, detached: (C,), or (L, C) for a per-layer router."""
        with torch.no_grad():
            return self._compute(noisy=False).detach().clone()

    def _compute(self, noisy: bool) -> Tensor:
        return mixture(self.logits, self.fixed, self.active if self.shared else None,
                       self.noise if noisy else 0.0, self.temperature)

    def _current_stamp(self) -> tuple[int, int, int, bool, bool]:
        # id() too: under torch.func.functional_call the logits are another tensor.
        return (
            id(self.logits),
            self.logits._version,
            self.fixed._version + (self.active._version if self.shared else 0),
            self.training,
            torch.is_grad_enabled(),
        )

    def _clear_cache(self) -> None:
        self._pi = None
        self._rows = None
        self._stamp = None

    def _apply(self, fn: Any, recurse: bool = True) -> Router:
        self._clear_cache()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # `fixed` is empty until the router is fixed, so its shape follows the incoming state.
        incoming = state_dict.get(prefix + "fixed")
        if isinstance(incoming, Tensor) and incoming.shape != self.fixed.shape:
            self.fixed = torch.empty(
                incoming.shape, device=self.fixed.device, dtype=self.fixed.dtype
            )
        self._clear_cache()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # The cached pi may hang on an autograd graph, which cannot be copied.
        state = super().__getstate__()
        state.update(_pi=None, _rows=None, _stamp=None, _forward_open=False)
        return state

    def extra_repr(self) -> str:
        return (
            f"num_adaptors={self.num_adaptors}, per_layer={self.per_layer}, "
            f"temperature={self.temperature}, noise={self.noise}, shared={self.shared}"
        )


def mixture(logits: Tensor, fixed: Tensor, active: Tensor | None, noise: float,
            temperature: float) -> Tensor:
    """pi from a router's tensors, with any leading axes (one router's, or K clients' stacked):
    the fixed weights when set, else softmax((logits + U[0, noise)) / temperature); with a
    shared adaptor (`active` given, broadcast against pi), times `active`, then 1."""
    if fixed.numel() > 0:
        pi = fixed
    else:
        if noise > 0:
            logits = torch.add(logits, torch.rand_like(logits), alpha=noise)
        if temperature != 1.0:
            logits = logits / temperature
        pi = torch.softmax(logits, dim=-1)
    if active is None:
        return pi
    return torch.cat([pi * active, torch.ones_like(pi[..., :1])], dim=-1)


def refresh_router_hook(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of an attached model: one fresh pi per forward of the whole model.

    A plain function that finds the router on the module, so a deep copy of the model (whose
    hook dict is copied by reference) refreshes its own router.
    """
    cast(Router, module.floral_router).open_forward()


def close_router_hook(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook of an attached model (registered with always_call): the forward's pi
    is no longer current, so a layer compiled on its own draws its own."""
    cast(Router, module.floral_router).close_forward()
