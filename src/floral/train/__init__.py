"""Local training: the client loop, optimizers, evaluation and metrics."""

from floral.train.evaluate import EvalResult, evaluate
from floral.train.loop import TrainConfig, train_epochs
from floral.train.optim import ServerOptimizer, build_server_optimizer
from floral.train.state import StateSlots, TensorDict, payload_bytes

__all__ = [
    "EvalResult",
    "ServerOptimizer",
    "StateSlots",
    "TensorDict",
    "TrainConfig",
    "build_server_optimizer",
    "evaluate",
    "payload_bytes",
    "train_epochs",
]
