"""Adapted layers: a base layer plus a mixture of C low-rank adaptors, computed fused.

Each wrapper keeps the original layer as `.base` and computes

    y = base(x) + alpha * sum_c pi_c (B_c A_c x + b_c)

as one low-rank branch of rank C*r whose hidden activations are scaled by pi repeated r times:
two matmuls (two convolutions for conv layers), whatever C is. Every adaptor tensor holds the
C adaptors on axis 0, and the factors are stored as A (C, r, d_in...) and B (C, r, d_out...),
i.e. B_c transposed, so the fused factors are free reshapes.

The sizes d_in and d_out that set the rank (`resolve_rank`) are the widths of the two factors
per rank, so an adaptor holds r * (d_in + d_out) numbers:

- Linear: d_in = in_features, d_out = out_features.
- Conv2d, separable form (a 1 x kw conv to C*r channels, then a kh x 1 conv to the output;
  stride, padding and dilation of width go to the first, those of height to the second):
  d_in = in_channels * kw, d_out = out_channels * kh. The merged kernel is the exact
  composition K[o, i, y, x] = sum_j B[j, o, y] A[j, i, x].
- Conv2d, "kxk-1x1" form (a kh x kw conv to C*r channels, then a 1 x 1 conv):
  d_in = in_channels * kh * kw, d_out = out_channels.
- Embedding: d_in = num_embeddings, d_out = embedding_dim (no adaptive bias).
- Norms (BatchNorm1d/2d/3d, LayerNorm, GroupNorm) have no factors: each adaptor c holds
  deltas of the affine weight and bias, starting at zero, and the layer normalizes once with
  gamma + alpha * sum_c pi_c dgamma_c and beta + alpha * sum_c pi_c dbeta_c.

Factor names: `lora_A`, `lora_B`, `lora_bias`; norm deltas: `norm_weight_delta`,
`norm_bias_delta`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TypeAlias, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from floral.adapters.router import Router

__all__ = [
    "AdaptedLayer",
    "AdaptedLinear",
    "AdaptedConv2d",
    "AdaptedEmbedding",
    "AdaptedNorm",
    "NORM_TYPES",
    "factor_sizes",
]

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
_BatchNorm: TypeAlias = "nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d"
_Norm: TypeAlias = "_BatchNorm | nn.LayerNorm | nn.GroupNorm"  # one of NORM_TYPES


class AdaptedLayer(nn.Module, ABC):
    """What all adapted layers share: the base layer, the mixture's size and the router."""

    factor_names: tuple[str, ...] = ()
    delta_names: tuple[str, ...] = ()

    def __init__(self, base: nn.Module, num_adaptors: int, alpha: float, layer_index: int):
        super().__init__()
        self.base = base
        self.num_adaptors = num_adaptors
        self.alpha = float(alpha)
        self.layer_index = layer_index
        self._router: Router | None = None

    def bind_router(self, router: Router | None) -> None:
        # A plain attribute, not a submodule: the router belongs to the root model and must
        # appear once in its state_dict.
        object.__setattr__(self, "_router", router)
        if router is not None and router.per_layer:
            # The layer's row as a tensor, for compiled code (see Router.traced_weights); not
            # persistent: it is structure, not state, and stays out of the state_dict.
            row = torch.tensor([self.layer_index], device=router.logits.device)
            self.register_buffer("router_row", row, persistent=False)

    @property
    def router(self) -> Router | None:
        return self._router

    def adaptor_parameters(self) -> dict[str, nn.Parameter]:
        """This layer's own adaptor tensors (local name -> parameter), C adaptors on axis 0."""
        names = self.factor_names + self.delta_names
        return {name: p for name, p in self._parameters.items() if name in names and p is not None}

    def mixture(self) -> Tensor | None:
        """The pi (C,) of the current forward, or None for a single adaptor of weight 1."""
        router = self._router
        if router is None:
            return None
        if torch.compiler.is_compiling():
            # No int layer index here: dynamo would specialize on it, once per layer.
            return router.traced_weights(self._buffers.get("router_row"))
        return router.weights(self.layer_index)

    def eval_mixture(self) -> Tensor:
        """pi (C,) in eval mode (no noise), detached; ones for a single adaptor."""
        if self._router is None:
            reference = next(iter(self.adaptor_parameters().values()))
            return torch.ones(self.num_adaptors, dtype=reference.dtype, device=reference.device)
        pi = self._router.eval_weights()
        return pi[self.layer_index] if pi.dim() == 2 else pi

    @abstractmethod
    def fold(self, pi: Tensor) -> nn.Module:
        """Fold the mixture with weights `pi` (C,) into `.base` in place, and return it."""

    def _mix_hidden(self, hidden: Tensor, pi: Tensor | None, rank: int, conv: bool) -> Tensor:
        if pi is None:
            return hidden
        scale = pi if rank == 1 else pi.repeat_interleave(rank)
        return hidden * (scale.view(-1, 1, 1) if conv else scale)

    def _mixed_bias(self, base_bias: Tensor | None, pi: Tensor | None) -> Tensor | None:
        lora_bias = self._parameters.get("lora_bias")
        if lora_bias is None:
            return base_bias
        if pi is None:
            if base_bias is None:
                return lora_bias[0] * self.alpha
            return base_bias.add(lora_bias[0], alpha=self.alpha)
        if base_bias is None:
            return torch.mv(lora_bias.t(), pi) * self.alpha
        return torch.addmv(base_bias, lora_bias.t(), pi, alpha=self.alpha)

    def _fold_bias(self, base: nn.Linear | nn.Conv2d, scale: Tensor) -> None:
        lora_bias = self._parameters.get("lora_bias")
        if lora_bias is None:
            return
        delta = scale @ lora_bias
        if base.bias is None:
            base.bias = nn.Parameter(delta, requires_grad=base.weight.requires_grad)
        else:
            base.bias.add_(delta)

    def _new_factors(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], bias_size: int,
                     bias: bool, reference: Tensor) -> None:
        count, device, dtype = self.num_adaptors, reference.device, reference.dtype
        self.lora_A = nn.Parameter(torch.empty(count, *a_shape, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(count, *b_shape, device=device, dtype=dtype))
        lora_bias = torch.zeros(count, bias_size, device=device, dtype=dtype) if bias else None
        self.register_parameter("lora_bias", None if lora_bias is None else nn.Parameter(lora_bias))
        with torch.no_grad():
            for factor in self.lora_A:
                # Per adaptor, so the fan-in is that of one A_c (r, d_in...), as in nn.Linear.
                nn.init.kaiming_uniform_(factor, a=math.sqrt(5))


class AdaptedLinear(AdaptedLayer):
    """nn.Linear plus the mixture; A (C, r, in), B (C, r, out), bias (C, out)."""

    base: nn.Linear
    factor_names = ("lora_A", "lora_B", "lora_bias")

    def __init__(self, base: nn.Linear, num_adaptors: int, rank: int, alpha: float = 1.0,
                 bias: bool = True, layer_index: int = 0):
        super().__init__(base, num_adaptors, alpha, layer_index)
        self.rank = rank
        self._new_factors((rank, base.in_features), (rank, base.out_features),
                          base.out_features, bias, base.weight)

    def forward(self, x: Tensor) -> Tensor:
        pi = self.mixture()
        base = self.base
        if type(base) is nn.Linear:
            bias = self._mixed_bias(base.bias, pi)
            if self._merge_cheaper(x):
                return F.linear(x, self._merged_weight(pi), bias)
            out = F.linear(x, base.weight, bias)
        else:  # a quantized base (bitsandbytes) computes itself; its weight is packed
            out = base(x)
            bias = self._mixed_bias(None, pi)
            out = out if bias is None else out + bias.to(out.dtype)
        hidden = self._mix_hidden(F.linear(x, self.lora_A.flatten(0, 1)), pi, self.rank, False)
        return _add_product(out, hidden.to(out.dtype), self.lora_B.flatten(0, 1).to(out.dtype),
                            self.alpha)

    def _merge_cheaper(self, x: Tensor) -> bool:
        """Whether this forward computes the merged weight W + alpha * B^T diag(pi) A.

        Each product of the merged form (the merge, and in the backward the factors' gradients
        from the weight gradient) costs C*r * in * out; each of the factored form's costs
        C*r * rows * (in or out). The rule: merge when rows * (in + out) > in * out. Never when
        the backward would need a weight gradient that the base does not (a frozen base) nor
        under autocast, where W + delta would round to the low precision.
        """
        weight = self.base.weight
        rows = x.numel() // max(x.shape[-1], 1)
        if rows * (weight.shape[0] + weight.shape[1]) <= weight.numel():
            return False
        if torch.is_grad_enabled() and not weight.requires_grad:
            return False
        return not torch.is_autocast_enabled(x.device.type)

    def _merged_weight(self, pi: Tensor | None) -> Tensor:
        """W + alpha * sum_c pi_c B_c^T A_c as one (out, in) matrix."""
        factor = self.lora_B.flatten(0, 1).t()  # (out, C*r)
        if pi is not None:
            factor = factor * (pi if self.rank == 1 else pi.repeat_interleave(self.rank))
        return torch.addmm(self.base.weight, factor, self.lora_A.flatten(0, 1), alpha=self.alpha)

    @torch.no_grad()
    def fold(self, pi: Tensor) -> nn.Module:
        scale = pi * self.alpha
        self.base.weight.add_(torch.einsum("c,cro,cri->oi", scale, self.lora_B, self.lora_A))
        self._fold_bias(self.base, scale)
        return self.base

    def extra_repr(self) -> str:
        return f"num_adaptors={self.num_adaptors}, rank={self.rank}, alpha={self.alpha}"


@dataclass(frozen=True)
class ConvStep:
    """One conv2d call with explicit per-side padding (F.pad order: left, right, top, bottom)."""

    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]
    pad_mode: str

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        left, right, top, bottom = self.pads
        if self.pad_mode == "constant" and left == right and top == bottom:
            return F.conv2d(x, weight, bias, self.stride, (top, left), self.dilation)
        padded = F.pad(x, self.pads, mode=self.pad_mode)
        return F.conv2d(padded, weight, bias, self.stride, 0, self.dilation)


