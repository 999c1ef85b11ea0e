"""A hostile coordinator's harness: crafted messages and run configs against the real
ClientApp of one deployed site, in process (tests/test_site_rule.py,
tests/test_site_limits.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from helpers import deployed_nodes

from clients import runtime
from clients.client_app import app as client_app
from fed_dplora.config import parse_run_config
from fed_dplora.data.demo import LABELS
from fed_dplora.lora.adapters import trainable_arrays
from fed_dplora.lora.model import ModelRecipe
from fed_dplora.site.ledger import SiteLedger, SiteLimits
from fed_dplora.site.trainer import LocalTrainer
from strategies import wire as p
from strategies.round_config import client_config
from strategies.wire import to_record

NODE = 100
FEDERATION_LABELS = tuple(sorted(LABELS))  # the order the census would fix


class HostileCoordinator:
    """Sends crafted messages to one deployed site's real ClientApp, in process."""

    def __init__(self, monkeypatch, node_config: dict, run_config: dict) -> None:
        monkeypatch.setattr(runtime, "in_simulation", lambda: False)
        for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", NODE)):
            monkeypatch.setattr(TaskIdentity, attr, value)
        self.context = Context(run_id=1, node_id=NODE, node_config=node_config,
                               state=RecordDict(), run_config=run_config)

    def send(self, kind: str, content: RecordDict) -> Message:
        """The reply, or the error reply Flower sends when the ClientApp raises."""
        message = Message(content, dst_node_id=NODE, message_type=kind)
        message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        try:
            return client_app(message, self.context)
        except Exception as exc:
            return Message(Error(code=0, reason=repr(exc)), reply_to=message)

    def census(self) -> Message:
        return self.send("query", RecordDict({p.CONFIG: client_config(FEDERATION_LABELS)}))

    def train(self, arrays: dict[str, np.ndarray], sigma: float | None = 1.0,
              secure_noise: bool = True) -> Message:
        config = client_config(FEDERATION_LABELS, noise_multiplier=sigma,
                               secure_noise=secure_noise)
        return self.send("train", RecordDict({p.ARRAYS: to_record(arrays), p.CONFIG: config}))

    def evaluate(self, arrays: dict[str, np.ndarray]) -> Message:
        return self.send("evaluate", RecordDict({p.ARRAYS: to_record(arrays),
                                                 p.CONFIG: client_config(FEDERATION_LABELS)}))

    def global_arrays(self) -> dict[str, np.ndarray]:
        """The run's global tensors at their init, as the server would send them."""
        spec = parse_run_config(self.context.run_config)
        trainer = LocalTrainer(ModelRecipe.from_spec(spec, len(FEDERATION_LABELS)),
                               torch.device("cpu"), private=True)
        return {n: a for n, a in trainable_arrays(trainer.model).items()
                if n in trainer.global_names}


def what_it_tells(reply: Message) -> tuple:
    """What a reply says besides its DP tensors: its kind, an error's text, a decline's
    reason, and which keys it carries."""
    if reply.has_error():
        return ("error", reply.error.reason)
    content = reply.content
    return ("reply", content.config_records.get(p.CONFIG, {}).get(p.DECLINED),
            sorted(content.array_records), sorted(content.metric_records))


def spent_runs(ledger: Path) -> int:
    if not ledger.exists():
        return 0
    accounts = SiteLedger(ledger, SiteLimits()).accounts()
    return sum(len(a["runs"]) for a in accounts.values())


@pytest.fixture()
def site(tmp_path, config) -> dict:
    """A deployed site's node config: its own notes (300 records), declared labels, its
    own ledger."""
    node = deployed_nodes(tmp_path, 1, config["model.name"])[0]
    from experiments.deployment_lab import write_site_csv
    node["data-path"] = str(write_site_csv(tmp_path / "notes.csv", 0, 300))
    node["privacy-ledger"] = str(tmp_path / "ledger.json")
    return node


def head_bias(arrays: dict[str, np.ndarray]) -> str:
    names = [n for n, a in arrays.items() if n.endswith("bias") and "lora" not in n
             and a.shape == (len(FEDERATION_LABELS),)]
    assert len(names) == 1, names
    return names[0]
