"""FDLoRA (Qi et al., arXiv 2406.07925): a personal and a global LoRA, fused on the client.

Every adapted layer carries two LoRA adaptors: a global one, averaged by the server, and a
personal one that never leaves the client. Each round a client trains the global LoRA alone,
then the personal LoRA alone, and then re-tunes its two fusion weights (w_global, w_personal)
by a gradient-free search on a few of its training samples, minimizing the loss plus an L1
penalty on the weights, as the paper's AdaFusion does. Its model is

    y = base(x) + w_global * B_g A_g x + w_personal * B_p A_p x.

Differences from the paper, on purpose: the fusion weights scale the two adaptors' outputs
(the paper scales their parameters, which for a product B A scales the update by w squared and
mixes terms across the two adaptors), and the search is a small (1 + lambda) evolution strategy
seeded per client step instead of the Nevergrad optimizer, so a client step stays a pure
function of its inputs. The base model is frozen, as the paper's pretrained LLM is; with
`train_base = true` it is trained with the global LoRA and averaged with it.

Implementation: the two adaptors are FLoRAL's fused two-adaptor layer (one rank-2r branch,
two matmuls) with its mixture fixed to the fusion weights; each factor tensor (2, r, ...) is a
parametrization over two tensors, its global half and its personal half, so that the two have
their own names and roles. Adaptive biases are not split this way, hence `bias = false`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from floral.adapters import attach
from floral.adapters.attach import ROUTER_ATTRIBUTE, adapted_layers
from floral.config import Range
from floral.data import FederatedTask, TaskConfig
from floral.errors import ConfigError
from floral.methods.adaptor_options import AdaptorOptions, adapter_spec
from floral.methods.base import ClientJob, Method, Role
from floral.methods.phases import Phase, Phased
from floral.train.loop import TrainConfig
from floral.train.objective import LossFn
from floral.train.state import StateSlots

__all__ = [
    "FUSION_WEIGHTS",
    "FDLoRA",
    "FDLoRAOptions",
    "GLOBAL_HALF",
    "PERSONAL_HALF",
    "fusion_objective",
]

FUSION_WEIGHTS = ROUTER_ATTRIBUTE + ".fixed"  # (w_global, w_personal), private
ROUTER_LOGITS = ROUTER_ATTRIBUTE + ".logits"  # unused: the mixture is fixed
GLOBAL_HALF = "original0"  # suffix of a factor's global half in the state dict
PERSONAL_HALF = "original1"
_FACTORS = ("lora_A", "lora_B")
_PHASES = {"global": (1.0, 0.0), "personal": (0.0, 1.0)}  # fusion weights while training


@dataclass
class FDLoRAOptions(AdaptorOptions):
    rank: int | float = 8
    bias: bool = False
    train_base: bool = False  # the base is frozen (the paper's pretrained model) unless true
    fusion_init: list[float] = field(default_factory=lambda: [0.5, 0.5])  # (global, personal)
    fusion_samples: int = 64  # few-shot samples the fusion search is scored on
    fusion_candidates: int = 8  # candidates per client step (lambda of the evolution strategy)
    fusion_sigma: float = 0.1  # their spread around the current weights
    fusion_l1: float = 0.01  # L1 penalty on the weights

    RANGES: ClassVar[dict[str, Range]] = {
        "fusion_init": Range("(-inf, inf)", length=2),
        "fusion_samples": Range("[1, inf)"),
        "fusion_candidates": Range("[1, inf)"),
        "fusion_sigma": Range("[0, inf)"),
        "fusion_l1": Range("[0, inf)"),
    }


class _Halves(nn.Module):
    """A factor (2, ...) as two tensors: adaptor 0 is the global one, adaptor 1 the personal."""

    def forward(self, global_half: Tensor, personal_half: Tensor) -> Tensor:
        return torch.cat([global_half, personal_half])

    def right_inverse(self, both: Tensor) -> tuple[Tensor, Tensor]:
        return both[:1], both[1:]


class FDLoRA(Phased, Method):
    name = "fdlora"
    description = "Personal and global LoRA per client, fused with learned weights; global shared."
    Options = FDLoRAOptions
    batchable = False  # phases and a fusion search per step
    plain_mean = True
    mixture_mean = False
    secure_sum = True

    def check_against(self, train: TrainConfig, task: TaskConfig) -> None:
        _validate(self.options)

    def build_model(self, model: nn.Module, task: FederatedTask) -> nn.Module:
        opts: FDLoRAOptions = self.options
        _validate(opts)
        attach(model, adapter_spec(opts, num_adaptors=2))
        router = getattr(model, ROUTER_ATTRIBUTE)
        router.fix(torch.tensor(opts.fusion_init))
        router.logits.requires_grad_(False)
        for layer in adapted_layers(model).values():
            for factor in _FACTORS:
                parametrize.register_parametrization(layer, factor, _Halves(), unsafe=True)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(self._role(name) is not Role.FROZEN)
        return model

    def roles(self, model: nn.Module) -> dict[str, Role]:
        # Every name of a tied parameter (an LM's output head and embedding), not just the first.
        parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        roles = {}
        for name, tensor in model.state_dict().items():
            if name in parameters or name == FUSION_WEIGHTS:
                roles[name] = self._role(name)
            else:  # buffers such as BatchNorm statistics: averaged when floating, as FedAvg's
                roles[name] = Role.GLOBAL if tensor.is_floating_point() else Role.PRIVATE
        return roles

    def _role(self, name: str) -> Role:
        if name.endswith(GLOBAL_HALF):
            return Role.GLOBAL
        if name.endswith(PERSONAL_HALF) or name == FUSION_WEIGHTS:
            return Role.PRIVATE
        if name == ROUTER_LOGITS:
            return Role.FROZEN
        return Role.GLOBAL if self.options.train_base else Role.FROZEN

    # -- the client step ---------------------------------------------------------------------
    def train_locally(self, slots: StateSlots, job: ClientJob) -> float:
        """The global LoRA alone, the personal LoRA alone, then a new fusion of the two."""
        generator = torch.Generator().manual_seed(job.seed)
        fusion = slots.tensors[FUSION_WEIGHTS]
        learned = fusion.detach().clone()
        loss = float("nan")
        for phase, weights in _PHASES.items():
            fusion.data.copy_(torch.tensor(weights))
            loss = self.train_phase(slots, job, generator, phase)
        fusion.data.copy_(self.search_fusion(slots.model, learned, job, generator))
        return loss

    def phase(self, model: nn.Module, config: TrainConfig, name: str) -> Phase:
        """What phase `name` trains: the global tensors, or the personal ones."""
        role = {"global": Role.GLOBAL, "personal": Role.PRIVATE}[name]
        names = frozenset(n for n, _ in model.named_parameters() if self._role(n) is role)
        lr = config.adaptor_lr or config.lr
        if name == "global" and self.options.train_base:
            lr = config.lr  # one rate for base and global LoRA: they are trained together
        return Phase(f"fdlora-{name}", names, lr, config.local_epochs)

    @torch.no_grad()
    def search_fusion(
        self, model: nn.Module, current: Tensor, job: ClientJob, generator: torch.Generator
    ) -> Tensor:
        """The best of `current` and `fusion_candidates` Gaussian perturbations of it, scored by
        `fusion_objective` on a few training samples. Keeping `current` among the candidates
        makes the objective non-increasing from round to round."""
        opts: FDLoRAOptions = self.options
        data, loss = job.data, job.objective.loss
        few = torch.randperm(data.num_train, generator=generator)[: opts.fusion_samples]
        device = job.placement.device
        x, y = job.objective.crop(data.x_train[few], data.y_train[few])
        x, y = x.to(device), y.to(device)
        noise = torch.randn(opts.fusion_candidates, current.numel(), generator=generator)
        candidates = torch.cat([current[None], current + opts.fusion_sigma * noise.to(current)])
        scores = [fusion_objective(model, w, x, y, loss, opts.fusion_l1) for w in candidates]
        return candidates[int(torch.tensor(scores).argmin())]


@torch.no_grad()
def fusion_objective(
    model: nn.Module, weights: Tensor, x: Tensor, y: Tensor, loss_fn: LossFn, l1: float
) -> float:
    """Loss of `model` with fusion weights `weights`, plus `l1` times their L1 norm."""
    if model.training:
        model.eval()
    getattr(model, ROUTER_ATTRIBUTE).fixed.copy_(weights)
    loss = loss_fn(model(x), y)
    return float(loss) + l1 * float(weights.abs().sum())


def _validate(opts: FDLoRAOptions) -> None:
    if opts.bias:
        raise ConfigError("method.bias: fdlora has no adaptive bias (its two LoRAs are factors)")
    if len(opts.fusion_init) != 2:
        raise ConfigError(
            f"method.fusion_init: two weights (global, personal), got {opts.fusion_init}"
        )
    positive = ("fusion_samples", "fusion_candidates")
    for key in positive:
        if getattr(opts, key) < 1:
            raise ConfigError(f"method.{key}: must be at least 1, got {getattr(opts, key)}")
    for key in ("fusion_sigma", "fusion_l1"):
        if getattr(opts, key) < 0:
            raise ConfigError(f"method.{key}: must be 0 or more, got {getattr(opts, key)}")
