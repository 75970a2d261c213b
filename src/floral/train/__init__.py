"""Local training: the client loop, optimizers, objectives (loss, evaluation, metrics)."""

from floral.train.loop import TrainConfig, train_epochs
from floral.train.objective import EvalResult, Objective, get_objective
from floral.train.optim import ServerOptimizer, build_server_optimizer
from floral.train.state import WEIGHT_SUFFIX, StateSlots, TensorDict, payload_bytes

__all__ = [
    "WEIGHT_SUFFIX",
    "EvalResult",
    "Objective",
    "ServerOptimizer",
    "StateSlots",
    "TensorDict",
    "TrainConfig",
    "build_server_optimizer",
    "get_objective",
    "payload_bytes",
    "train_epochs",
]
