"""Round 0: which sites are connected, how many training records each holds, which labels.

The server needs this before it can pick delta, calibrate the noise and build the model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fed_dplora.data.sources import sorted_label_names
from strategies import wire as p
from strategies.screening import ClientFailure

log = logging.getLogger("fed_dplora.server")
NODE_WAIT_S = 120


@dataclass(frozen=True)
class Census:
    node_of: dict[str, int]  # site id -> this run's Flower node id
    sizes: dict[str, int]  # site id -> training records
    labels: tuple[str, ...]
    randomness: dict[str, str] = field(default_factory=dict)  # site -> protocol.FRESH ...
    share_metrics: dict[str, str] = field(default_factory=dict)  # site -> protocol.SHARE_*
    # site -> records per evaluation split ("" test, protocol.VALIDATION), from the sites
    # that share evaluation: what their evaluation replies must report
    eval_sizes: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        return sorted(self.sizes)

    def as_dict(self) -> dict:
        return {"sizes": self.sizes, "labels": list(self.labels)}


def census(grid: Grid, nodes: list[int], timeout: float, secure: bool,
           labelled: bool = True) -> Census:
    """Ask every node for its site id, training-set size, label values and how it will
    draw its DP randomness when the server asks for `secure` noise (round 0). For a
    text-only task (`labelled` False) the sites send no labels.

    A node that fails or stays silent is left out of the run, with a warning."""
    config = ConfigRecord({p.WIRE: p.WIRE_VERSION, p.SECURE_NOISE: secure})
    messages = [Message(RecordDict({p.CONFIG: config}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    node_of, sizes, labels, randomness, shares, eval_sizes = {}, {}, set(), {}, {}, {}
    trained, failed = set(), {}
    for reply in replies:
        node = asked.pop(reply.metadata.reply_to_message_id, None)
        if node is None or reply.has_error():
            failed[node] = reply.error.reason if reply.has_error() else "unexpected reply"
            log.warning("census: node %s is left out of this run: %s", node, failed[node])
            continue
        config = reply.content[p.CONFIG]
        site = str(config[p.SITE_ID])
        if site in node_of:
            raise ClientFailure(
                f"nodes {node_of[site]} and {node} both report site id {site!r}; give "
                "each SuperNode its own --node-config 'site-id=\"...\"'")
        node_of[site], sizes[site] = node, int(config[p.NUM_TRAIN_EXAMPLES])
        labels |= set(config[p.LABEL_NAMES])
        # A dp-only site keeps its training split's labels to itself: taken as all.
        trained |= set(config.get(p.TRAIN_LABEL_NAMES, config[p.LABEL_NAMES]))
        randomness[site] = str(config[p.RANDOMNESS])
        shares[site] = str(config[p.SHARE_METRICS])
        if p.NUM_TEST_EXAMPLES in config:
            eval_sizes[site] = split_sizes(config)
    for node in asked.values():
        failed[node] = f"no answer within {timeout:g} s"
        log.warning("census: node %d did not answer within %g s; left out", node, timeout)
    census = Census(node_of, sizes, sorted_label_names(labels), randomness, shares,
                    eval_sizes)
    return _checked(census, failed, labels - trained, labelled)


def split_sizes(config) -> dict[str, int]:
    """A census reply's evaluation split sizes, by the prefix its replies use."""
    sizes = {"": int(config[p.NUM_TEST_EXAMPLES])}
    if p.NUM_VALIDATION_EXAMPLES in config:
        sizes[p.VALIDATION] = int(config[p.NUM_VALIDATION_EXAMPLES])
    return sizes


def _checked(census: Census, failed: dict, untrained: set[str], labelled: bool) -> Census:
    if not census.sizes:
        raise ClientFailure("census: no site answered: " + "; ".join(
            f"node {node}: {reason}" for node, reason in failed.items()))
    if untrained:
        raise ClientFailure(f"label(s) {sorted(untrained)} occur only in test splits, never "
                            "in any site's training data: the model could not learn them; "
                            "check data.label-column and each site's files")
    empty = [site for site, size in census.sizes.items() if size == 0]
    if empty:
        raise ClientFailure(f"site(s) {empty} have no training records")
    if labelled and len(census.labels) < 2:
        raise ClientFailure(f"the federation's data has labels {list(census.labels)}; "
                            "classification needs at least two")
    return census


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
