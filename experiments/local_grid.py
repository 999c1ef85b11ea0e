"""The real ServerApp and ClientApp wired through an in-process Grid (no SuperLink, no Ray).

Fast enough for many runs per test or study, and killable: `python -m
experiments.local_grid CONFIG N` runs one federation of N nodes in its own process, so a
test can SIGKILL the server at any point and then resume. `flwr run` itself is covered
by tests/test_e2e_flwr_run.py. A node's replies can be tampered with (`tamper`: a
hostile site), or the node made to crash or stay silent.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from clients import runtime
from clients.client_app import app as client_app
from fed_dplora.run.checkpoint import Checkpoint
from server import server_app as server_app_module
from server.server_app import app as server_app

# Server and clients share this process, which a real run never does: the heavy halves
# are imported here, up front, so the ServerApp's background import (fed_dplora.ops.preload)
# never runs while a client loads data.
for _heavy in ("clients.local_site", "server.federation"):
    importlib.import_module(_heavy)

SERVER_NODE = 0
IN_SIMULATION = runtime.in_simulation
SERVER_IN_SIMULATION = server_app_module.in_simulation


class LocalGrid(Grid):
    """Delivers each message to the ClientApp of its node, in this process, in order."""

    def __init__(self, run_config: dict, num_nodes: int, node_configs: list[dict] | None = None,
                 deployment: bool = False, run_id: int = 1) -> None:
        configs = node_configs or [{"partition-id": i, "num-partitions": num_nodes}
                                   for i in range(num_nodes)]
        self.contexts = {100 + i: Context(run_id=run_id, node_id=100 + i, node_config=cfg,
                                          state=RecordDict(), run_config=run_config)
                         for i, cfg in enumerate(configs)}
        # After the census (round 0): nodes whose ClientApp raises, or never answers.
        self.failing: set[int] = set()
        self.silent: set[int] = set()
        # node -> f(message type, reply) -> the reply the server receives instead
        self.tamper: dict[int, Callable[[str, Message], Message]] = {}
        # This grid stands in for Flower's simulation runtime, unless told otherwise.
        self.deployment = deployment

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            # As Flower's grids do when they push a message: replies name this id.
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            if node in self.silent and message.metadata.message_type != "query":
                continue
            replies.append(self._reply(node, message))
        return replies

    def _reply(self, node: int, message: Message) -> Message:
        TaskIdentity.node_id = node
        try:
            if node in self.failing and message.metadata.message_type != "query":
                raise RuntimeError("simulated client crash")
            runtime.in_simulation = lambda: not self.deployment
            reply = client_app(message, self.contexts[node])
            if node in self.tamper:
                reply = self.tamper[node](message.metadata.message_type, reply)
            return reply
        except Exception as exc:  # what Flower does with a raising ClientApp
            return Message(Error(code=0, reason=repr(exc)), reply_to=message)
        finally:
            TaskIdentity.node_id = SERVER_NODE
            runtime.in_simulation = IN_SIMULATION

    # Unused by the ServerApp.
    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError


def run_federation(run_config: dict, num_nodes: int, grid: LocalGrid | None = None) -> None:
    run_server_app(server_app, run_config, grid or LocalGrid(run_config, num_nodes))


def run_server_app(app, run_config: dict, grid: Grid) -> None:
    """Run a ServerApp (the project's, or a test's own) as the server of run 1; the
    grid stands in for Flower's simulation unless it says it is a deployment."""
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", SERVER_NODE)):
        setattr(TaskIdentity, f"{attr}", value)
    server_app_module.in_simulation = lambda g: not getattr(g, "deployment", False)
    try:
        app(grid, Context(run_id=1, node_id=SERVER_NODE, node_config={}, state=RecordDict(),
                          run_config=run_config))
    finally:
        server_app_module.in_simulation = SERVER_IN_SIMULATION


def run_keeping_checkpoint(config, monkeypatch, wanted, num_nodes: int = 3) -> Checkpoint:
    """Run the federation; return a copy of the last checkpoint it saved that `wanted`."""
    kept, original_save = [], Checkpoint.save

    def save(self, folder):
        if wanted(self):
            kept.append(copy.deepcopy(self))
        return original_save(self, folder)
    monkeypatch.setattr(Checkpoint, "save", save)
    run_federation(config, num_nodes)
    monkeypatch.undo()
    return kept[-1]


if __name__ == "__main__":
    run_federation(json.loads(sys.argv[1]), int(sys.argv[2]))
