"""Round 0: which sites are connected, how many training records each holds, which labels.

The server needs this before it can pick delta, calibrate the noise and build the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fed_dplora import protocol as p
from fed_dplora.data.sources import sorted_label_names
from strategies.replies import ClientFailure, checked_replies

NODE_WAIT_S = 120
REPLY_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Census:
    node_of: dict[str, int]  # site id -> this run's Flower node id
    sizes: dict[str, int]  # site id -> training records
    labels: tuple[str, ...]

    @property
    def sites(self) -> list[str]:
        return sorted(self.sizes)

    def as_dict(self) -> dict:
        return {"sizes": self.sizes, "labels": list(self.labels)}


def census(grid: Grid, nodes: list[int]) -> Census:
    """Ask every node for its site id, training-set size and label values (round 0)."""
    config = ConfigRecord({p.WIRE: p.WIRE_VERSION})
    messages = [Message(RecordDict({p.CONFIG: config}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in nodes]
    replies = checked_replies(list(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S)),
                              nodes, "census")
    node_of, sizes, labels = {}, {}, set()
    for reply in replies:
        config = reply.content[p.CONFIG]
        site = str(config[p.SITE_ID])
        if site in node_of:
            raise ClientFailure(
                f"nodes {node_of[site]} and {reply.metadata.src_node_id} both report site "
                f"id {site!r}; give each SuperNode its own --node-config 'site-id=\"...\"'")
        node_of[site] = reply.metadata.src_node_id
        sizes[site] = int(config[p.NUM_TRAIN_EXAMPLES])
        labels |= set(config[p.LABEL_NAMES])
    empty = [site for site, size in sizes.items() if size == 0]
    if empty:
        raise ClientFailure(f"site(s) {empty} have no training records")
    if len(labels) < 2:
        raise ClientFailure(f"the federation's data has labels {sorted(labels)}; "
                            "classification needs at least two")
    return Census(node_of, sizes, sorted_label_names(labels))


def wait_for_nodes(grid: Grid, needed: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_S
    while len(nodes := sorted(grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            raise ClientFailure(
                f"clients-per-round={needed} but only {len(nodes)} SuperNode(s) connected "
                f"after {NODE_WAIT_S} s; lower clients-per-round or start more "
                "(simulation: --federation-config 'num-supernodes=N')")
        time.sleep(0.1)
    return nodes
