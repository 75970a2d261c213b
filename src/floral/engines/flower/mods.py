"""The Flower mods floral's ClientApps run: SecAgg+ on the train messages that ask for it.

A ClientApp's mods are fixed when it is built, but whether a run uses secure aggregation is
the server's run config (`flower.secagg`); so every floral ClientApp carries `privacy_mod`,
which hands a train message to Flower's `secaggplus_mod` when the message carries SecAgg+'s
record, and passes any other message through. The mod keeps its protocol state in the node's
`context.state`, so it runs in the ClientApp process, before a warm worker (if any) is asked.
Imports only Flower, and Flower's SecAgg+ mod only when a message needs it.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

__all__ = ["SECAGG_RECORD", "privacy_mod"]

SECAGG_RECORD = RECORD_KEY_CONFIGS  # the record of SecAgg+'s settings in a message


def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if (
        msg.metadata.message_type == MessageType.TRAIN
        and SECAGG_RECORD in msg.content.config_records
    ):
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)