class AdaptedConv2d(AdaptedLayer):
    """nn.Conv2d plus the mixture, in the separable or the "kxk-1x1" low-rank form.

    separable: A (C, r, in, 1, kw), B (C, r, out, kh, 1); kxk-1x1: A (C, r, in, kh, kw),
    B (C, r, out, 1, 1); bias (C, out).
    """

    base: nn.Conv2d
    factor_names = ("lora_A", "lora_B", "lora_bias")

    def __init__(self, base: nn.Conv2d, num_adaptors: int, rank: int, alpha: float = 1.0,
                 bias: bool = True, form: str = "separable", layer_index: int = 0):
        super().__init__(base, num_adaptors, alpha, layer_index)
        self.rank = rank
        self.form = form
        out_ch, in_ch, kh, kw = base.weight.shape
        sh, sw = base.stride
        dh, dw = base.dilation
        left, right, top, bottom = _conv_pads(base)
        mode = "constant" if base.padding_mode == "zeros" else base.padding_mode
        self.base_step = ConvStep((sh, sw), (dh, dw), (left, right, top, bottom), mode)
        if form == "separable":
            a_shape, b_shape = (rank, in_ch, 1, kw), (rank, out_ch, kh, 1)
            self.first_step = ConvStep((1, sw), (1, dw), (left, right, 0, 0), mode)
            self.second_step = ConvStep((sh, 1), (dh, 1), (0, 0, top, bottom), mode)
        else:
            a_shape, b_shape = (rank, in_ch, kh, kw), (rank, out_ch, 1, 1)
            self.first_step = self.base_step
            self.second_step = ConvStep((1, 1), (1, 1), (0, 0, 0, 0), "constant")
        self._new_factors(a_shape, b_shape, out_ch, bias, base.weight)

    def forward(self, x: Tensor) -> Tensor:
        pi = self.mixture()
        base = self.base
        out = self.base_step(x, base.weight, self._mixed_bias(base.bias, pi))
        hidden = self._mix_hidden(self.first_step(x, self.lora_A.flatten(0, 1)), pi, self.rank,
                                  True)
        delta = self.second_step(hidden, self.lora_B.flatten(0, 1).transpose(0, 1))
        return out.add(delta, alpha=self.alpha)

    @torch.no_grad()
    def fold(self, pi: Tensor) -> nn.Module:
        scale = pi * self.alpha
        c, r = self.lora_A.shape[:2]
        if self.form == "separable":
            a = self.lora_A.reshape(c, r, self.lora_A.shape[2], -1)  # (C, r, in, kw)
            b = self.lora_B.reshape(c, r, self.lora_B.shape[2], -1)  # (C, r, out, kh)
            kernel = torch.einsum("c,cjoy,cjix->oiyx", scale, b, a)
        else:
            b = self.lora_B.reshape(c, r, -1)  # (C, r, out)
            kernel = torch.einsum("c,cjo,cjiyx->oiyx", scale, b, self.lora_A)
        self.base.weight.add_(kernel)
        self._fold_bias(self.base, scale)
        return self.base

    def extra_repr(self) -> str:
        return (f"num_adaptors={self.num_adaptors}, rank={self.rank}, alpha={self.alpha}, "
                f"form={self.form!r}")


