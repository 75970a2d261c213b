"""Flower's secure aggregation (SecAgg+) for floral's uploads: the server learns only their sum.

floral's uploads are sums by design (every client sends `w * delta` and `w`; the server adds
and divides), so a method whose server step needs only the sum of the round's uploads runs
unchanged under SecAgg+. The clients run Flower's own `secaggplus_mod` (floral's ClientApps
apply it to the train messages of a run with `flower.secagg = true`); this module is the server
side of that protocol, written against floral's transport rather than Flower's legacy
`Strategy` (whose `SecAggPlusWorkflow` needs one): setup, key sharing, masked uploads,
unmasking, exactly as Flower's workflow does them, over the transport's messages.

Flower's protocol quantizes: every value is clipped to +-`clip` and stochastically rounded to
one of `levels` integers, so the sum is exact to within `2 * clip / levels` per client and
value. floral picks `levels` as large as the 32-bit masks allow for the round's clients, and a
client whose upload does not fit in +-`clip` fails with a one-line error (never clipped in
silence).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from floral.engines.flower.records import error_reason
from floral.train.state import TensorDict, aligned

__all__ = ["MOD_RANGE", "STRUCTURE", "SecureRound", "levels_for"]

MOD_RANGE = 1 << 32  # the masks' modulus: Flower's largest
STRUCTURE = "floral.structure"  # key of the client's upload layout (names, shapes, dtypes)
FITRES_METRICS = "fitres.metrics"  # where Flower's mod keeps the train reply's settings

Exchange = Callable[[Mapping[int, Message]], dict[int, Message]]


def levels_for(clients: int) -> int:
    """Quantization levels for a sum of `clients` uploads: the most whose sum (and the sum of
    the clients' weight factors, as many) stays below the masks' modulus."""
    return MOD_RANGE >> max(2, math.ceil(math.log2(clients + 1)))


@dataclass
class Outcome:
    """What one round of the protocol gave: the sum of the surviving clients' uploads, their
    settings (train loss, ...), and a reason for every client that did not make it."""

    total: TensorDict | None
    metrics: dict[int, Mapping[str, Any]]
    failed: dict[int, str]


class SecureRound:
    """The server side of SecAgg+ for one round's train messages, to nodes {client: node id}."""

    def __init__(self, exchange: Exchange, clip: float) -> None:
        self.exchange, self.clip = exchange, clip

    def __call__(self, round_: int, nodes: Mapping[int, int], train: RecordDict) -> Outcome:
        failed: dict[int, str] = {}
        client_of = {nid: k for k, nid in nodes.items()}
        count = len(nodes)
        threshold = max(2, count // 2 + 1)
        levels = levels_for(count)

        def send(stage: Mapping[int, RecordDict]) -> dict[int, RecordDict]:
            messages = {
                nid: Message(content, nid, MessageType.TRAIN, group_id=str(round_))
                for nid, content in stage.items()
            }
            replies = self.exchange(messages)
            answers = {}
            for nid in stage:
                reply = replies.get(nid)
                if reply is None:
                    failed[client_of[nid]] = "secure aggregation: no reply"
                elif reply.has_error():
                    failed[client_of[nid]] = f"secure aggregation: {error_reason(reply)}"
                else:
                    answers[nid] = reply.content
            return answers

        def stopped(active: Any, why: str) -> Outcome:
            for nid in nodes.values():
                failed.setdefault(client_of[nid], f"secure aggregation halted: {why}")
            return Outcome(None, {}, failed)

        # 0. Setup: the protocol's settings; each node answers with its two public keys.
        def setup() -> ConfigRecord:  # one record per message: Flower's mod edits it
            return ConfigRecord(
                {
                    Key.STAGE: Stage.SETUP,
                    Key.SAMPLE_NUMBER: count,
                    Key.SHARE_NUMBER: count,
                    Key.THRESHOLD: threshold,
                    Key.CLIPPING_RANGE: self.clip,
                    Key.TARGET_RANGE: levels,
                    Key.MOD_RANGE: MOD_RANGE,
                    Key.MAX_WEIGHT: 1.0,
                }
            )

        answers = send({nid: RecordDict({RECORD_KEY_CONFIGS: setup()}) for nid in nodes.values()})
        keys = {
            nid: [
                cast(bytes, a.config_records[RECORD_KEY_CONFIGS][Key.PUBLIC_KEY_1]),
                cast(bytes, a.config_records[RECORD_KEY_CONFIGS][Key.PUBLIC_KEY_2]),
            ]
            for nid, a in answers.items()
        }
        if len(keys) < threshold:
            return stopped(keys, f"{len(keys)} of {count} clients set up")

        # 1. Share keys: every node gets the others' public keys and returns encrypted shares.
        def share(nid: int) -> RecordDict:
            record = ConfigRecord({str(other): keys[other] for other in keys})
            record[Key.STAGE] = Stage.SHARE_KEYS
            return RecordDict({RECORD_KEY_CONFIGS: record})

        answers = send({nid: share(nid) for nid in keys})
        sharing = set(answers)  # the clients whose masks the others will add
        if len(sharing) < threshold:
            return stopped(sharing, f"{len(sharing)} of {count} clients shared keys")
        forward: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in sharing}
        for nid, answer in answers.items():
            record = answer.config_records[RECORD_KEY_CONFIGS]
            destinations = cast(list[int], record[Key.DESTINATION_LIST])
            for dst, text in zip(
                destinations, cast(list[bytes], record[Key.CIPHERTEXT_LIST]), strict=True
            ):
                if dst in forward:
                    forward[dst][0].append(nid)
                    forward[dst][1].append(text)

        # 2. Masked uploads: the train message itself, with the shares meant for each node.
        def collect(nid: int) -> RecordDict:
            content = RecordDict(dict(train))  # the same records for every node, shared
            content[RECORD_KEY_CONFIGS] = ConfigRecord(
                {
                    Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                    Key.CIPHERTEXT_LIST: forward[nid][1],
                    Key.SOURCE_LIST: forward[nid][0],
                }
            )
            return content

        answers = send({nid: collect(nid) for nid in sharing})
        masked = None
        metrics: dict[int, Mapping[str, Any]] = {}
        for nid, answer in answers.items():
            record = answer.config_records[RECORD_KEY_CONFIGS]
            vector = [bytes_to_ndarray(b) for b in cast(list[bytes], record[Key.MASKED_PARAMETERS])]
            masked = vector if masked is None else parameters_addition(masked, vector)
            metrics[client_of[nid]] = dict(answer.config_records.get(FITRES_METRICS, {}))
        active = set(answers)
        if masked is None or len(active) < threshold:
            return stopped(active, f"{len(active)} of {count} clients sent masked uploads")
        masked = parameters_mod(masked, MOD_RANGE)
        dead = sharing - active

        # 3. Unmask: shares of the active nodes' own masks, and of the dead nodes' keys.
        def unmask(nid: int) -> RecordDict:
            return RecordDict(
                {
                    RECORD_KEY_CONFIGS: ConfigRecord(
                        {
                            Key.STAGE: Stage.UNMASK,
                            Key.ACTIVE_NODE_ID_LIST: sorted(active),
                            Key.DEAD_NODE_ID_LIST: sorted(dead),
                        }
                    )
                }
            )

        answers = send({nid: unmask(nid) for nid in active})
        shares: dict[int, list[bytes]] = {nid: [] for nid in sharing}
        for answer in answers.values():
            record = answer.config_records[RECORD_KEY_CONFIGS]
            for owner, piece in zip(
                cast(list[int], record[Key.NODE_ID_LIST]),
                cast(list[bytes], record[Key.SHARE_LIST]),
                strict=True,
            ):
                shares[owner].append(piece)
        shapes = get_parameters_shape(masked)
        for nid, pieces in shares.items():
            if len(pieces) < threshold:
                return stopped(active, "not enough key shares to unmask the sum")
            secret = combine_shares(pieces)
            if nid in active:
                masked = parameters_subtraction(masked, pseudo_rand_gen(secret, MOD_RANGE, shapes))
                continue
            for other in sharing - {nid}:  # a dead node's masks with every other node
                shared = generate_shared_key(
                    bytes_to_private_key(secret), bytes_to_public_key(keys[other][0])
                )
                mask = pseudo_rand_gen(shared, MOD_RANGE, shapes)
                masked = (
                    parameters_addition(masked, mask)
                    if nid > other
                    else parameters_subtraction(masked, mask)
                )
        ratio, quantized = factor_extract(parameters_mod(masked, MOD_RANGE))
        if int(ratio) != len(active) * levels:
            return stopped(active, "the clients' weight factors do not add up")
        # Each value was shifted by +clip before quantization: the sum carries N shifts.
        values = [
            v - (len(active) - 1) * self.clip for v in dequantize(quantized, self.clip, levels)
        ]
        try:
            total = _tensors(values, [metrics[client_of[nid]] for nid in active])
        except ValueError as error:
            return stopped(active, str(error))
        return Outcome(total, metrics, failed)


def _tensors(values: list[np.ndarray], metrics: list[Mapping[str, Any]]) -> TensorDict:
    """The summed upload, named and shaped by the layout every client declared alike."""
    layouts = {str(m.get(STRUCTURE, "")) for m in metrics}
    if len(layouts) != 1 or not next(iter(layouts)):
        raise ValueError("the clients' uploads differ in names, shapes or dtypes")
    layout = json.loads(layouts.pop())
    if len(layout) != len(values):
        raise ValueError(f"{len(values)} summed arrays for {len(layout)} declared tensors")
    total: TensorDict = {}
    for (name, shape, dtype), value in zip(layout, values, strict=True):
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{name!r}: summed shape {value.shape}, declared {shape}")
        total[name] = torch.from_numpy(np.ascontiguousarray(value)).to(getattr(torch, dtype))
    return aligned(total)


def layout_of(upload: Mapping[str, torch.Tensor]) -> str:
    """An upload's layout as a client declares it: [[name, shape, dtype], ...] in JSON."""
    return json.dumps(
        [[n, list(t.shape), str(t.dtype).removeprefix("torch.")] for n, t in upload.items()]
    )
