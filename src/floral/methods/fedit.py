"""FedIT (Zhang et al. 2023): LoRA on a frozen base, the factors A and B averaged separately.

The server's mean of A and mean of B is not the mean of the products B_k A_k; FFA-LoRA and
FLoRA are two answers to that.
"""

from __future__ import annotations

from floral.methods.lora_common import LoraMethod

__all__ = ["FedIT"]


class FedIT(LoraMethod):
    name = "fedit"
    description = "LoRA on a frozen base; A and B averaged separately (examples-weighted)."
    batchable = True
    plain_mean = True
    mixture_mean = False
    secure_sum = True