class AdaptedEmbedding(AdaptedLayer):
    """nn.Embedding plus the mixture; A (C, r, num_embeddings), B (C, r, embedding_dim).

    The padding row's column of A is zero and gets no gradient, so the padding vector stays
    the base's.
    """

    base: nn.Embedding
    factor_names = ("lora_A", "lora_B")

    def __init__(self, base: nn.Embedding, num_adaptors: int, rank: int, alpha: float = 1.0,
                 layer_index: int = 0):
        super().__init__(base, num_adaptors, alpha, layer_index)
        self.rank = rank
        self._new_factors((rank, base.num_embeddings), (rank, base.embedding_dim), 0, False,
                          base.weight)
        if base.padding_idx is not None:
            with torch.no_grad():
                self.lora_A[..., base.padding_idx] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        pi = self.mixture()
        base = self.base
        out = F.embedding(x, base.weight, base.padding_idx, base.max_norm, base.norm_type,
                          base.scale_grad_by_freq, base.sparse)
        table = self.lora_A.flatten(0, 1).t()  # (num_embeddings, C*r), a view
        hidden = F.embedding(x, table, base.padding_idx, None, 2.0, base.scale_grad_by_freq)
        hidden = self._mix_hidden(hidden, pi, self.rank, False)
        return _add_product(out, hidden, self.lora_B.flatten(0, 1), self.alpha)

    @torch.no_grad()
    def fold(self, pi: Tensor) -> nn.Module:
        scale = pi * self.alpha
        self.base.weight.add_(torch.einsum("c,crv,crd->vd", scale, self.lora_A, self.lora_B))
        return self.base

    def extra_repr(self) -> str:
        return f"num_adaptors={self.num_adaptors}, rank={self.rank}, alpha={self.alpha}"


