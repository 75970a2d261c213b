"""The server optimizer: the mean client update is applied as a pseudo-gradient.

SGD with lr 1 and no momentum is plain averaging (FedAvg); Adam gives FedAdam-style runs.
State is a flat dict of tensors so it checkpoints to safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from floral.config import check_choice
from floral.errors import ConfigError
from floral.train.loop import ServerOptimizerKind, TrainConfig
from floral.train.state import TensorDict

__all__ = ["ServerOptimizer", "build_server_optimizer"]


class ServerOptimizer:
    """Applies `delta` (mean of client updates, the negative pseudo-gradient) to global tensors."""

    def __init__(
        self,
        kind: ServerOptimizerKind = "sgd",
        lr: float = 1.0,
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        check_choice("train.server_optimizer", kind, ServerOptimizerKind)
        self.kind, self.lr, self.momentum, self.betas, self.eps = kind, lr, momentum, betas, eps
        self.state: TensorDict = {}
        self.steps = 0

    @torch.no_grad()
    def step(
        self, params: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
    ) -> TensorDict:
        self.steps += 1
        new = dict(params)
        for name, d in delta.items():
            new[name] = params[name] + self._direction(name, d)
        return new

    def _direction(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        if self.kind == "sgd":
            if self.momentum:
                # Out of place here and below: a checkpoint taken between rounds holds the
                # previous tensors, which a round cut short must not have changed.
                buf = self.state.get(f"{name}.momentum")
                buf = delta.clone() if buf is None else buf.mul(self.momentum).add(delta)
                self.state[f"{name}.momentum"] = buf
                delta = buf
            return self.lr * delta
        beta1, beta2 = self.betas
        m = self.state.get(f"{name}.exp_avg", torch.zeros_like(delta))
        v = self.state.get(f"{name}.exp_avg_sq", torch.zeros_like(delta))
        m = m.mul(beta1).add(delta, alpha=1 - beta1)
        v = v.mul(beta2).addcmul(delta, delta, value=1 - beta2)
        self.state[f"{name}.exp_avg"], self.state[f"{name}.exp_avg_sq"] = m, v
        m_hat = m / (1 - beta1**self.steps)
        v_hat = v / (1 - beta2**self.steps)
        return self.lr * m_hat / (v_hat.sqrt() + self.eps)

    def state_dict(self) -> TensorDict:
        return {**self.state, "steps": torch.tensor(self.steps)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        state = dict(state)
        self.steps = int(state.pop("steps", torch.tensor(0)))
        self.state = {k: v.clone() for k, v in state.items()}


def build_server_optimizer(config: TrainConfig) -> ServerOptimizer:
    betas = tuple(config.server_betas)
    if len(betas) != 2:
        raise ConfigError(f"train.server_betas: expected two numbers, got {config.server_betas}")
    return ServerOptimizer(
        config.server_optimizer, config.server_lr, config.server_momentum, betas, config.server_eps
    )
