"""A trivial Flower app with floral's message pattern: the floor of a deployed round.

Each round: a train message with `floats` float32 values to every node, whose ClientApp echoes
them back as its upload; then an evaluate message with the same values, answered with three
numbers. The ServerApp times each round (push to last reply) and writes the seconds to `out`.
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    upload = ArrayRecord({"x": msg.content["global"]["x"]})
    metrics = MetricRecord({"train_loss": 0.0, "num_examples": 1})
    return Message(RecordDict({"upload": upload, "metrics": metrics}), reply_to=msg)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    sums = MetricRecord({"loss_sum": 0.0, "score_sum": 0.0, "count": 1})
    return Message(RecordDict({"eval": sums}), reply_to=msg)


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    config = context.run_config
    wanted, poll = int(config["num-nodes"]), float(config["poll-interval"])
    while len(nodes := sorted(grid.get_node_ids())) < wanted:
        time.sleep(poll)
    values = np.zeros(int(config["floats"]), dtype=np.float32)
    seconds = []
    for round_ in range(1, int(config["rounds"]) + 1):
        start = time.perf_counter()
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            content = RecordDict({"global": ArrayRecord({"x": Array(values)}),
                                  "config": ConfigRecord({"round": round_})})
            messages = [Message(content, node, kind, group_id=str(round_)) for node in nodes]
            waiting = set(grid.push_messages(messages))
            while waiting:
                for reply in grid.pull_messages(list(waiting)):
                    waiting.discard(reply.metadata.reply_to_message_id)
                if waiting:
                    time.sleep(poll)
        seconds.append(time.perf_counter() - start)
    if config["out"]:
        with open(str(config["out"]), "w") as f:
            json.dump({"seconds": seconds}, f)