class AdaptedNorm(AdaptedLayer):
    """A BatchNorm, LayerNorm or GroupNorm whose affine weight and bias get one delta per
    adaptor, (C, *affine_shape), starting at zero. A norm without affine parameters acts as
    weight 1, bias 0."""

    base: _Norm
    delta_names = ("norm_weight_delta", "norm_bias_delta")

    def __init__(self, base: _Norm, num_adaptors: int, alpha: float = 1.0,
                 layer_index: int = 0):
        super().__init__(base, num_adaptors, alpha, layer_index)
        if isinstance(base, nn.LayerNorm):
            shape = tuple(base.normalized_shape)
        elif isinstance(base, nn.GroupNorm):
            shape = (base.num_channels,)
        else:
            shape = (base.num_features,)
        reference: Tensor | None = next(iter(base.parameters()), None)
        if reference is None:
            reference = next(iter(base.buffers()), torch.empty(0))
        device, dtype = reference.device, reference.dtype
        self.norm_weight_delta = nn.Parameter(
            torch.zeros(num_adaptors, *shape, device=device, dtype=dtype)
        )
        self.norm_bias_delta = nn.Parameter(
            torch.zeros(num_adaptors, *shape, device=device, dtype=dtype)
        )

    def forward(self, x: Tensor) -> Tensor:
        pi = self.mixture()
        base = self.base
        weight = self._mixed_affine(base.weight, self.norm_weight_delta, pi, 1.0)
        bias = self._mixed_affine(base.bias, self.norm_bias_delta, pi, 0.0)
        if isinstance(base, nn.LayerNorm):
            return F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)
        if isinstance(base, nn.GroupNorm):
            return F.group_norm(x, base.num_groups, weight, bias, base.eps)
        return _batch_norm(base, x, weight, bias)

    def _mixed_affine(self, base_value: Tensor | None, delta: Tensor, pi: Tensor | None,
                      identity: float) -> Tensor:
        shape = delta.shape[1:]
        deltas = delta.flatten(1)
        if base_value is not None and pi is not None:
            return torch.addmv(base_value.flatten(), deltas.t(), pi, alpha=self.alpha).view(shape)
        mixed = deltas[0] if pi is None else torch.mv(deltas.t(), pi)
        if base_value is None:
            return (mixed * self.alpha + identity).view(shape)
        return base_value.add(mixed.view(shape), alpha=self.alpha)

    @torch.no_grad()
    def fold(self, pi: Tensor) -> nn.Module:
        scale = pi * self.alpha
        base = self.base
        shape = self.norm_weight_delta.shape[1:]
        for name, delta, identity in (("weight", self.norm_weight_delta, 1.0),
                                      ("bias", self.norm_bias_delta, 0.0)):
            mixed = (scale @ delta.flatten(1)).view(shape)
            current = getattr(base, name)
            if current is None:
                setattr(base, name, nn.Parameter(mixed + identity))
            else:
                current.add_(mixed)
        # A norm built without affine parameters now has them.
        for flag in ("affine", "elementwise_affine"):
            if hasattr(base, flag):
                setattr(base, flag, True)
        return base


