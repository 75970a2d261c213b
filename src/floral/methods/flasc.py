"""FLASC (Kuo et al., arXiv 2406.05233): LoRA with sparse communication, dense local training.

The server keeps the dense LoRA factors. It sends their top-k entries (download density), the
client fine-tunes the whole LoRA densely from there, and sends the top-k of its update (upload
density); the server applies the mean update with Adam. Each message keeps its k largest
magnitudes under one threshold over all its tensors.

The sparsity and the server optimizer are settings of the run, not of the method, so that the
engine measures the bytes on the payload that is really sent:

    [method]
    name = "flasc"
    [comm]
    download = "topk:0.25"
    upload = "topk:0.1"
    [train]
    server_optimizer = "adam"
    server_lr = 0.01

(`configs/comm-fmnist-rotate-flasc.toml`). The client's update is measured from the model
it received and the server adds the mean update to its own dense copy, so an entry left out
of a download is not lost: it stays in the server's copy.
"""

from __future__ import annotations

from floral.methods.lora_common import LoraMethod

__all__ = ["FLASC"]


class FLASC(LoraMethod):
    name = "flasc"
    description = "LoRA, dense local training; top-k sparse messages and server Adam (by config)."
    batchable = True
    plain_mean = True
    mixture_mean = False
    secure_sum = True
