"""Federated tasks that work offline: real image sources, concept shifts, synthetic regression.

`build_task(TaskConfig(...), seed)` returns a `FederatedTask`: one `ClientData` per client, each
with its own train and test tensors, and the cluster it belongs to (client k is in cluster
k mod C).
"""

from __future__ import annotations

from floral.data.shifts import SHIFTS
from floral.data.task import (
    DATASETS,
    ClientData,
    FederatedTask,
    TaskConfig,
    build_task,
    outline_task,
    task_outline,
)

__all__ = [
    "DATASETS", "SHIFTS", "TaskConfig", "ClientData", "FederatedTask", "build_task",
    "outline_task", "task_outline",
]