def factor_sizes(module: nn.Module, conv_form: str = "separable") -> tuple[int, int]:
    """(d_in, d_out) of a layer's adaptor factors, as documented at the top of this module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        out_ch, in_ch, kh, kw = module.weight.shape
        if conv_form == "separable":
            return in_ch * kw, out_ch * kh
        return in_ch * kh * kw, out_ch
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    raise TypeError(f"no low-rank factors for {type(module).__name__}")


def _add_product(out: Tensor, hidden: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """out + alpha * hidden @ weight, with the add fused into the matmul."""
    if out.dim() == 2:
        return torch.addmm(out, hidden, weight, alpha=alpha)
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), hidden.reshape(-1, hidden.shape[-1]),
                       weight, alpha=alpha)
    return flat.view(out.shape)


def _conv_pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """The base conv's padding per side, in F.pad order (left, right, top, bottom)."""
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    if conv.padding == "valid":
        return 0, 0, 0, 0
    if conv.padding == "same":
        total_h, total_w = dh * (kh - 1), dw * (kw - 1)
        return total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2
    # Any other string is rejected by nn.Conv2d, which stores numeric padding as a pair.
    ph, pw = cast("tuple[int, int]", conv.padding)
    return pw, pw, ph, ph


def _batch_norm(norm: _BatchNorm, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The forward of nn.BatchNormNd with the given affine, updating running stats once."""
    norm._check_input_dim(x)
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        # momentum None means a cumulative moving average.
        if norm.momentum is None:
            momentum = 1.0 / float(norm.num_batches_tracked)
    use_batch_stats = norm.training or (norm.running_mean is None and norm.running_var is None)
    keep_stats = not norm.training or norm.track_running_stats
    return F.batch_norm(
        x,
        norm.running_mean if keep_stats else None,
        norm.running_var if keep_stats else None,
        weight,
        bias,
        use_batch_stats,
        momentum,
        norm.eps,
    )
